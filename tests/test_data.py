"""Tests for lm.data: sources, the token cache, batches and samplers. CPU, offline, data written to tmp_path."""

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lm.chat_data import ChatData
from lm.data import (
    PretrainData,
    RandomWindowSampler,
    ResumableDataLoader,
    SequentialWindowSampler,
    builtin_documents,
    markdown_play_to_text,
    token_dtype,
    write_tokens,
)
from lm.errors import LMError

TEXT = "".join(f"Speaker {i % 7}:\nLine number {i}, with some words to read.\n\n" for i in range(200))  # ~10 KB


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def make(tmp_path, source, **kwargs) -> PretrainData:
    kwargs = {"tokenizer": "char", "block_size": 8, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    dm = PretrainData(source=str(source), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def all_tokens(dm: PretrainData) -> np.ndarray:
    return np.concatenate([dm.train_tokens, dm.val_tokens])


def test_txt_char_round_trip_and_split(tmp_path, text_file):
    dm = make(tmp_path, text_file)
    tokens = all_tokens(dm)
    assert dm.tokenizer.decode(tokens.tolist()) == TEXT + "<|eos|>"  # one document, EOS after it
    assert tokens[-1] == dm.tokenizer.eos_id
    n = len(tokens)
    assert len(dm.train_tokens) + len(dm.val_tokens) == n
    # train is the first part of the stream, val the rest, nothing shared or skipped
    assert np.shares_memory(dm.train_tokens, dm.val_tokens) is False
    assert dm.meta["num_tokens"] == n and dm.meta["train_tokens"] == len(dm.train_tokens)
    assert dm.cache_path.parent == tmp_path / "cache" and (dm.cache_path / "tokens.bin").stat().st_size == 2 * n


def test_one_text_file_splits_as_nanogpt_splits_its_characters(tmp_path):
    """train = text[:int(len(text) * 0.9)], as nanoGPT's shakespeare_char. Counting the EOS after the text gave
    training one character more whenever 0.9 x the length had a fraction of 0.1 or more (tinyshakespeare's does)."""
    text = TEXT[:10_004]  # 10,004 x 0.9 = 9,003.6; 10,005 x 0.9 = 9,004.5
    (tmp_path / "t.txt").write_text(text)
    dm = make(tmp_path, tmp_path / "t.txt")
    assert dm.tokenizer.decode(dm.train_tokens.tolist()) == text[:9_003]
    assert dm.tokenizer.decode(dm.val_tokens.tolist()) == text[9_003:] + "<|eos|>"


def test_jsonl_text_field_and_glob_documents(tmp_path):
    rows = [{"body": f"document {i}\nsecond line", "id": i} for i in range(5)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = make(tmp_path, path, text_field="body")
    eos = dm.tokenizer.eos_id
    docs = dm.tokenizer.decode(all_tokens(dm).tolist()).split("<|eos|>")
    assert docs == [r["body"] for r in rows] + [""]
    assert (all_tokens(dm) == eos).sum() == 5

    folder = tmp_path / "docs"
    folder.mkdir()
    for name, body in [("b.txt", "bee\nline two\n"), ("a.txt", "ay\n\nkeeps blank lines\n"), ("c.txt", "sea")]:
        (folder / name).write_text(body)
    dm = make(tmp_path, folder / "*.txt", block_size=2)
    assert dm.tokenizer.decode(all_tokens(dm).tolist()) == (
        "ay\n\nkeeps blank lines\n<|eos|>bee\nline two\n<|eos|>sea<|eos|>"  # one document per file, sorted paths
    )


def test_batches_are_shifted_contiguous_windows(tmp_path, text_file):
    dm = make(tmp_path, text_file, block_size=16, batch_size=5)
    tokens = all_tokens(dm).astype(np.int64)
    for loader, part in ((dm.train_dataloader(), dm.train_tokens), (dm.val_dataloader(), dm.val_tokens)):
        batch = next(iter(loader))
        x, y = batch["input_ids"], batch["labels"]
        assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.long
        assert torch.equal(y[:, :-1], x[:, 1:])
        # every row is a contiguous slice of this split of the token file
        all_windows = np.lib.stride_tricks.sliding_window_view(np.asarray(part, dtype=np.int64), 17)
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
        assert all((all_windows == row).all(axis=1).any() for row in rows)
    assert len(dm.train_dataloader()) == max(1, len(dm.train_tokens) // (5 * 16))

    # validation: in order, non-overlapping, covering the split, capped by val_windows
    starts = [s for b in SequentialWindowSampler(len(dm.val_tokens), block_size=16, batch_size=5) for s in b]
    assert starts == list(range(0, len(dm.val_tokens) - 16, 16))
    first = next(iter(dm.val_dataloader()))["input_ids"][0].numpy()
    assert np.array_equal(first, tokens[len(dm.train_tokens) : len(dm.train_tokens) + 16])
    dm.val_windows = 7  # two batches of 5: the cap counts windows, not batches
    assert [len(b["input_ids"]) for b in dm.val_dataloader()] == [5, 2]


def test_val_windows_are_shared_out_to_ranks():
    one = [s for b in SequentialWindowSampler(1000, block_size=10, batch_size=4, max_windows=31) for s in b]
    ranks = [
        [
            s
            for b in SequentialWindowSampler(1000, block_size=10, batch_size=4, max_windows=31, rank=r, world_size=2)
            for s in b
        ]
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 16  # the same number per rank: rank 1's last is padding
    assert sorted(s for s in ranks[0] + ranks[1] if s >= 0) == one  # every window once; it had left out window 31
    assert [s for s in ranks[0] + ranks[1] if s < 0] == [-1]  # a copy of window 0 (start -1 - 0), with no label


def test_val_loss_on_windows_that_do_not_divide_by_the_ranks_is_the_one_process_loss(tmp_path, text_file):
    """Rank 1's padding window carries no label, so the token-weighted mean over both ranks is one process's."""
    from lm.module import next_token_loss

    dm = make(tmp_path, text_file, block_size=16)
    windows = dm._windows(dm.num_train, dm.num_train + len(dm.val_tokens))  # what val_dataloader reads
    torch.manual_seed(0)
    vocab = int(dm.val_tokens.max()) + 1
    logits_of = torch.nn.Embedding(vocab, vocab)  # any fixed "model"
    n_windows = 7

    def loss_sum_and_tokens(world_size, rank):
        sampler = SequentialWindowSampler(
            len(dm.val_tokens), block_size=16, batch_size=3, max_windows=n_windows, rank=rank, world_size=world_size
        )
        total, tokens = 0.0, 0
        for starts in sampler:
            batch = windows[starts]
            loss, n = next_token_loss(logits_of(batch["input_ids"]), batch["labels"])
            total, tokens = total + float(loss * n), tokens + int(n)
        return total, tokens, len(sampler)

    one, n_one, _ = loss_sum_and_tokens(1, 0)
    ranks = [loss_sum_and_tokens(2, r) for r in (0, 1)]
    assert ranks[0][2] == ranks[1][2]  # as many batches on every rank
    assert n_one == 16 * n_windows == ranks[0][1] + ranks[1][1]
    assert (ranks[0][0] + ranks[1][0]) / n_one == pytest.approx(one / n_one, rel=1e-6)


def test_cache_reused_and_keyed(tmp_path, text_file):
    dm = make(tmp_path, text_file)
    bin_path = dm.cache_path / "tokens.bin"
    stamp = bin_path.stat().st_mtime_ns, (dm.cache_path / "meta.json").stat().st_mtime_ns
    again = make(tmp_path, text_file)
    assert again.reused_cache and again.cache_path == dm.cache_path
    assert (bin_path.stat().st_mtime_ns, (dm.cache_path / "meta.json").stat().st_mtime_ns) == stamp
    # val_fraction and batching are not part of the key: the same tokens, split differently
    assert make(tmp_path, text_file, val_fraction=0.5, block_size=4).cache_path == dm.cache_path

    assert make(tmp_path, text_file, tokenizer="gpt2").cache_path != dm.cache_path
    text_file.write_text(TEXT + "more")
    os.utime(text_file, ns=(stamp[0] + 10**9, stamp[0] + 10**9))
    changed = make(tmp_path, text_file)
    assert not changed.reused_cache and changed.cache_path != dm.cache_path
    assert changed.tokenizer.decode(all_tokens(changed).tolist()).endswith("more<|eos|>")


def test_the_cache_key_names_a_local_source_by_its_files_and_a_tokenizer_file_by_its_contents(tmp_path, monkeypatch):
    """The raw strings were keyed: launched from another folder, or given as ./x or /abs/x, the same file and
    tokenizer were tokenized again into a second cache."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text(TEXT)
    tokenizer = make(tmp_path, work / "a.txt", tokenizer="bpe:300").cache_path / "tokenizer.json"
    monkeypatch.chdir(work)
    (tmp_path / "link").symlink_to(work)  # the same folder reached through a symlink
    spellings = [str(work / "a.txt"), "a.txt", "./a.txt", "../work/a.txt", "../link/a.txt", ".", "*.txt"]
    paths = {make(tmp_path, source, tokenizer="gpt2").cache_path for source in spellings}
    assert len(paths) == 1 and next(iter(paths)).name.startswith("a-txt-gpt2-")  # named after the file
    paths = {
        make(tmp_path, "a.txt", tokenizer=spec).cache_path for spec in (str(tokenizer), os.path.relpath(tokenizer))
    }
    assert len(paths) == 1
    assert make(tmp_path, "a.txt", tokenizer="gpt2").cache_path not in paths  # another tokenizer, another cache


def test_empty_documents_are_left_out_not_written_as_a_lone_eos(tmp_path):
    """Hub corpora hold empty rows (wikitext: a third of them): each was an EOS of its own, EOS EOS pairs the model
    trained and was scored on, where lm eval --task lm leaves them out."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["hello", "", "world", "", ""]))
    dm = make(tmp_path, path, block_size=2)
    assert dm.tokenizer.decode(all_tokens(dm).tolist()) == "hello<|eos|>world<|eos|>"
    assert dm.meta["num_documents"] == 2 and dm.meta["empty_documents_skipped"] == 3


def test_a_cache_that_cannot_be_written_is_a_one_line_error(tmp_path, text_file, monkeypatch):
    import errno

    import lm.data

    with pytest.raises(LMError, match=r"cannot write .*corpus.txt/cache: .*Not a directory"):
        make(tmp_path, text_file, cache_dir=str(text_file / "cache"))  # under a file: a traceback before

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    write_tokens = lm.data.write_tokens
    monkeypatch.setattr(lm.data, "write_tokens", full)
    with pytest.raises(LMError, match="cannot write .*: No space left on device"):
        make(tmp_path, text_file)
    assert not list((tmp_path / "cache").iterdir())  # and its half-written work folder is gone
    # the disk fills up earlier, in datasets' copy of the text into the cache folder: it said "could not read it"
    import datasets.arrow_writer

    monkeypatch.setattr(lm.data, "write_tokens", write_tokens)
    for name in ("write", "write_batch", "write_table", "write_examples_on_file", "write_rows_on_file"):
        monkeypatch.setattr(datasets.arrow_writer.ArrowWriter, name, full)
    with pytest.raises(LMError, match="cannot write .*: No space left on device"):
        make(tmp_path, text_file)


def test_interrupted_preparation_is_not_trusted(tmp_path, text_file):
    dm = PretrainData(source=str(text_file), block_size=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(LMError, match="run prepare_data"):
        dm.setup("fit")
    dm.prepare_data()
    path = dm.cache_path
    (path / "meta.json").unlink()  # as if a run died before finishing
    (path / "tokens.bin").write_bytes(b"\0\0")  # and what it left is garbage
    with pytest.raises(LMError, match="run prepare_data"):
        dm.setup("fit")
    dm.prepare_data()
    assert not dm.reused_cache
    dm.setup("fit")
    assert dm.tokenizer.decode(all_tokens(dm).tolist()) == TEXT + "<|eos|>"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary directories left behind


def test_half_built_caches_of_killed_runs_on_this_host_are_removed(tmp_path, text_file):
    """A run killed while tokenizing (SIGKILL, out of memory) leaves its work directory; the next preparation removes
    it, even when the cache was finished since, once no process holds the directory's lock. A directory whose
    builder runs stays (in any process namespace: the lock is the kernel's), and so does another host's."""
    import socket
    import subprocess
    import sys

    from lm.data import WORK_LOCK, lock_work_dir

    path = make(tmp_path, text_file).cache_path
    host = socket.gethostname()
    two_hours_ago = time.time() - 2 * 3600

    def work_dir(name: str, *, lock_file: bool = True, old: bool = False) -> Path:
        work = path.parent / name
        (work / "scratch").mkdir(parents=True)
        (work / "scratch" / "tokens.bin").write_bytes(b"\0" * 1000)
        if lock_file:
            (work / WORK_LOCK).touch()
        if old:
            for p in [work, *work.rglob("*")]:
                os.utime(p, (two_hours_ago, two_hours_ago))
        return work

    killed = work_dir(f".{path.name}.tmp@{host}@a1")  # its builder is gone: nobody holds the lock
    killed_before_locking = work_dir(f".{path.name}.tmp@{host}@a2", lock_file=False, old=True)
    live = work_dir(f".{path.name}.tmp@{host}@a3")
    builder = subprocess.Popen(  # another process holds live's lock, as a running preparation does
        [
            sys.executable,
            "-c",
            # lock_work_dir's flock, without importing lm (seconds of torch)
            f"import fcntl, sys; held = open({str(live / WORK_LOCK)!r}, 'w'); fcntl.flock(held, fcntl.LOCK_EX); "
            "print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert builder.stdout.readline() == "locked\n"
    kept = [
        live,
        work_dir(f".{path.name}.tmp@{host}@a4", lock_file=False),  # no lock yet, and new: being created
        work_dir(f".{path.name}.tmp@elsewhere@a5"),  # another host's: its lock may not show here
        work_dir(f".other.tmp@{host}@a6"),  # another cache's
        work_dir(f".{path.name}.new@a7", lock_file=False, old=True),  # being locked before it is named .tmp@
    ]
    own = lock_work_dir(kept[1])  # this process holds one too: a second open of the file cannot take it
    try:
        again = make(tmp_path, text_file)  # the cache is complete: reused, and the stale directories still go
        assert again.reused_cache
        assert not killed.exists() and not killed_before_locking.exists() and all(w.is_dir() for w in kept)
        assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name] + [w.name for w in kept])
    finally:
        builder.communicate("")
        own.close()
    shutil.rmtree(path)
    rebuilt = make(tmp_path, text_file)  # both builders have ended: their directories go; a new build leaves nothing
    assert not rebuilt.reused_cache and rebuilt.tokenizer.decode(all_tokens(rebuilt).tolist()) == TEXT + "<|eos|>"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name] + [w.name for w in kept[2:]])
    assert not (path / WORK_LOCK).exists()


def test_same_seed_same_batches_and_epochs_differ(tmp_path, text_file):
    a, b = make(tmp_path, text_file), make(tmp_path, text_file)
    first_a, first_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert torch.equal(first_a["input_ids"], first_b["input_ids"])
    other = next(iter(make(tmp_path, text_file, seed=7).train_dataloader()))
    assert not torch.equal(first_a["input_ids"], other["input_ids"])

    sampler = RandomWindowSampler(10_000, block_size=8, batch_size=4, seed=1)
    epoch0, epoch1 = list(sampler), list(sampler)  # a finished epoch advances by itself
    assert len(epoch0) == len(epoch1) == 10_000 // 32
    assert not np.array_equal(np.stack(epoch0), np.stack(epoch1))
    sampler.set_epoch(0)
    assert np.array_equal(np.stack(list(sampler)), np.stack(epoch0))
    starts = np.stack(epoch0 + epoch1)
    assert starts.min() >= 0 and starts.max() <= 10_000 - 8 - 1


def test_window_starts_reach_the_last_window_that_still_has_its_labels():
    """A window at start s reads tokens s..s+T (inputs and their next-token labels), so the starts are 0..n-T-1: the
    last one included (the end of the corpus is trained on), none past it."""
    num_tokens, block_size = 20, 8
    sampler = RandomWindowSampler(num_tokens, block_size=block_size, batch_size=4, seed=0)
    starts = set()
    for epoch in range(100):  # 4 draws an epoch, of 12 values
        sampler.set_epoch(epoch)
        starts.update(int(s) for batch in sampler for s in batch)
    assert starts == set(range(num_tokens - block_size))


def test_sampler_state_dict_resumes_exactly(tmp_path):
    sampler = RandomWindowSampler(10_000, block_size=8, batch_size=4, seed=3)
    sampler.set_epoch(2)
    it = iter(sampler)
    seen = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "batches_yielded": 5, "epoch_offset": 0}
    rest = list(it)

    resumed = RandomWindowSampler(10_000, block_size=8, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # Lightning calls this at the epoch start; it must not rewind
    assert np.array_equal(np.stack(list(resumed)), np.stack(rest))
    assert len(seen) + len(rest) == len(sampler)
    assert resumed.state_dict() == {"epoch": 3, "batches_yielded": 0, "epoch_offset": 0}

    shifted = RandomWindowSampler(10_000, block_size=8, batch_size=4, seed=3)  # resumed after a mid-epoch stop
    shifted.load_state_dict({**state, "epoch_offset": 1})
    shifted.set_epoch(3)  # Lightning's epoch is one ahead: still the rest of the sampler's epoch 2
    assert np.array_equal(np.stack(list(shifted)), np.stack(rest))


def test_ranks_draw_disjoint_batches():
    kwargs = dict(block_size=8, batch_size=4, seed=0, world_size=2)
    rank0 = RandomWindowSampler(10_000, rank=0, **kwargs)
    rank1 = RandomWindowSampler(10_000, rank=1, **kwargs)
    b0, b1 = np.stack(list(rank0)), np.stack(list(rank1))
    assert len(b0) == len(b1) == 10_000 // 32 // 2  # equal counts, so DDP ranks step together
    everything = rank0.epoch_draws(0)
    assert np.array_equal(everything[0::2], b0) and np.array_equal(everything[1::2], b1)
    assert not {tuple(r) for r in b0} & {tuple(r) for r in b1}


def test_token_dtype_choice(tmp_path, text_file):
    assert token_dtype(71) == np.uint16 and token_dtype(65_535) == np.uint16
    # a 2^16 vocabulary's ids end at 65,535, which uint16 holds: it was given uint32, a file twice the size
    assert token_dtype(65_536) == np.uint16 and np.array([65_535], token_dtype(65_536)).item() == 65_535
    assert token_dtype(65_537) == np.uint32 and token_dtype(100_277) == np.uint32
    dm = make(tmp_path, text_file, tokenizer="gpt2")  # GPT-2's 50k vocabulary still fits 16 bits
    assert dm.train_tokens.dtype == np.uint16 and dm.meta["dtype"] == "uint16"
    assert dm.tokenizer.decode(all_tokens(dm).tolist()) == TEXT + "<|endoftext|>"


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe:300", "char"])
def test_tokens_are_each_document_encoded_whole_then_eos(tmp_path, monkeypatch, tokenizer):
    """tokens.bin against the simplest reference, `encode(document) + [eos]` per document in source order, with
    small pieces and batches so that long documents are cut, batches hold several documents and threads share them."""
    import lm.data
    import lm.tokenizer

    rng = random.Random(0)
    parts = ["word", " word", "\n", "\n\n", "  \n", " ", "\t", "é", "日本", "🤖", "12", "'s", "!\n", "X\nY"]
    parts += ["<|endoftext|>", "<|user|>", "<|eos|>"]  # special-token strings in the data stay plain text
    docs = ["".join(rng.choice(parts) for _ in range(rng.randrange(3000))) for _ in range(30)]
    docs[3:3] = ["", "a", "\n\n\n"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    monkeypatch.setattr(lm.tokenizer.GPT2Tokenizer, "piece_chars", 300)
    monkeypatch.setattr(lm.tokenizer.BPETokenizer, "piece_chars", 300)
    monkeypatch.setattr(lm.tokenizer, "_TASK_CHARS", 1000)  # several tasks per thread (tiktoken)
    monkeypatch.setattr(lm.tokenizer, "_HF_CALL_CHARS", 2000)  # several calls per batch (HF tokenizers)
    monkeypatch.setattr(lm.data, "BATCH_CHARS", 5000)

    for num_proc in (1, 3):
        dm = make(tmp_path, path, tokenizer=tokenizer, num_proc=num_proc, cache_dir=str(tmp_path / f"c{num_proc}"))
        tok = dm.tokenizer
        reference = [i for doc in docs if doc for i in tok.encode(doc) + [tok.eos_id]]  # an empty one: no EOS
        assert all_tokens(dm).tolist() == reference
        assert dm.meta["num_documents"] == len(docs) - 1 and dm.meta["num_tokens"] == len(reference)


@pytest.mark.parametrize(
    ("spec", "message"), [("bpe:100", "vocab size must exceed 262"), ("bpe:4k", "expected bpe:N with N a whole number")]
)
def test_a_bad_bpe_spec_is_refused_before_any_document_is_read(tmp_path, spec, message):
    # The source does not exist: had the documents been read first, the error would name the missing file instead.
    with pytest.raises(LMError, match=message):
        make(tmp_path, tmp_path / "missing.txt", tokenizer=spec)


def test_user_errors(tmp_path, text_file):
    with pytest.raises(LMError, match="missing.txt"):
        make(tmp_path, tmp_path / "missing.txt")
    with pytest.raises(LMError, match="nothing-here"):
        make(tmp_path, tmp_path / "nothing-here" / "*.txt")
    path = tmp_path / "rows.jsonl"
    path.write_text('{"content": "hello"}\n')
    with pytest.raises(LMError, match=r"no column 'text'.*content"):
        make(tmp_path, path)
    with pytest.raises(LMError, match="context longer than the data"):
        make(tmp_path, text_file, block_size=5_000)
    path.write_text('{"text": "hello"}\n{"text": null}\n{"other": "x"}\n')  # a null and a missing text
    with pytest.raises(
        LMError, match=r"2 documents have no 'text' \(missing or null\), the first is document 2 \(counting from 1\)"
    ):
        make(tmp_path, path)
    path.write_text('{"text": ["a", "list"]}\n')
    with pytest.raises(LMError, match="column 'text' holds lists/structs, not text"):
        make(tmp_path, path)
    path.write_text('{"text": "abc"}\n{"text": 5}\n')  # was "holds lists/structs": there were none
    import datasets

    # datasets < 4.7 (no Json feature) cannot load such a column at all: a one-line error all the same
    mixed = r"mixes text with other types: document 2 \(counting from 1\) holds a value of type int"
    with pytest.raises(LMError, match=mixed if hasattr(datasets.features, "Json") else "could not read it as json"):
        make(tmp_path, path)
    with pytest.raises(LMError, match="builtin:shakespeare"):
        make(tmp_path, "builtin:nope")
    with pytest.raises(LMError, match="val_fraction"):
        PretrainData(val_fraction=1.0)
    for threads in (0, -1):  # 0 ran on every CPU, as null does; -1 on one
        with pytest.raises(LMError, match=rf"data.num_proc must be >= 1 \(or null for every CPU .*\), got {threads}"):
            PretrainData(num_proc=threads)


def test_a_json_text_column_of_other_types_names_a_value_even_without_text_among_them(tmp_path):
    """A column that datasets reads as Json (values of several types) was named "lists/structs" unless it also held
    text: a number and a list, or a limit whose first documents are numbers (streamed, with the Json type the rest of
    the file gives the column)."""
    import datasets

    from lm.data import load_documents

    if not hasattr(datasets.features, "Json"):
        pytest.skip("datasets < 4.7 cannot load such a column at all")
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": 5}\n{"text": [1]}\n')
    with pytest.raises(LMError, match=r"column 'text' holds no text: document 1 \(counting from 1\) holds a value of"):
        load_documents(str(path), hf_cache_dir=str(tmp_path / "hf"))
    path.write_text('{"text": 5}\n{"text": "abc"}\n')
    with pytest.raises(LMError, match=r"holds no text: document 1 \(counting from 1\) holds a value of type int"):
        load_documents(str(path), limit=1, hf_cache_dir=str(tmp_path / "hf"))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_text_that_is_not_utf8_in_a_jsonl_or_parquet_file_is_a_one_line_error(tmp_path, kind):
    # Arrow's JSON and Parquet readers keep a string's bytes as they are: the first read of the text in Python (the
    # char vocabulary's training) stopped the run with a UnicodeDecodeError traceback
    path = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        offsets = pa.py_buffer(np.array([0, 4, 8], dtype=np.int32).tobytes())
        column = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"finecaf\xe9")])
        pq.write_table(pa.table({"text": column}), path)
    with pytest.raises(LMError, match=r"document 2 \(counting from 1\) holds a 'text' that is not UTF-8"):
        make(tmp_path, path)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])
def test_an_empty_json_file_holds_no_text_as_an_empty_text_file_does(tmp_path, name):
    (tmp_path / name).write_text("")  # datasets' JSON builder stopped with a bare StopIteration traceback
    with pytest.raises(LMError, match="holds no text"):
        make(tmp_path, tmp_path / name)


def test_a_jsonl_file_of_blank_lines_among_others_is_left_out(tmp_path):
    # read first, its columns (none) did not match the next file's: "An error occurred while generating the dataset"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-0.jsonl").write_text("\n\n")
    (corpus / "part-1.jsonl").write_text('{"text": "first document"}\n{"text": "second document"}\n')
    dm = make(tmp_path, corpus, block_size=4, val_fraction=0.5)
    assert dm.tokenizer.decode(all_tokens(dm).tolist()) == "first document<|eos|>second document<|eos|>"


@pytest.mark.parametrize("empty_list", ["[]", "\ufeff[ ]\n"])
def test_a_json_file_holding_an_empty_list_holds_no_text(tmp_path, empty_list):
    # datasets stopped with 'Instruction "train" corresponds to no data!' (one file) or "An error occurred while
    # generating the dataset" (among others): no rows, as an empty file
    (tmp_path / "empty.json").write_text(empty_list, encoding="utf-8")
    with pytest.raises(LMError, match="holds no text"):
        make(tmp_path, tmp_path / "empty.json")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-0.json").write_text(empty_list, encoding="utf-8")
    (corpus / "part-1.json").write_text('[{"text": "first document"}, {"text": "second document"}]')
    dm = make(tmp_path, corpus, block_size=4, val_fraction=0.5)
    assert dm.tokenizer.decode(all_tokens(dm).tolist()) == "first document<|eos|>second document<|eos|>"
    # a list that is not empty, or JSON Lines that open with one, is read (and refused) as before
    (corpus / "part-0.json").write_text("[]\n[1]\n")
    with pytest.raises(LMError, match="could not read it as json"):
        make(tmp_path, corpus, block_size=4, val_fraction=0.5)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_a_file_that_adds_a_column_is_named_with_the_columns(tmp_path, kind):
    # datasets reads a source's files as one table: a later file with another column stopped it with "An error
    # occurred while generating the dataset", naming neither the file nor the columns
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    parts = [[{"text": "first document"}], [{"text": "second document"}, {"text": "third", "url": "u"}]]
    for i, records in enumerate(parts):
        path = corpus / f"part-{i}.{kind}"
        if kind == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        elif kind == "json":
            path.write_text(json.dumps(records))
        else:  # a Parquet file has one set of columns: the second holds only the record that adds one
            pq.write_table(pa.Table.from_pylist(records[-1:]), path)
    where = {"jsonl": "part-1.jsonl:2", "json": "part-1.json, record 2", "parquet": "part-1.parquet"}[kind]
    message = rf"{where} has the columns \['text', 'url'\], not those of the records read before it, \['text'\]"
    with pytest.raises(LMError, match=message):
        make(tmp_path, corpus)
    # a file that leaves out a column the first has: datasets 5 reads it (its documents are all there); 3 and 4 stop
    # at it, and then it is the file named, not a record
    for i, records in enumerate(reversed(parts)):
        path = corpus / f"part-{i}.{kind}"
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(records[-1:]), path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
    if int(datasets.__version__.split(".")[0]) >= 5:
        dm = make(tmp_path, corpus, block_size=2, val_fraction=0.5)
        assert "third<|eos|>" in dm.tokenizer.decode(all_tokens(dm).tolist())
    else:
        message = (
            rf"part-1.{kind} has the columns \['text'\], not those of the records read before it, \['text', 'url'\]"
        )
        with pytest.raises(LMError, match=message):
            make(tmp_path, corpus, block_size=2, val_fraction=0.5)


@pytest.mark.parametrize(("name", "compression"), [("corpus.txt", ".gz"), ("rows.jsonl", ".bz2"), ("rows.json", ".xz")])
def test_compressed_text_and_json_files_are_read_as_the_files_themselves(tmp_path, name, compression):
    # they were refused ("unsupported file type"), or a missing one taken for a hub id, though datasets reads them
    import bz2
    import gzip
    import lzma

    records = [{"text": "first document\n"}, {"text": "second document"}]
    data = {
        "corpus.txt": "\ufeffSpeaker 1:\r\nLine one.\n".encode(),  # the byte-order mark and \r\n go, as uncompressed
        "rows.jsonl": "".join(json.dumps(r) + "\n" for r in records).encode(),
        "rows.json": json.dumps(records).encode(),
    }[name]
    plain, compressed = tmp_path / "plain" / name, tmp_path / "compressed" / (name + compression)
    for path, content in (
        (plain, data),
        (compressed, {".gz": gzip, ".bz2": bz2, ".xz": lzma}[compression].compress(data)),
    ):
        path.parent.mkdir()
        path.write_bytes(content)
    expected = all_tokens(make(tmp_path, plain, block_size=2, val_fraction=0.5))
    dm = make(tmp_path, compressed, block_size=2, val_fraction=0.5)
    assert all_tokens(dm).tolist() == expected.tolist() and "\ufeff" not in dm.tokenizer.decode(expected.tolist())
    compressed.write_bytes(compressed.read_bytes()[:20])  # cut short: named, in one line
    with pytest.raises(LMError, match=rf"{re.escape(compressed.name)}: Compressed file ended before"):
        make(tmp_path, compressed, block_size=2, val_fraction=0.5)
    (compressed.parent / name).write_bytes(data)  # the same documents twice in one folder
    with pytest.raises(LMError, match=rf"holds both .*{re.escape(name)} and its compressed copy"):
        make(tmp_path, compressed.parent)
    with pytest.raises(LMError, match="no such file"):  # a path, not a hub id
        make(tmp_path, f"missing/{name}{compression}")
    (tmp_path / "rows.parquet.gz").write_bytes(b"")  # Parquet compresses inside: none ships compressed again
    with pytest.raises(LMError, match="unsupported file type .* text and JSON files may be compressed"):
        make(tmp_path, tmp_path / "rows.parquet.gz")


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_a_limit_reads_a_local_source_no_further_than_its_documents(tmp_path, kind):
    # lm eval --limit 100 copied a whole local corpus (tens of GB) into datasets' cache before taking 100 documents
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lm.data import load_documents

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = ["first document", "second document", "third document"]
    if kind == "txt":  # one document per file
        for i, text in enumerate(texts):
            (corpus / f"part-{i}.txt").write_text(text)
    elif kind == "jsonl":
        (corpus / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    else:
        pq.write_table(pa.table({"text": texts}), corpus / "part-0.parquet")
    # a last file that cannot be read: reading it at all fails the source
    (corpus / f"part-9.{kind}").write_bytes(b"\xff\xfe not text, JSON or Parquet")
    hf_cache = tmp_path / "hf"
    documents = load_documents(str(corpus), limit=2, hf_cache_dir=str(hf_cache))
    assert documents["text"] == texts[:2]
    if kind != "txt":  # streamed: no Arrow copy of the files
        assert not list(hf_cache.rglob("*.arrow"))
    with pytest.raises(LMError, match="could not read it as"):  # read whole, it fails on the last file
        load_documents(str(corpus), hf_cache_dir=str(hf_cache))
    with pytest.raises(LMError, match="could not read it as"):  # and so does a limit past the documents before it
        load_documents(str(corpus), limit=4, hf_cache_dir=str(hf_cache))


def test_a_parquet_file_cut_short_is_named(tmp_path):
    # "could not read it as parquet: An error occurred while generating the dataset", naming no file
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"text": ["first document"]}), corpus / "part-0.parquet")
    pq.write_table(pa.table({"text": ["second document"]}), corpus / "part-1.parquet")
    (corpus / "part-1.parquet").write_bytes((corpus / "part-1.parquet").read_bytes()[:30])  # a copy interrupted
    with pytest.raises(LMError, match=r"part-1\.parquet: not a Parquet file \(Parquet magic bytes not found"):
        make(tmp_path, corpus)


def test_a_folder_written_by_save_to_disk_is_refused_in_one_line(tmp_path):
    # its state.json and dataset_info.json were read as documents: "An error occurred while generating the dataset"
    import datasets

    dataset = datasets.Dataset.from_dict({"text": ["first document", "second document"]})
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    for folder in ("saved", "saved_dict"):
        with pytest.raises(LMError, match="a folder written by datasets' save_to_disk, whose Arrow files lm does not"):
            make(tmp_path, tmp_path / folder)


def test_a_parquet_file_of_no_rows_among_others_is_left_out(tmp_path):
    # Spark writes such part files; datasets failed the whole source on one ("BatchSize must be greater than 0"),
    # as "could not read it as parquet: An error occurred while generating the dataset"
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), corpus / "part-0.parquet")
    pq.write_table(pa.table({"text": ["first document", "second document"]}), corpus / "part-1.parquet")
    dm = make(tmp_path, corpus, block_size=4, val_fraction=0.5)
    assert dm.meta["num_documents"] == 2
    assert dm.tokenizer.decode(all_tokens(dm).tolist()) == "first document<|eos|>second document<|eos|>"
    with pytest.raises(LMError, match="holds no text"):
        make(tmp_path, corpus / "part-0.parquet")


def test_a_jsonl_line_with_a_lone_surrogate_escape_is_named(tmp_path):
    # Arrow's JSON reader refuses the file, and the error named no line: "An error occurred while generating the
    # dataset" (an escaped pair, a whole emoji, reads as usual)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "whole \\ud83d\\ude00"}\n{"text": "cut \\ud83d"}\n')
    with pytest.raises(LMError, match=r"rows.jsonl:2: a lone surrogate escape"):
        make(tmp_path, path)


def test_a_cache_or_hidden_folder_inside_a_corpus_folder_is_not_data(tmp_path):
    corpus = tmp_path / "corpus"
    for name in ("a.txt", "b.txt", ".git/notes.txt"):
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(f"text of {name}\n" * 50)
    first = make(tmp_path, corpus, cache_dir=str(corpus / "cache"))  # its meta.json used to join the source
    again = make(tmp_path, corpus, cache_dir=str(corpus / "cache"))  # and change its key: "no prepared data"
    assert again.meta["num_documents"] == first.meta["num_documents"] == 2
    assert "notes" not in first.tokenizer.decode(all_tokens(first).tolist())
    # the same through a glob (it read the cache's meta.json as a document: "could not read it as json")
    (corpus / "c.json").write_text('{"text": "one document of the corpus"}\n' * 20)
    globbed = make(tmp_path, f"{corpus}/**/*.json", cache_dir=str(corpus / "cache"))
    assert globbed.meta["num_documents"] == 20


def test_a_missing_path_is_not_taken_for_a_hub_id(tmp_path):
    for source in (tmp_path / "no-such-folder", "./corpus", "data/more/corpus"):
        with pytest.raises(LMError, match="no such file"):
            make(tmp_path, source)


def test_token_ids_past_the_file_dtype_are_an_error_not_wrapped_round(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "the": 1, "zebra": 70_000}  # ids with a gap: 3 entries, largest id 70,000
    backend = HFTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    path = tmp_path / "zoo.txt"
    path.write_text("the zebra the zebra\n" * 40)
    dm = make(tmp_path, path, tokenizer=str(tmp_path / "tokenizer.json"))
    assert dm.tokenizer.vocab_size > 70_000 and dm.meta["dtype"] == "uint32"  # it counted 3 + specials: uint16
    assert 70_000 in all_tokens(dm).tolist()  # stored as 70,000, not 70,000 - 65,536
    tokenizer = dm.tokenizer
    with pytest.raises(LMError, match="token id 70000 does not fit the token file's uint16"):
        write_tokens([["the zebra"]], tokenizer, tmp_path / "t.bin", dtype=np.dtype(np.uint16), num_threads=1)


def test_hub_id_fails_fast_offline(tmp_path):
    with pytest.raises(LMError, match="some-org/some-dataset.*offline"):
        make(tmp_path, "some-org/some-dataset")


def test_a_damaged_token_cache_is_built_again(tmp_path, text_file):
    """meta.json was the only check: a tokens.bin truncated since (a crash before the data reached the disk, a full
    disk, a cleanup) was used as it was, moving the train/val split silently; a deleted one was a traceback."""
    import os

    first = make(tmp_path, text_file)
    tokens = first.cache_path / "tokens.bin"
    expected = np.concatenate([first.train_tokens, first.val_tokens]).copy()
    for damage in (lambda: os.truncate(tokens, tokens.stat().st_size // 2), tokens.unlink):
        damage()
        with pytest.raises(LMError, match="the cached tokens in .* are damaged"):  # a rank that did not prepare
            first.setup("fit")
        again = make(tmp_path, text_file)  # prepare_data, then setup
        assert not again.reused_cache and np.array_equal(all_tokens(again), expected)


def test_a_damaged_token_cache_that_cannot_be_removed_is_a_one_line_error(tmp_path, text_file, monkeypatch):
    """On a read-only mount (or another user's cache) removing the damaged cache's meta.json raised a traceback."""
    first = make(tmp_path, text_file)
    os.truncate(first.cache_path / "tokens.bin", 10)
    unlink = Path.unlink

    def read_only(self, *args, **kwargs):
        if self.name == "meta.json":
            raise OSError(30, "Read-only file system", str(self))
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(LMError, match=r"damaged .* cannot tokenize them again there \(Read-only file system\)"):
        make(tmp_path, text_file)


def test_hub_options_on_a_local_source_are_refused_or_dropped(tmp_path, text_file):
    """source_split: validation on a local file trained on that file, and config or revision keyed a second cache of
    the same tokens. A split is refused (it cannot mean anything here); a config or revision, which a hub recipe such
    as gpt2_124m.yaml carries into a run on a local file, is dropped."""
    with pytest.raises(LMError, match="source_split: for hub datasets only"):
        PretrainData(source=str(text_file), source_split="validation")
    with pytest.raises(LMError, match="source_split: for hub datasets only"):
        ChatData(source="task:addition", source_split="test")
    plain = make(tmp_path, text_file)
    hub_options = make(tmp_path, text_file, source_config="sample-10BT", source_revision="v1")
    assert hub_options.cache_path == plain.cache_path and hub_options.reused_cache


def test_a_hub_revision_is_read_and_keys_the_cache(tmp_path, monkeypatch):
    """The hub path as it runs online, with datasets.load_dataset standing in for the download: the revision goes to
    load_dataset, into meta.json and into the cache key (no revision keeps the key it had before the option)."""
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        text = f"text of {kwargs.get('revision')} " * 20
        return datasets.Dataset.from_dict({"content": [text, text.upper()], "id": [1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pinned = make(tmp_path, "org/corpus", source_revision="abc123", text_field="content", source_config="en")
    assert calls == [
        ("org/corpus", {"name": "en", "split": "train", "revision": "abc123", "data_dir": None, "streaming": False})
    ]
    assert pinned.meta["source_revision"] == "abc123"
    assert pinned.tokenizer.decode(pinned.train_tokens[:16].tolist()) == "text of abc123 t"
    other = make(tmp_path, "org/corpus", source_revision="def456", text_field="content", source_config="en")
    default = make(tmp_path, "org/corpus", text_field="content", source_config="en")
    assert len({pinned.cache_path, other.cache_path, default.cache_path}) == 3 and len(calls) == 3
    assert default.meta["source_revision"] is None and calls[-1][1]["revision"] is None
    make(tmp_path, "org/corpus", source_revision="abc123", text_field="content", source_config="en")
    assert len(calls) == 3  # prepared once per revision
    # the key without the option's entry, as the code before it gave (format 3; format 2 named this
    # corpus-char-816349bec1cdf248, format 1 corpus-char-14717f724755f37c)
    assert default.cache_path.name == "corpus-char-00651d66181c4f0e"


def test_a_hub_data_dir_is_read_and_keys_the_cache_only_when_set(tmp_path, text_file, monkeypatch, caplog):
    """Anthropic/hh-rlhf keeps helpful-base in a folder, not a config: only load_dataset(..., data_dir="helpful-base")
    reads it, and there was no setting for it (every folder was read, harmless-base too). It goes to load_dataset,
    streamed or not, into the cache key only when set (the key without it is the one it had before the option) and into
    the hub error; a local source drops it with the log line of source_config, and reads as before."""
    import datasets

    from lm.data import load_documents

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        text = f"text of {kwargs.get('data_dir')} " * 20
        if kwargs.get("streaming"):
            return datasets.IterableDataset.from_generator(lambda: iter([{"text": text}, {"text": text.upper()}]))
        return datasets.Dataset.from_dict({"text": [text, text.upper()]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    folder = make(tmp_path, "org/hh", source_data_dir="helpful-base")
    assert calls == [
        ("org/hh", {"name": None, "split": "train", "revision": None, "data_dir": "helpful-base", "streaming": False})
    ]
    assert folder.meta["source_data_dir"] == "helpful-base"
    assert folder.tokenizer.decode(folder.train_tokens[:20].tolist()) == "text of helpful-base"
    whole = make(tmp_path, "org/hh")
    assert calls[-1][1]["data_dir"] is None and whole.cache_path != folder.cache_path
    assert whole.cache_path.name == "hh-char-9af8f9731abcac61"  # the key the code before the option gave
    make(tmp_path, "org/hh", source_data_dir="helpful-base")
    assert len(calls) == 2  # prepared once per folder
    streamed = load_documents("org/hh", source_data_dir="harmless-base", limit=1)
    assert calls[-1][1]["data_dir"] == "harmless-base" and calls[-1][1]["streaming"]
    assert streamed["text"] == ["text of harmless-base " * 20]

    monkeypatch.undo()  # offline: the hub error names the folder (one not prepared yet)
    with pytest.raises(LMError, match=r"'org/hh' \(config=None, split=train, revision=None, data_dir=red-team\)"):
        make(tmp_path, "org/hh", source_data_dir="red-team")

    plain = make(tmp_path, text_file)
    with caplog.at_level("INFO"):
        local = make(tmp_path, text_file, source_data_dir="helpful-base")
    assert local.source_data_dir is None and local.cache_path == plain.cache_path and local.reused_cache
    assert "source_data_dir are for hub datasets; " in caplog.text and "ignores them" in caplog.text
    for builtin_or_task in (
        PretrainData(source="builtin:shakespeare", source_data_dir="x"),
        ChatData(source_data_dir="x"),
    ):
        assert builtin_or_task.source_data_dir is None


def test_tokenizer_train_reads_a_hub_dataset_s_data_dir(tmp_path, monkeypatch, capsys):
    """lm tokenizer train had --source_config/--source_revision but no folder: helpful-base of Anthropic/hh-rlhf could
    not be read alone ("unrecognized arguments"). With a local source it is refused, as those are."""
    import datasets

    from lm.__main__ import main

    calls = []

    def hub(source, **kwargs):
        calls.append({"source": source, **kwargs})
        return datasets.Dataset.from_dict({"text": ["hello world", "hello there"]})

    monkeypatch.setattr(datasets, "load_dataset", hub)
    main(["tokenizer", "train", "--source", "org/hh", "--kind", "char", "--source_data_dir", "helpful-base",
          "--out", str(tmp_path / "tok")])  # fmt: skip
    (call,) = calls
    assert (call["source"], call["data_dir"], call["name"], call["revision"]) == ("org/hh", "helpful-base", None, None)
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "train", "--source", str(text), "--kind", "char", "--source_data_dir", "helpful-base",
              "--out", str(tmp_path / "tok2")])  # fmt: skip
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: source_data_dir: for hub datasets only")


def test_builtin_shakespeare(tmp_path):
    docs = builtin_documents("shakespeare")
    text = "".join(docs)
    assert len(docs) == 38 and len(text) > 4_000_000
    assert re.search(r"^ROMEO:$", text, re.M) and re.search(r"^HAMLET:$", text, re.M)
    assert "*" not in text and not re.search(r"^[#_]", text, re.M) and "\n\n\n" not in text  # Edward III had 264 *
    assert docs == builtin_documents("shakespeare")  # deterministic order

    dm = make(tmp_path, "builtin:shakespeare")  # the quickstart default, char-tokenized (~2 s)
    assert dm.meta["num_documents"] == 38 and dm.meta["num_tokens"] == len(text) + 38
    assert dm.tokenizer.decode(dm.train_tokens[:7].tolist()) == docs[0][:7]


def test_markdown_play_to_text():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ROMEO and a long\nline of attendants_\n\n"
        "**ROMEO**  \n_\\[Aside]_  \nBut soft, what light  \nthrough yonder window\\--breaks?\n\n\n\n"
        "_Exit_\n\n**JULIET**  \nAy me.\n\n*Enter King Edward, Derby, and  \nArtois.*\n\n**KING EDWARD**  \n"
        "Robert of Artois.\n\n*Sound a horn.*\n\n_\n\n**ROMEO**  \n_Aside, to the audience_  \nAnon.\n"
    )
    assert markdown_play_to_text(markdown) == (
        "ROMEO:\nBut soft, what light\nthrough yonder window--breaks?\n\nJULIET:\nAy me.\n\n"
        "KING EDWARD:\nRobert of Artois.\n\nROMEO:\nAnon.\n"
    )


def test_trainer_fit_with_datamodule(tmp_path, text_file):
    """The datamodule inside a real Trainer: hooks run, batches reach the model, the tokenizer sizes it."""

    class Tiny(L.LightningModule):
        def setup(self, stage):
            vocab = self.trainer.datamodule.tokenizer.vocab_size
            self.emb = torch.nn.Embedding(vocab, 8)
            self.head = torch.nn.Linear(8, vocab)

        def step(self, batch):
            logits = self.head(self.emb(batch["input_ids"]))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

        def training_step(self, batch, _):
            return self.step(batch)

        def validation_step(self, batch, _):
            self.log("val/loss", self.step(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = PretrainData(source=str(text_file), block_size=8, batch_size=4, cache_dir=str(tmp_path / "cache"))
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(
        max_steps=3, val_check_interval=2, limit_val_batches=2, accelerator="cpu", default_root_dir=tmp_path, **quiet
    )
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.global_step == 3 and "val/loss" in trainer.callback_metrics


class _RecordBatches(L.LightningModule):
    """A model-free module that records a fingerprint of every training batch it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, _):
        self.seen.append(hash(batch["input_ids"].numpy().tobytes()))
        return (batch["input_ids"].float().mean() * self.weight).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("stop", ["mid-epoch0", "mid-epoch1"])
def test_a_finished_run_extended_draws_what_a_longer_run_draws(tmp_path, text_file, stop):
    """max_steps ends a run mid-epoch and Lightning closes that epoch; raising max_steps and resuming from the
    checkpoint saved at the end must draw the rest of that epoch, then the next ones, as one longer run does."""
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")

    def fit(max_steps, ckpt_path=None):
        dm = PretrainData(source=str(text_file), block_size=16, batch_size=64, cache_dir=str(tmp_path / "cache"))
        trainer = L.Trainer(max_steps=max_steps, enable_checkpointing=False, limit_val_batches=0, **quiet)
        module = _RecordBatches()
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, module.seen

    longer_trainer, longer = fit(40)
    per_epoch = longer_trainer.num_training_batches
    assert 3 <= per_epoch < 15, per_epoch  # the longer run crosses several epochs
    first = per_epoch // 2 if stop == "mid-epoch0" else per_epoch + per_epoch // 2
    trainer, _ = fit(first)
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    _, resumed = fit(40, ckpt_path=tmp_path / "end.ckpt")
    assert resumed == longer[first:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_from_a_checkpoint_saved_at_an_epoch_end_draws_the_next_epoch(tmp_path, text_file, num_workers):
    """Lightning's default schedule validates, and a checkpoint callback saves, at each epoch's end. Resumed from
    there, Lightning's epoch numbers run one ahead of the data's: the resumed run used to skip a whole epoch."""
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")

    class Validated(_RecordBatches):
        def validation_step(self, batch, _):
            self.log("v", batch["input_ids"].float().mean())

    def fit(max_steps, ckpt_path=None, callbacks=()):
        dm = PretrainData(
            source=str(text_file),
            block_size=16,
            batch_size=64,
            cache_dir=str(tmp_path / "cache"),
            num_workers=num_workers,
        )
        trainer = L.Trainer(
            max_steps=max_steps,
            limit_val_batches=2,
            num_sanity_val_steps=0,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
            default_root_dir=tmp_path,
            **quiet,
        )
        module = Validated()
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, module.seen

    longer_trainer, longer = fit(30)
    per_epoch = longer_trainer.num_training_batches
    assert 3 <= per_epoch < 10, per_epoch
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1)
    fit(per_epoch + 2, callbacks=[saver])
    _, resumed = fit(30, ckpt_path=tmp_path / "ckpt" / f"step={per_epoch}.ckpt")  # saved at epoch 0's end
    assert resumed == longer[per_epoch:]


def test_short_epochs_from_limit_train_batches_resume_to_the_same_batches(tmp_path, text_file):
    """limit_train_batches ends Lightning's epochs before the sampler's (the loader has fetched a batch ahead that is
    never trained on): a resumed run goes on with the batches one run draws."""
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")

    def fit(max_steps, ckpt_path=None):
        dm = PretrainData(source=str(text_file), block_size=16, batch_size=64, cache_dir=str(tmp_path / "cache"))
        trainer = L.Trainer(
            max_steps=max_steps, limit_train_batches=2, limit_val_batches=0, enable_checkpointing=False, **quiet
        )
        module = _RecordBatches()
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, module.seen

    _, longer = fit(12)
    trainer, first = fit(5)
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    _, resumed = fit(12, ckpt_path=tmp_path / "end.ckpt")
    assert first + resumed == longer and len(set(longer)) == len(longer)  # nothing drawn twice


def test_a_file_system_without_locks_still_prepares_and_nothing_is_removed(tmp_path, text_file, monkeypatch):
    """flock can fail on network mounts: the preparation goes on, and a cleaner, which cannot lock either, leaves
    every work directory alone."""
    import fcntl
    import socket

    from lm.data import WORK_LOCK

    path = make(tmp_path, text_file).cache_path
    shutil.rmtree(path)

    flock = fcntl.flock

    def no_locks(handle, operation):  # only for lm's work directories: datasets locks its own cache files
        fd = handle if isinstance(handle, int) else handle.fileno()
        if os.readlink(f"/proc/self/fd/{fd}").endswith(WORK_LOCK):
            raise OSError(37, "No locks available")
        return flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    other = path.parent / f".{path.name}.tmp@{socket.gethostname()}@b1"
    other.mkdir()
    (other / "lm.lock-free").write_text("a run on a mount without locks")
    (other / WORK_LOCK).touch()
    again = make(tmp_path, text_file)
    assert not again.reused_cache and again.tokenizer.decode(all_tokens(again).tolist()) == TEXT + "<|eos|>"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, other.name])


def test_file_names_with_glob_characters_are_read_as_themselves(tmp_path):
    """datasets reads data_files as globs: "part[1].txt" matched part1.txt, which was read twice and itself never."""
    from lm.data import load_documents

    folder = tmp_path / "run[1]"
    folder.mkdir()
    (folder / "part1.txt").write_text("first file\n")
    (folder / "part[1].txt").write_text("SECOND FILE\n")
    assert sorted(load_documents(str(folder))["text"]) == ["SECOND FILE\n", "first file\n"]
    assert load_documents(str(folder / "part[1].txt"))["text"] == ["SECOND FILE\n"]


def test_symlinked_files_of_a_content_addressed_store_are_read_by_their_link_names(tmp_path):
    """A hub snapshot folder (or git-annex, DVC) links train-00000.jsonl to a blob without an extension."""
    from lm.data import load_documents

    blobs, data = tmp_path / "blobs", tmp_path / "snapshots" / "rev" / "data"
    blobs.mkdir()
    data.mkdir(parents=True)
    (blobs / "9f86d081").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    (blobs / "60303ae2").write_text("plain text")
    (data / "train-00000.jsonl").symlink_to(blobs / "9f86d081")
    (tmp_path / "plain.txt").symlink_to(blobs / "60303ae2")
    assert load_documents(str(data))["text"] == ["doc 0", "doc 1", "doc 2"]
    assert load_documents(str(data / "train-00000.jsonl"))["text"] == ["doc 0", "doc 1", "doc 2"]
    assert load_documents(str(tmp_path / "plain.txt"))["text"] == ["plain text"]


def test_a_byte_order_mark_at_the_start_of_a_text_file_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_text("hello world\n" * 20, encoding="utf-8-sig")  # as Windows editors save UTF-8
    dm = make(tmp_path, tmp_path / "bom.txt")
    assert "\ufeff" not in dm.tokenizer.decode(dm.train_tokens[:16].tolist())
    assert dm.tokenizer.decode(dm.train_tokens[:12].tolist()) == "hello world\n"


def test_overfit_batches_is_refused_in_one_line(tmp_path):
    """Lightning swaps the batch sampler for single windows, then crashed saving the loader's position."""
    (tmp_path / "t.txt").write_text("hello world\n" * 20)
    dm = PretrainData(source=str(tmp_path / "t.txt"), tokenizer="char", block_size=8, cache_dir=str(tmp_path / "c"))
    dm.trainer = L.Trainer(accelerator="cpu", overfit_batches=2, logger=False, enable_checkpointing=False)
    dm.prepare_data()
    with pytest.raises(LMError, match="overfit_batches: not supported by PretrainData"):
        dm.setup("fit")


@pytest.mark.parametrize("kind", ["windows", "chat"])
def test_a_resume_with_another_number_of_ranks_or_batch_size_goes_on_where_the_data_was(kind):
    """Lightning restores its count of each rank's batches; 5 steps of 2 ranks x 4 are 40 items, and read by 1 rank x 8
    as 5 batches of its own they were 40 items too only by luck of the product: 1 x 4 re-trained 20 of them. The
    loader now takes the same place in the data whatever the ranks and batch size (both samplers deal each global
    step the next world_size x batch_size items of one seeded stream)."""
    from lm.chat_data import ShuffledBatchSampler

    def loader(world_size, batch_size, rank, trained):
        if kind == "windows":
            sampler = RandomWindowSampler(
                20_000, block_size=8, batch_size=batch_size, seed=3, rank=rank, world_size=world_size
            )
        else:
            sampler = ShuffledBatchSampler(400, batch_size=batch_size, seed=3, rank=rank, world_size=world_size)
        items = np.arange(20_000)
        return ResumableDataLoader(items, batch_size=None, sampler=sampler, trained_batches=lambda: trained[0])

    def batches(dl, n):
        it = iter(dl)
        return [next(it).tolist() for _ in range(n)]

    trained = [5]  # each of the 2 ranks has trained on 5 batches of 4
    old = [loader(2, 4, rank, trained) for rank in (0, 1)]
    state = old[0].state_dict()
    next_step, step_after = [[x for dl in old for x in batches(dl, 2)[i]] for i in (0, 1)]  # both ranks' next 2 steps
    for world_size, batch_size in ((1, 8), (1, 4), (4, 2)):  # resumed with another shape: Lightning restores 5
        new = [loader(world_size, batch_size, rank, [5]) for rank in range(world_size)]
        for dl in new:
            dl.load_state_dict(state)
        taken = [x for dl in new for batch in batches(dl, 2 * 8 // (world_size * batch_size)) for x in batch]
        assert sorted(taken) == sorted(next_step + step_after), (world_size, batch_size)

    # a further resume in the same shape keeps that place: 1 x 8, saved after 2 more steps (Lightning's count 7)
    count = [5]
    resumed = loader(1, 8, 0, count)
    resumed.load_state_dict(state)
    first, second = batches(resumed, 2)
    count[0] = 6
    saved = resumed.state_dict()
    again = loader(1, 8, 0, [6])
    again.load_state_dict(saved)
    assert sorted(batches(again, 1)[0]) == sorted(second) == sorted(step_after)


@pytest.mark.parametrize("pin_memory", [True, False])
def test_every_data_module_pins_its_batches_on_cuda_unless_told_not_to(tmp_path, text_file, monkeypatch, pin_memory):
    """Pinned batches let Lightning's non_blocking copy to the GPU run beside the GPU's work; the chat and preference
    loaders did not pin. Off CUDA nothing is pinned (pinning needs a GPU)."""
    from lm.chat_data import ChatData
    from lm.preference import PreferenceData

    modules = [
        make(tmp_path, text_file, pin_memory=pin_memory),
        ChatData(source="task:addition", task_size=64, task_val_size=8, batch_size=4, pin_memory=pin_memory),
        PreferenceData(source="task:addition", task_size=64, task_val_size=8, batch_size=4, pin_memory=pin_memory),
    ]
    for dm in modules[1:]:
        dm.setup("fit")
    assert [dm.train_dataloader().pin_memory for dm in modules] == [False] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for dm in modules:
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            assert loader.pin_memory is pin_memory, type(dm).__name__


def test_gpt2_given_as_a_file_or_checkpoint_reuses_the_gpt2_cache(tmp_path):
    """The folder was named by the tokenizer's spelling: gpt2 from a tokenizer file or a GPT-2 model's .ckpt (continued
    pretraining) tokenized the whole corpus again into a second folder, with the same key inside."""
    from lm.tokenizer import GPT2Tokenizer

    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    GPT2Tokenizer().save(tmp_path / "tok")  # what a GPT-2 .ckpt's tokenizer state holds too: {"kind": "gpt2"}
    first = make(tmp_path, tmp_path / "t.txt", tokenizer="gpt2")
    again = make(tmp_path, tmp_path / "t.txt", tokenizer=str(tmp_path / "tok"))
    assert again.reused_cache and again.cache_path == first.cache_path


def test_a_text_field_a_source_does_not_read_is_not_part_of_its_cache_key(tmp_path):
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    first = make(tmp_path, tmp_path / "t.txt")
    again = make(tmp_path, tmp_path / "t.txt", text_field="body")  # a .txt file has no fields: the same tokens
    assert again.reused_cache and again.cache_path == first.cache_path
    (tmp_path / "r.jsonl").write_text('{"a": "xy", "b": "zw"}\n' * 50)  # where it is read, it keys the cache
    assert make(tmp_path, tmp_path / "r.jsonl", text_field="a").cache_path != (
        make(tmp_path, tmp_path / "r.jsonl", text_field="b").cache_path
    )
