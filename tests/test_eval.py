"""`lm eval` and the in-training EvalCallback: bits per byte against a hand-written loop, HellaSwag scoring against a
plain re-implementation, the result JSON, the chat-task hook, and the callback inside a real (tiny) Trainer."""

import json
import math
import re
import warnings
from dataclasses import asdict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

import lm.eval
import lm.tasks
from lm.__main__ import main
from lm.config import GPTConfig, padded_vocab_size
from lm.data import load_documents
from lm.errors import LMError
from lm.eval import EvalCallback, EvalSpec, evaluate, stream_windows
from lm.model import GPT
from lm.tokenizer import CharTokenizer, Tokenizer
from tests.conftest import REPO, cli_env, shared_file

DOCS = ["To be, or not to be, that is the question:\n", "Whether 'tis nobler in the mind to suffer\nThe slings. é\n"]


def write_checkpoint(path, tokenizer: Tokenizer, seed: int = 0, **arch) -> GPT:
    """A checkpoint shaped like the ones `lm fit` writes, around a random-init GPT (weights scaled up so the
    logits are far from uniform and the comparison means something)."""
    config = GPTConfig(vocab_size=padded_vocab_size(tokenizer.vocab_size), **arch)
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
            else:
                p.add_(0.1 * torch.randn_like(p))  # norm gains away from 1: catches a swapped norm
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    lm_info = {"format": 1, "model_config": asdict(config), "tokenizer": tokenizer.to_state(), "run_config": None}
    torch.save({"state_dict": state, "global_step": 3, "lm": lm_info}, path)
    return model.eval()


@pytest.fixture
def text_dir(tmp_path):
    directory = tmp_path / "texts"
    directory.mkdir()
    for i, doc in enumerate(DOCS):
        (directory / f"{i}.txt").write_text(doc, encoding="utf-8")
    return directory


@pytest.fixture
def ckpt(tmp_path):
    """A random-init tiny GPT with a char tokenizer that covers DOCS and the HellaSwag rows below."""
    tokenizer = CharTokenizer.train([*DOCS, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:.,'!? "])
    path = tmp_path / "tiny.ckpt"
    model = write_checkpoint(path, tokenizer, block_size=64, n_layer=2, n_head=2, n_embd=32)
    return path, model, tokenizer


def hand_nats(model: GPT, stream: list[int]) -> float:
    """Every token after the first, one forward per token, context = the tokens since its window of block_size
    began (windows start at multiples of block_size): the definition in lm/eval.py, written the slow way."""
    T, nats = model.config.block_size, 0.0
    with torch.no_grad():
        for i in range(len(stream) - 1):
            context = stream[(i // T) * T : i + 1]
            logits = model(torch.tensor([context]))[0, -1]
            nats -= F.log_softmax(logits.double(), dim=-1)[stream[i + 1]].item()
    return nats


def test_bits_per_byte_equals_hand_computed_nats_over_bytes(ckpt, text_dir, tmp_path, capsys):
    path, model, tokenizer = ckpt
    out = tmp_path / "lm.json"
    main(["eval", "--ckpt", str(path), "--task", "lm", "--data", str(text_dir), "--out", str(out), "--batch_size", "3"])
    record = json.loads(out.read_text())

    stream = [tokenizer.eos_id]
    for doc in DOCS:  # files are read in sorted order: 0.txt, 1.txt
        stream += tokenizer.encode(doc) + [tokenizer.eos_id]
    num_bytes = sum(len(p.read_bytes()) for p in text_dir.iterdir())
    nats = hand_nats(model, stream)
    assert record["metrics"]["tokens"] == len(stream) - 1  # every token once, the EOS after each document included
    assert record["metrics"]["bytes"] == num_bytes
    assert record["metrics"]["bpb"] == pytest.approx(nats / (math.log(2) * num_bytes), rel=1e-5)
    assert record["metrics"]["loss"] == pytest.approx(nats / (len(stream) - 1), rel=1e-5)
    assert (record["task"], record["metric"], record["value"]) == ("lm", "bpb", record["metrics"]["bpb"])
    assert record["num_items"] == 2
    assert record["checkpoint"] == {"path": str(path), "global_step": 3}
    assert record["tokenizer"] == {
        "kind": "char",
        "vocab_size": tokenizer.vocab_size,
        "fingerprint": tokenizer.fingerprint,
    }
    assert {"date", "lm_version"} <= record.keys()
    printed = capsys.readouterr().out
    assert "bpb" in printed and str(out) in printed


def test_sliding_window_scores_every_token_once_with_more_context(ckpt, text_dir):
    _, model, tokenizer = ckpt
    for stride in (1, 5, 16):
        windows = stream_windows(100, 16, stride)
        scored = [p for _, end, start in windows for p in range(start, end)]
        assert scored == list(range(100))
        assert all(end - begin <= 16 for begin, end, _ in windows)
        assert all(start - begin >= 16 - stride for begin, _, start in windows[1:])
    flat, _ = evaluate(model, tokenizer, EvalSpec(task="lm", data=str(text_dir)))
    sliding, _ = evaluate(model, tokenizer, EvalSpec(task="lm", data=str(text_dir), stride=4))
    assert sliding["tokens"] == flat["tokens"] and sliding["bytes"] == flat["bytes"]
    assert sliding["bpb"] != flat["bpb"]


HELLASWAG_ROWS = [
    {"activity_label": "Roof", "ctx": "A man is on a roof. he", "endings": ["is up.", "eats", "runs far away.", "x"]},
    {"activity_label": "Jump", "ctx": "The boy lands [title] on a mat.", "endings": ["a", "bb", "sits."]},
    {"activity_label": "Cats", "ctx": "A cat sits.", "endings": ["It naps.", "It runs, it hides."]},
    {"activity_label": "Dogs", "ctx": "A dog runs. it", "endings": ["barks.", "b", "sleeps all day", "Zzz", "ok"]},
]  # different numbers of endings: each item's scores must be found by a running offset


def plain_loglikelihood(model: GPT, tokenizer, query: str, continuation: str) -> float:
    context = tokenizer.encode(query)
    whole = tokenizer.encode(query + continuation)
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole)))


def test_hellaswag_acc_and_acc_norm_as_lm_eval_defines_them(ckpt, tmp_path):
    path, model, tokenizer = ckpt
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _labelled_by_plain_scores(model, tokenizer)))
    metrics, n = evaluate(model, tokenizer, EvalSpec(task="hellaswag", data=str(data), batch_size=5))
    assert n == 4
    # Every label is the plain argmax of the length-normalised score, so acc_norm is exactly 1; acc counts the items
    # whose unnormalised argmax agrees.
    acc = sum(row["plain_acc"] for row in _labelled_by_plain_scores(model, tokenizer)) / 4
    assert metrics == pytest.approx({"acc": acc, "acc_norm": 1.0})


def test_continuations_are_read_back_from_the_device_once_per_batch(monkeypatch):
    """On a GPU every read of a tensor's value (item, bool, tolist, ...) waits for the device: a read per request
    ran HellaSwag's endings one after another. The scores stay those of one plain forward pass per request."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(64, (n,), generator=generator).tolist()

    requests = [(tokens(1 + i % 9), tokens(1 + i % 5)) for i in range(40)]
    reads = []

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    scores = lm.eval.score_continuations(model, requests, batch_size=16)
    monkeypatch.undo()
    assert len(reads) == 3  # 40 requests, batches of 16: three reads
    with torch.no_grad():
        for (context, continuation), (logprob, greedy) in zip(requests, scores, strict=True):
            whole = context + continuation
            logprobs = F.log_softmax(model(torch.tensor([whole[:-1]]))[0, len(context) - 1 :], dim=-1)
            assert logprob == pytest.approx(logprobs[range(len(continuation)), continuation].sum().item(), abs=1e-5)
            assert greedy == (logprobs.argmax(-1).tolist() == continuation)


def _labelled_by_plain_scores(model, tokenizer) -> list[dict]:
    rows = []
    for row in HELLASWAG_ROWS:
        query = f"{row['activity_label']}: {row['ctx']}".replace(" [title]", ". ").replace("  ", " ")
        lls = [plain_loglikelihood(model, tokenizer, query, " " + e) for e in row["endings"]]
        n = len(row["endings"])
        best_norm = max(range(n), key=lambda i: (lls[i] / len(row["endings"][i]), -i))
        best = max(range(n), key=lambda i: (lls[i], -i))
        rows.append(row | {"label": best_norm, "plain_acc": best == best_norm})
    return rows


def test_hellaswag_context_as_lm_eval_builds_it(tmp_path):
    from lm.eval import read_hellaswag

    row = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he starts"}
    rows = [row | {"ctx": "A man is sitting on a roof. he starts", "endings": ["pulling.", "x"], "label": 0}]
    rows.append({k: v for k, v in rows[0].items() if k not in ("ctx_a", "ctx_b")})  # a slice with only ctx
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_hellaswag(tmp_path / "hs.jsonl")
    assert items[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He starts"
    assert items[1]["query"] == "Roof shingle removal: A man is sitting on a roof. he starts"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"endings": "cd"}, "endings must be a list of strings"),  # was scored as the choices "c" and "d"
        ({"label": 1.7}, "label must be an integer, got 1.7"),  # was read as 1
        ({"label": True}, "label must be an integer, got True"),
        ({"ctx": "caf\udcff"}, "codec can't decode"),  # not UTF-8: was a traceback
    ],
)
def test_hellaswag_rows_of_the_wrong_types_are_one_line_errors(tmp_path, change, message):
    from lm.eval import read_hellaswag

    row = {"activity_label": "A", "ctx": "a b", "endings": ["c", "d"], "label": "1"} | change
    text = json.dumps(row, ensure_ascii=False) + "\n"
    (tmp_path / "hs.jsonl").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(LMError, match=rf"hs.jsonl:1: not a HellaSwag row .*{re.escape(message)}"):
        read_hellaswag(tmp_path / "hs.jsonl")


def test_hellaswag_shared_slice_reads(ckpt):
    _, model, tokenizer = ckpt
    from lm.eval import read_hellaswag

    items = read_hellaswag(shared_file("hellaswag_val_every5th.jsonl"))
    assert len(items) == 2009 and all(len(i["choices"]) == 4 for i in items)
    assert items[0]["query"] == "Roof shingle removal: A man is sitting on a roof. he"


def test_chat_tasks_call_lm_tasks(ckpt, monkeypatch):
    _, model, tokenizer = ckpt
    import lm.tasks

    calls = []

    def fake(model, tokenizer, task, num_problems, seed, digits, batch_size):
        calls.append((task, num_problems, seed, digits, batch_size))
        return {"exact_match": 0.25, "num_problems": float(num_problems)}

    monkeypatch.setattr(lm.tasks, "evaluate_task", fake)
    monkeypatch.setattr(lm.tasks, "check_tokenizer_writes", lambda *args: None)  # this char vocabulary has no digits
    spec = EvalSpec(task="addition", num_problems=8, seed=3, digits=4, batch_size=2)
    metrics, n = evaluate(model, tokenizer, spec)
    assert calls == [("addition", 8, 3, 4, 2)] and n == 8 and metrics["exact_match"] == 0.25  # batch_size was dropped
    evaluate(model, tokenizer, EvalSpec(task="addition", num_problems=8))
    assert calls[-1][-1] == 64  # unset: the chat tasks' own default, not the forward passes' 16
    # fields the task never reads are refused, not recorded beside numbers they did not shape
    for given, named in (({"limit": 3}, "limit"), ({"data": "x.txt", "stride": 4}, "data and stride")):
        with pytest.raises(LMError, match=f"eval addition: {named} does not apply to this task; it takes num_problems"):
            evaluate(model, tokenizer, EvalSpec(task="addition", **given))
    with pytest.raises(LMError, match="eval hellaswag: stride does not apply"):
        evaluate(model, tokenizer, EvalSpec(task="hellaswag", data="h.jsonl", stride=4))
    # ... also those with a default (they were checked only where the default is None): a chat task's problems
    # given to lm, a hub dataset's split to hellaswag or to a chat task
    for task, given, named in (
        ("lm", {"num_problems": 5, "seed": 3}, "num_problems and seed"),
        ("hellaswag", {"source_split": "validation"}, "source_split"),
        ("hellaswag", {"text_field": "ctx", "digits": 3}, "text_field and digits"),
        ("count", {"source_config": "x"}, "source_config"),
    ):
        with pytest.raises(LMError, match=f"eval {task}: {named} does not apply to this task"):
            evaluate(model, tokenizer, EvalSpec(task=task, data="x.txt" if task != "count" else None, **given))


def test_digits_is_refused_for_the_word_tasks_before_the_checkpoint_is_loaded(tmp_path, capsys):
    """reverse and count draw pseudo-words: --digits 5 ran them as ever and recorded digits 5 beside the score."""
    from lm.eval import build_task

    for task in ("reverse", "count"):
        with pytest.raises(LMError, match=f"eval {task}: digits does not apply to this task; it takes num_problems"):
            build_task(EvalSpec(task=task, num_problems=20, digits=5))
        with pytest.raises(SystemExit) as exit_info:  # no checkpoint there: refused before it is read
            main(
                ["eval", "--ckpt", str(tmp_path / "none.ckpt"), "--task", task, "--num_problems", "20", "--digits", "5"]
            )
        assert exit_info.value.code == 2
        assert f"eval {task}: digits does not apply to this task" in capsys.readouterr().err
        assert build_task(EvalSpec(task=task, digits=2)).spec.digits == 2  # the default, as for every other option
    assert build_task(EvalSpec(task="addition", digits=5)).spec.digits == 5  # addition's operands


def test_user_errors_are_lm_errors(ckpt, tmp_path, capsys):
    path, _, _ = ckpt
    for args in (["--task", "lm"], ["--task", "hellaswag", "--data", str(tmp_path / "missing.jsonl")]):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--ckpt", str(path), *args])
        assert exit_info.value.code == 2
    text = tmp_path / "t.txt"
    text.write_text("".join(DOCS))
    for args in (
        ["--task", "lm", "--data", str(text), "--batch_size", "0"],
        ["--task", "lm", "--data", str(text), "--stride", "0"],
        ["--task", "addition", "--num_problems", "0"],
        ["--task", "hellaswag", "--data", str(text), "--limit", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--ckpt", str(path), *args])
        assert exit_info.value.code == 2
        assert f"{args[-2][2:]} must be at least 1, got 0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    for row in ('{"ctx": "no endings"}', "[1, 2]"):  # a row without the keys, a row that is no JSON object
        bad.write_text(row + "\n")
        with pytest.raises(SystemExit):
            main(["eval", "--ckpt", str(path), "--task", "hellaswag", "--data", str(bad)])
        assert f"{bad}:1:" in capsys.readouterr().err


def test_an_unwritable_out_stops_before_evaluating(ckpt, text_dir, tmp_path, capsys, monkeypatch):
    """--out is checked (its directories created) before an evaluation that can take hours; a write that fails
    anyway is a one-line error after the table, whose results are then on the screen."""
    path, _, _ = ckpt
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "r.json"  # under a file: not writable, even for root
    argv = ["eval", "--ckpt", str(path), "--task", "lm", "--data", str(text_dir), "--out", str(out)]
    monkeypatch.setattr(lm.eval, "evaluate", lambda *a: pytest.fail("evaluated before checking --out"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert capsys.readouterr().err == f"error: cannot write {out}: {out.parent}: File exists\n"  # "exists, not a dir"
    assert exit_info.value.code == 2

    monkeypatch.undo()
    monkeypatch.setattr(lm.eval, "check_writable", lambda out: None)  # as if the disk filled up during the evaluation
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    printed = capsys.readouterr()
    assert exit_info.value.code == 2 and printed.err.endswith(f"\nerror: cannot write {out}: Not a directory\n")
    assert "bpb" in printed.out

    monkeypatch.undo()
    nested = tmp_path / "new" / "dir" / "r.json"  # directories are made
    main([*argv[:-1], str(nested)])
    assert json.loads(nested.read_text())["task"] == "lm"


def _tiny_training(tmp_path, source, callbacks, **trainer_kwargs):
    """(trainer, module, data) of a tiny char model about to train on `source`: on the CPU, quiet (no logger,
    checkpoints, progress bar, model summary or validation unless trainer_kwargs ask for them)."""
    from lm.data import PretrainData
    from lm.module import LanguageModel

    data = PretrainData(str(source), block_size=16, batch_size=4, cache_dir=str(tmp_path / "c"), num_proc=1)
    module = LanguageModel(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32), warmup_steps=1)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(
        **{"accelerator": "cpu", **quiet, "limit_val_batches": 0, "callbacks": callbacks, **trainer_kwargs}
    )
    return trainer, module, data


def test_callback_logs_eval_metrics_in_training(tmp_path):
    """The callback inside a real Trainer: `eval/<name>/<metric>` reach the logger at each validation."""
    text_dir = tmp_path / "corpus"
    text_dir.mkdir()
    for i, doc in enumerate(DOCS):
        (text_dir / f"{i}.txt").write_text(doc * 20, encoding="utf-8")

    callback = EvalCallback([{"task": "lm", "data": str(text_dir), "name": "texts"}], every_n_steps=2)
    trainer, module, data = _tiny_training(
        tmp_path,
        text_dir,
        [callback],
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path / "logs"),
    )
    trainer.fit(module, datamodule=data)
    metrics = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0].split(",")
    assert {"eval/texts/bpb", "eval/texts/loss", "eval/texts/ppl"} <= set(header)
    expected = evaluate(module.model, module.tokenizer, EvalSpec(task="lm", data=str(text_dir)))[0]
    assert trainer.callback_metrics["eval/texts/bpb"].item() == pytest.approx(expected["bpb"], rel=1e-5)


def test_callback_is_configured_from_yaml(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lm.eval.EvalCallback\n      init_args:\n"
        "        tasks: [{task: hellaswag, data: hs.jsonl, limit: 10}]\n        every_n_steps: 100\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "experiments/debug.yaml"), "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lm.eval.EvalCallback" in printed and "task: hellaswag" in printed and "limit: 10" in printed


@pytest.mark.parametrize("task", ["lm", "hellaswag"])
def test_every_rank_runs_the_same_number_of_forward_passes_and_the_shards_add_up(ckpt, text_dir, tmp_path, task):
    """FSDP gathers the weights in every forward pass, so a rank running fewer would leave the others waiting for
    good. The lm task's throw-away window used to add a pass on the rank that was one window short (10 vs 11)."""
    from lm.eval import build_task

    _, model, tokenizer = ckpt
    if task == "lm":
        long_doc = tmp_path / "long.txt"
        long_doc.write_text((DOCS[0] + DOCS[1]) * 9, encoding="utf-8")  # ~110 windows at block_size 8
        spec = EvalSpec(task="lm", data=str(long_doc), batch_size=4)
    else:
        data = tmp_path / "hs.jsonl"  # items with 2 to 5 endings, one ending longer than the context
        rows = [row | {"label": 0} for row in HELLASWAG_ROWS * 3]
        rows[1] = rows[1] | {"endings": ["a", "bb " * 40]}
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        spec = EvalSpec(task="hellaswag", data=str(data), batch_size=3)
    small = GPT(GPTConfig(**{**asdict(model.config), "block_size": 8 if task == "lm" else 64}))
    small.load_state_dict(model.state_dict(), strict=False)
    small.eval()
    calls = []
    small.register_forward_pre_hook(lambda module, args: calls.append(1))
    build = build_task(spec)
    build.prepare(tokenizer, small.config.block_size)
    whole = build.score(small, tokenizer)
    for world_size in (2, 3, 4):
        per_rank, sums = [], {}
        for rank in range(world_size):
            calls.clear()
            for key, value in build.score(small, tokenizer, rank=rank, world_size=world_size).items():
                sums[key] = sums.get(key, 0.0) + value
            per_rank.append(len(calls))
        assert len(set(per_rank)) == 1, (world_size, per_rank)
        assert sums == pytest.approx(whole), world_size  # the throw-away passes count for nothing


def test_a_bad_eval_data_path_stops_the_run_before_training_and_the_count_survives_a_resume(tmp_path):
    (tmp_path / "t.txt").write_text("".join(DOCS) * 20, encoding="utf-8")
    steps = []

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)

    callback = EvalCallback([{"task": "hellaswag", "data": str(tmp_path / "typo.jsonl")}], every_n_steps=3)
    trainer, module, data = _tiny_training(tmp_path, tmp_path / "t.txt", [callback, Steps()], max_steps=4)
    with pytest.raises(LMError, match="typo.jsonl"):
        trainer.fit(module, datamodule=data)
    assert steps == []  # it used to train 3 steps first

    counted = EvalCallback([{"task": "lm", "data": str(tmp_path / "t.txt")}], every_n_validations=3)
    counted._validations = 4
    resumed = EvalCallback([{"task": "lm", "data": str(tmp_path / "t.txt")}], every_n_validations=3)
    resumed.load_state_dict(counted.state_dict())
    assert resumed._validations == 4  # a resumed run used to count from 0 again
    resumed.load_state_dict({})  # a checkpoint from before the count was saved
    assert resumed._validations == 0


@pytest.mark.parametrize("when", [{"every_n_steps": -1}, {"every_n_validations": 0}])
def test_eval_callback_refuses_a_count_below_1(when):
    """every_n_steps=-1 was taken: step % -1 == 0 on every step, so the evaluation ran after each one."""
    with pytest.raises(LMError, match=f"EvalCallback: {next(iter(when))} must be at least 1"):
        EvalCallback([{"task": "addition", "num_problems": 2}], **when)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "precision"), [("lm", "32-true"), ("addition", "32-true"), ("addition", "bf16-mixed")]
)
def test_eval_callback_and_task_accuracy_run_under_fsdp(tmp_path, task, precision):
    """Lightning's FSDP makes the LightningModule the root, whose own weights (embedding, head, final norm) are flat
    shards outside its forward: calling pl_module.model directly failed ("'weight' must be 2-D"), and a chat task on
    rank 0 alone left the other rank waiting in a collective. Under bf16-mixed, TaskAccuracy ran outside autocast:
    the gathered root's fp32 embeddings met the Blocks' bf16 weights ("expected m1 and m2 to have the same dtype").
    2 CPU processes (tests/fsdp_cpu_eval.py)."""
    import subprocess
    import sys

    env = cli_env(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    script = str(REPO / "tests" / "fsdp_cpu_eval.py")
    run = subprocess.run(
        [sys.executable, script, str(tmp_path), task, precision], env=env, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]  # what each rank logged
    assert metrics[0] == metrics[1]  # the same numbers logged on every rank
    key = "eval/lm/bpb" if task == "lm" else "eval/addition/exact_match"
    assert key in metrics[0] and math.isfinite(metrics[0][key])


def test_lm_eval_reads_a_hub_dataset_s_config_split_and_revision(ckpt, text_dir, tmp_path, monkeypatch, capsys):
    """They were not passed on: a dataset that needs a config could not be evaluated, the others were scored on their
    train split. (The hub is stubbed: nothing is downloaded.)"""
    import datasets

    path, _, _ = ckpt
    calls = []

    def hub(source, **kwargs):
        calls.append({"source": source, **kwargs})
        return datasets.Dataset.from_dict({"text": DOCS})

    monkeypatch.setattr(datasets, "load_dataset", hub)
    out = tmp_path / "r.json"
    flags = ["--source_config", "sample-10BT", "--source_split", "validation", "--source_revision", "v1"]
    main(["eval", "--ckpt", str(path), "--task", "lm", "--data", "org/corpus", *flags, "--out", str(out)])
    (call,) = calls
    assert (call["source"], call["name"], call["split"], call["revision"]) == (
        "org/corpus",
        "sample-10BT",
        "validation",
        "v1",
    )
    spec = json.loads(out.read_text())["spec"]
    assert (spec["source_config"], spec["source_split"], spec["source_revision"]) == ("sample-10BT", "validation", "v1")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # not silently ignored for a local source
        main(["eval", "--ckpt", str(path), "--task", "lm", "--data", str(text_dir), "--source_split", "validation"])
    assert "source_split: for hub datasets only" in capsys.readouterr().err


def test_an_lm_task_reads_a_hub_dataset_s_data_dir(monkeypatch, text_dir):
    """An EvalCallback's lm task had no data_dir: a folder of a hub repository (as Anthropic/hh-rlhf's helpful-base)
    could not be scored alone. It reaches load_dataset, streamed or not; a local source or another task refuses it, as
    source_config."""
    import datasets

    from lm.eval import build_task

    calls = []

    def hub(source, **kwargs):
        calls.append({"source": source, **kwargs})
        rows = [{"text": "hello world"}, {"text": "hello there"}]
        if kwargs["streaming"]:  # from_generator: datasets 3.0 (the lower bound) has no IterableDataset.from_list
            return datasets.IterableDataset.from_generator(lambda: iter(rows))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    tokenizer = CharTokenizer.train(["hello world there"])
    for limit in (None, 1):
        task = build_task(EvalSpec(task="lm", data="org/hh", source_data_dir="helpful-base", limit=limit))
        task.prepare(tokenizer, 16)
        assert (calls[-1]["data_dir"], calls[-1]["streaming"]) == ("helpful-base", limit is not None)
    with pytest.raises(LMError, match="source_data_dir: for hub datasets only"):
        build_task(EvalSpec(task="lm", data=str(text_dir), source_data_dir="helpful-base")).prepare(tokenizer, 16)
    with pytest.raises(LMError, match="source_data_dir"):
        build_task(EvalSpec(task="addition", source_data_dir="helpful-base"))


def test_lm_eval_takes_a_hub_dataset_s_data_dir(monkeypatch, tmp_path):
    """EvalSpec's source_data_dir had no lm eval flag: the command line could not score one folder of a hub dataset."""
    import lm.eval

    specs = []

    def build(spec):
        specs.append(spec)
        raise SystemExit(0)  # the spec as the command built it; nothing loaded

    monkeypatch.setattr(lm.eval, "build_task", build)
    with pytest.raises(SystemExit):
        lm.eval.eval_command(
            [
                "--ckpt",
                str(tmp_path / "m.ckpt"),
                "--task",
                "lm",
                "--data",
                "org/hh",
                "--source_data_dir",
                "helpful-base",
            ]
        )
    assert specs[0].source_data_dir == "helpful-base"


def test_lm_eval_with_a_limit_streams_a_hub_dataset_and_reads_only_the_documents_it_scores(monkeypatch, tmp_path):
    """--limit 1000 on a hub dataset (the README's fineweb-edu sample-10BT) downloaded and prepared the whole split,
    tens of GB, before taking the first 1000 documents. (The hub is stubbed: many rows, each read counted.)"""
    import datasets

    from lm.eval import build_task

    calls, read, load_dataset = [], [], datasets.load_dataset

    def rows(n, untitled):
        for i in range(n):
            read.append(i)
            yield {"id": i} if i == untitled else {"id": i, "content": f"doc {i}"}

    def hub(source, n=10_000, untitled=None, **kwargs):  # untitled: the row without text
        calls.append({"source": source, **kwargs})
        if kwargs["streaming"]:
            return datasets.IterableDataset.from_generator(rows, gen_kwargs={"n": n, "untitled": untitled})
        return datasets.Dataset.from_list(list(rows(n, untitled)))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    tokenizer = CharTokenizer.train(["doc 0123456789"])

    def prepare(**spec):
        task = build_task(EvalSpec(task="lm", data="org/corpus", source_config="sample-10BT", **spec))
        task.prepare(tokenizer, 64)
        return task

    task = prepare(limit=3, text_field="content")
    assert [(c["source"], c["name"], c["split"], c["streaming"]) for c in calls] == [
        ("org/corpus", "sample-10BT", "train", True)
    ]
    assert read == [0, 1, 2]  # not one document past the limit
    docs = ["doc 0", "doc 1", "doc 2"]
    assert task.tokens.tolist() == [tokenizer.eos_id, *[t for d in tokenizer.encode_batch(docs, eos=True) for t in d]]
    assert (task.num_documents, task.num_bytes) == (3, 15)
    # the text field is checked on the documents read, with the messages of a downloaded split
    with pytest.raises(LMError, match="no column 'text'"):
        prepare(limit=3)
    monkeypatch.setattr(datasets, "load_dataset", lambda source, **kwargs: hub(source, untitled=4, **kwargs))
    with pytest.raises(LMError, match=r"1 documents have no 'content' .* the first is document 5 \(counting from 1\)"):
        prepare(limit=5, text_field="content")
    prepare(limit=4, text_field="content")  # it comes after the documents read
    # datasets streams no sliced split ("Bad split"): such a split, the held-out end of a train-only dataset, is
    # read whole, then cut to the limit
    monkeypatch.setattr(datasets, "load_dataset", lambda source, **kwargs: hub(source, n=100, **kwargs))
    calls.clear()
    task = prepare(limit=3, text_field="content", source_split="train[90%:]")
    assert [(c["split"], c["streaming"]) for c in calls] == [("train[90%:]", False)] and task.num_documents == 3
    monkeypatch.setattr(datasets, "load_dataset", lambda source, **kwargs: hub(source, n=0, **kwargs))
    with pytest.raises(LMError, match="no non-empty documents to evaluate"):  # an empty split
        prepare(limit=3, text_field="content")
    # a local file: its first rows, streamed as a hub split's are
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    local = tmp_path / "docs.jsonl"
    local.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    task = build_task(EvalSpec(task="lm", data=str(local), limit=2))
    task.prepare(tokenizer, 64)
    assert (task.num_documents, task.num_bytes) == (2, 10)
    # and text files and builtin sources, which load_documents returned before it took the limit
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"doc {i}")
    task = build_task(EvalSpec(task="lm", data=str(tmp_path / "doc*.txt"), limit=2))
    task.prepare(tokenizer, 64)
    assert (task.num_documents, task.num_bytes) == (2, 10)
    task = build_task(EvalSpec(task="lm", data="builtin:shakespeare", limit=3))
    task.prepare(CharTokenizer.train(load_documents("builtin:shakespeare")["text"]), 64)
    assert task.num_documents == 3


def test_chat_tasks_in_training_run_eager_as_the_other_generating_callbacks_do(tmp_path, monkeypatch):
    """Generation gives a compiled model a new shape at each step: recompiles up to torch's limit, each a pause."""
    import lm.tasks

    stances = []

    def fake(model, tokenizer, task, num_problems, seed, digits, batch_size):
        stances.append(torch._dynamo.eval_frame._stance.stance)
        return {"exact_match": 0.5, "num_problems": float(num_problems)}

    monkeypatch.setattr(lm.tasks, "evaluate_task", fake)
    (tmp_path / "t.txt").write_text("".join(DOCS) * 20 + "0123456789+", encoding="utf-8")  # can write the problems
    callback = EvalCallback([{"task": "addition", "num_problems": 2}], every_n_validations=None, every_n_steps=2)
    trainer, module, data = _tiny_training(tmp_path, tmp_path / "t.txt", [callback], max_steps=2)
    trainer.fit(module, datamodule=data)
    assert stances == ["force_eager"] and torch._dynamo.eval_frame._stance.stance == "default"


def test_a_chat_task_whose_tokenizer_cannot_write_its_problems_stops_the_fit_before_training(tmp_path):
    """A char vocabulary without digits: the run trained until the first evaluation, then stopped with this error."""
    (tmp_path / "t.txt").write_text("".join(DOCS) * 20, encoding="utf-8")
    callback = EvalCallback([{"task": "addition", "num_problems": 2}], every_n_steps=2)
    trainer, module, data = _tiny_training(tmp_path, tmp_path / "t.txt", [callback], max_steps=4)
    with pytest.raises(LMError, match="^task addition: the model's char tokenizer cannot write its problems"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("make_callback", "expected"),
    [
        (lambda: EvalCallback([{"task": "lm", "data": "missing.txt"}]), "^data source 'missing.txt': no such file"),
        (lambda: lm.tasks.TaskAccuracy("addition"), "^task addition: the model's char tokenizer cannot write"),
    ],
)
def test_lm_validate_refuses_an_evaluation_that_cannot_run_before_its_pass(tmp_path, make_callback, expected):
    """As at fit start: lm validate ran its whole pass first, then stopped at the evaluation, and its loss was lost.
    An EvalCallback that runs only between steps is not prepared (validate never runs it)."""
    (tmp_path / "t.txt").write_text("".join(DOCS) * 20, encoding="utf-8")  # a char vocabulary without digits
    trainer, module, data = _tiny_training(tmp_path, tmp_path / "t.txt", [make_callback()], limit_val_batches=2)
    steps = []
    validation_step = module.validation_step
    module.validation_step = lambda batch, batch_idx: steps.append(batch_idx) or validation_step(batch, batch_idx)
    with pytest.raises(LMError, match=expected):
        trainer.validate(module, datamodule=data, verbose=False)
    assert steps == []
    between_steps = EvalCallback([{"task": "lm", "data": "missing.txt"}], every_n_validations=None, every_n_steps=5)
    trainer, _, _ = _tiny_training(tmp_path, tmp_path / "t.txt", [between_steps], limit_val_batches=2)
    trainer.validate(module, datamodule=data, verbose=False)
    assert steps == [0, 1]


def test_lm_validate_runs_the_evaluation_whatever_the_count_of_validations(tmp_path):
    """With every_n_validations 2, lm validate evaluated or not by the parity of the count the checkpoint restored
    (each validate call counted one more validation: the first logged nothing, the second eval/texts/...)."""
    (tmp_path / "t.txt").write_text("".join(DOCS) * 20, encoding="utf-8")
    callback = EvalCallback([{"task": "lm", "data": str(tmp_path / "t.txt"), "name": "texts"}], every_n_validations=2)
    trainer, module, data = _tiny_training(tmp_path, tmp_path / "t.txt", [callback], limit_val_batches=1)
    for _ in range(2):  # the counts 0 and 1 of a checkpoint, restored
        metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
        assert "eval/texts/bpb" in metrics


# A fit that validates (one batch) at steps 2 and 4 and saves checkpoints: where a monitor meets an evaluation's cadence
VALIDATE_EVERY_2_OF_4_STEPS = dict(
    enable_checkpointing=True,
    max_steps=4,
    val_check_interval=2,
    check_val_every_n_epoch=None,
    limit_val_batches=1,
    num_sanity_val_steps=0,
)


def test_a_checkpoint_monitoring_an_evaluation_that_skips_validations_is_refused_before_training(tmp_path):
    """Lightning stopped the run at the first validation without the metric ("could not find the monitored key"),
    after training up to it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    (tmp_path / "t.txt").write_text("".join(DOCS) * 20, encoding="utf-8")
    task = {"task": "lm", "data": str(tmp_path / "t.txt"), "name": "texts"}
    callback = EvalCallback([task], every_n_validations=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="eval/texts/bpb")
    trainer, module, data = _tiny_training(
        tmp_path, tmp_path / "t.txt", [callback, checkpoint], **VALIDATE_EVERY_2_OF_4_STEPS
    )
    expected = r"^trainer.callbacks: ModelCheckpoint monitors eval/texts/bpb, which .* logs at one validation in 2: "
    with pytest.raises(LMError, match=expected):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0
    # Logged at every validation by the same evaluation elsewhere, or another metric monitored: nothing to refuse
    callback._refuse_a_monitor_missing_at_some_validations([callback, checkpoint, EvalCallback([task])])
    callback._refuse_a_monitor_missing_at_some_validations([callback, ModelCheckpoint(monitor="val/loss")])


@pytest.mark.parametrize("every_n_validations, cadence", [(2, "one validation in 2"), (None, "no validation")])
def test_evaluations_between_steps_do_not_excuse_a_monitor_of_one_that_skips_validations(
    tmp_path, every_n_validations, cadence
):
    """every_n_steps exempted the callback from the refusal above: the first validation before an evaluation between
    steps stopped the run after training up to it, and a later one ranked its checkpoint by the score of an older
    step (weights of step 9 saved as the best by step 8's bpb)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    (tmp_path / "t.txt").write_text("".join(DOCS) * 20, encoding="utf-8")
    task = {"task": "lm", "data": str(tmp_path / "t.txt"), "name": "texts"}
    callback = EvalCallback([task], every_n_validations=every_n_validations, every_n_steps=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="eval/texts/bpb")
    trainer, module, data = _tiny_training(
        tmp_path, tmp_path / "t.txt", [callback, checkpoint], **VALIDATE_EVERY_2_OF_4_STEPS
    )
    with pytest.raises(LMError, match=f"monitors eval/texts/bpb, which the EvalCallback logs at {cadence}: "):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


def test_two_eval_callbacks_train_together():
    """Their saved counts shared the class name's key: Lightning refused a second EvalCallback (other tasks at
    another cadence) with a RuntimeError."""
    often = EvalCallback([{"task": "addition"}], every_n_steps=10)
    rarely = EvalCallback([{"task": "count"}, {"task": "lm", "data": "t.txt"}], every_n_validations=5)
    L.Trainer(callbacks=[often, rarely], logger=False, enable_checkpointing=False)
    assert often.state_key != rarely.state_key


def test_evaluations_that_log_under_one_name_must_be_the_same_evaluation(tmp_path):
    """Two EvalCallbacks' lm tasks on different files logged the mean of both losses as eval/lm/loss, and a second task
    of one name in one EvalCallback replaced the first's numbers. The same evaluation between steps and at validation
    logs the same numbers, and may."""
    with pytest.raises(LMError, match=re.escape("task lm both log eval/lm/... but differ (data a.txt vs b.txt)")):
        EvalCallback([{"task": "lm", "data": "a.txt"}, {"task": "lm", "data": "b.txt"}])
    (tmp_path / "t.txt").write_text("".join(DOCS) * 20 + "0123456789+", encoding="utf-8")  # can write the problems
    mixed = {
        "data a.txt vs b.txt": [
            EvalCallback([{"task": "lm", "data": "a.txt"}], every_n_steps=5),
            EvalCallback([{"task": "addition"}, {"task": "lm", "data": "b.txt"}]),
        ],
        "num_problems 200 vs 100": [lm.tasks.TaskAccuracy("addition"), EvalCallback([{"task": "addition"}])],
    }
    for differ, callbacks in mixed.items():
        trainer, module, data = _tiny_training(tmp_path, tmp_path / "t.txt", callbacks, max_steps=1)
        with pytest.raises(LMError, match=re.escape(f"but differ ({differ}), so their numbers would mix there")):
            trainer.fit(module, datamodule=data)
        assert trainer.global_step == 0
    same = [
        lm.tasks.TaskAccuracy("addition", num_problems=2),
        EvalCallback([{"task": "addition", "num_problems": 2}], every_n_validations=None, every_n_steps=5),
    ]
    trainer, module, data = _tiny_training(tmp_path, tmp_path / "t.txt", same, max_steps=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1


@pytest.mark.parametrize(
    ("callback", "expected"),
    [
        (
            "{class_path: lm.tasks.TaskAccuracy, init_args: {task: addition}}",
            "two TaskAccuracy callbacks of task addition: keep one per task (another setting of it goes in an "
            "EvalCallback task with a name of its own, as {task: addition, num_problems: 500, name: addition_500})",
        ),
        (
            "{class_path: lm.eval.EvalCallback, init_args: {tasks: [{task: count}]}}",
            "two EvalCallbacks of the tasks count: keep one (it can run both every_n_validations and every_n_steps)",
        ),
    ],
)
def test_two_evaluations_with_one_state_key_are_a_one_line_error(tmp_path, capsys, callback, expected):
    """Lightning refused the Trainer with a RuntimeError traceback (exit 1): their saved counts share a key."""
    (tmp_path / "twice.yaml").write_text(f"trainer:\n  callbacks:\n    - {callback}\n    - {callback}\n")
    config = ["--config", str(REPO / "experiments/pretrain_addition.yaml"), "--config", str(tmp_path / "twice.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config, "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: trainer.callbacks: {expected}\n"


def test_an_older_checkpoint_s_counts_under_the_class_names_are_resumed_without_a_warning(tmp_path):
    """An older lm saved TaskAccuracy's and EvalCallback's counts of validations under their class names. They were
    read, but Lightning compared the checkpoint's keys with the run's first, and asked to "add the following
    callbacks: ['TaskAccuracy', 'EvalCallback']", which the run had."""
    (tmp_path / "t.txt").write_text("".join(DOCS) * 20 + "0123456789+", encoding="utf-8")  # can write the problems

    def callbacks():
        return [
            lm.tasks.TaskAccuracy("addition"),
            EvalCallback([{"task": "addition", "num_problems": 200}], every_n_steps=100),
        ]

    trainer, module, data = _tiny_training(tmp_path, tmp_path / "t.txt", callbacks(), max_steps=1)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    states = checkpoint["callbacks"]
    states["TaskAccuracy"] = states.pop(trainer.callbacks[0].state_key) | {"validations": 5}
    states["EvalCallback"] = states.pop(trainer.callbacks[1].state_key) | {"validations": 3}
    torch.save(checkpoint, tmp_path / "older.ckpt")
    trainer, module, data = _tiny_training(tmp_path, tmp_path / "t.txt", callbacks(), max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "older.ckpt")
    assert [callback._validations for callback in trainer.callbacks[:2]] == [5, 3]
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]


def test_an_evaluation_between_steps_is_logged_once_at_the_step_it_ran(tmp_path):
    """Logged with pl_module.log between steps, an evaluation was a step metric, which Lightning writes only at a
    logging step and then again at each one after: step 3's result reached the logger at step 5, and again at 10."""
    from tests.conftest import MemoryLogger

    (tmp_path / "t.txt").write_text("".join(DOCS) * 20, encoding="utf-8")
    callback = EvalCallback(
        [{"task": "lm", "data": str(tmp_path / "t.txt"), "limit": 1}], every_n_validations=None, every_n_steps=3
    )
    logger = MemoryLogger()
    trainer, module, data = _tiny_training(
        tmp_path, tmp_path / "t.txt", [callback], max_steps=10, log_every_n_steps=5, logger=logger
    )
    trainer.fit(module, datamodule=data)
    # Lightning's step of a metric logged at global step g is g - 1 (train/loss of step 5 is logged at 4)
    evaluated = [step for step, metrics in logger.calls if "eval/lm/loss" in metrics]
    assert evaluated == [2, 5, 8]
    assert {step for step, metrics in logger.calls if "train/loss" in metrics} == {4, 9}
    last = [metrics["eval/lm/loss"] for _, metrics in logger.calls if "eval/lm/loss" in metrics][-1]
    assert trainer.callback_metrics["eval/lm/loss"].item() == pytest.approx(last)  # for a monitor, say


def test_a_chat_task_that_fails_leaves_the_model_in_the_mode_it_found(monkeypatch):
    import lm.generate
    import lm.tasks
    from lm.tokenizer import CharTokenizer

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(lm.generate, "generate_texts", fail)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, vocab_size=64)).train()
    with pytest.raises(RuntimeError, match="out of memory"):
        lm.tasks.evaluate_task(model, CharTokenizer("0123456789+= "), "addition", num_problems=2)
    assert model.training


def test_a_resumed_fit_under_accumulation_does_not_repeat_the_evaluation_of_the_step_it_resumes_at(tmp_path):
    """every_n_steps is checked at each micro-batch's end: after a resume at step 2 with 2 micro-batches a step, the
    first micro-batch ended at step 2 again and evaluated it a second time."""
    from lm.module import LanguageModel

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(8)]
    batches = [{"input_ids": x, "labels": x} for x in ids]

    def fit(max_steps, ckpt_path=None) -> list[int]:
        evaluated = []
        callback = EvalCallback([{"task": "lm", "data": "unread.txt"}], every_n_validations=None, every_n_steps=2)
        callback._prepare = lambda pl_module: None
        callback.run = lambda trainer, pl_module: evaluated.append(trainer.global_step)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            accumulate_grad_batches=2,
            limit_val_batches=0,
            logger=False,
            callbacks=[callback],
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        module = LanguageModel(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, vocab_size=64))
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
        trainer.save_checkpoint(tmp_path / f"{max_steps}.ckpt")
        return evaluated

    assert fit(2) == [2]
    assert fit(4, ckpt_path=tmp_path / "2.ckpt") == [4]


def test_text_a_char_vocabulary_cannot_write_is_named_where_it_is(ckpt, text_dir, tmp_path, capsys):
    """A char tokenizer learned from other text met a character it lacks: the error named the character and its
    offset in some piece of text, but no file, line or document (chat data named file:line already)."""
    from lm.data import PretrainData

    path, _, _ = ckpt
    (text_dir / "9.txt").write_text("a price of 5 €\n")  # the third document, in file order

    def error_of(*argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    where = f"data source '{text_dir}', document 3: character '5' (at offset 11)"
    assert where in error_of("eval", "--ckpt", str(path), "--task", "lm", "--data", str(text_dir))
    data = PretrainData(source=str(text_dir), tokenizer=str(path), block_size=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(LMError, match=re.escape(where)):  # lm fit with the checkpoint's tokenizer
        data.prepare_data()
    row = {"activity_label": "A", "ctx": "a b", "endings": ["c", "d"], "label": 0}
    rows = [row, row | {"endings": ["c", "100%"]}]
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hellaswag = error_of("eval", "--ckpt", str(path), "--task", "hellaswag", "--data", str(tmp_path / "hs.jsonl"))
    assert f"error: {tmp_path / 'hs.jsonl'}:2: character '1'" in hellaswag
    for command in ("eval", "tasks eval"):  # no digit is in the vocabulary; the first problem is 42+34
        task = error_of(*command.split(), "--ckpt", str(path), "--task", "addition")
        assert "error: task addition: the model's char tokenizer cannot write its problems (character '4' (at" in task
