"""Tokenizer tests: every kind round-trips, reserves the chat specials, and survives save/load, state and pickle."""

import json
import pickle
import sys

import numpy as np
import pytest
import torch

from lm.errors import LMError
from lm.tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TOKENS,
    END,
    EOS,
    SYSTEM,
    USER,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
)

TEXT = "First Citizen:\nBefore we proceed, hear me speak.\n\n  Café — naïve 日本語 🤖 tabs\tand <|user|> text.\n"
CORPUS = [TEXT, "All:\nSpeak, speak.\n", "x" * 50 + " ünïcödé 12345\n"] * 20


def _texts():
    return iter(CORPUS)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {
        "char": build_tokenizer("char", _texts),
        "gpt2": build_tokenizer("gpt2"),
        "bpe": build_tokenizer("bpe:300", _texts),
    }


KINDS = ["char", "gpt2", "bpe"]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(tokenizers, kind):
    tok = tokenizers[kind]
    assert tok.kind == kind
    for text in [TEXT, " Speak space", "\n\nCitizen\n", ""]:  # only characters the char tokenizer saw
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", KINDS)
def test_specials_reserved_and_distinct(tokenizers, kind):
    tok = tokenizers[kind]
    ids = tok.special_ids
    assert set(ids) == {BOS, EOS, *CHAT_TOKENS}
    assert ids[BOS] == tok.bos_id and ids[EOS] == tok.eos_id
    chat_ids = [tok.token_id(t) for t in CHAT_TOKENS]
    assert len(set(chat_ids) | {tok.bos_id, tok.eos_id}) == 4 + (1 if tok.bos_id == tok.eos_id else 2)
    assert all(0 <= i < tok.vocab_size for i in ids.values())
    with pytest.raises(LMError):
        tok.token_id("<|not-a-token|>")


@pytest.mark.parametrize("kind", KINDS)
def test_special_strings_in_text_stay_text(tokenizers, kind):
    tok = tokenizers[kind]
    ids = tok.encode(f"{USER}hi{END}")
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == f"{USER}hi{END}"


@pytest.mark.parametrize("kind", KINDS)
def test_bos_eos_flags_and_batch(tokenizers, kind):
    tok = tokenizers[kind]
    plain = tok.encode(TEXT)
    assert tok.encode(TEXT, bos=True, eos=True) == [tok.bos_id, *plain, tok.eos_id]
    texts = [TEXT, "Speak, speak.", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in texts]


@pytest.mark.parametrize("kind", KINDS)
def test_decode_accepts_arrays_and_skips_specials(tokenizers, kind):
    tok = tokenizers[kind]
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.decode(ids, skip_special=True) == TEXT
    # the chat markers too, not only BOS/EOS: a reply decoded for lm chat or a task score must not show <|end|>
    chat = [tok.token_id(t) for t in (SYSTEM, USER, ASSISTANT, END)]
    assert tok.decode([*chat, *tok.encode("Speak"), *chat], skip_special=True) == "Speak"
    with pytest.raises(LMError):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("kind", KINDS)
def test_state_save_load_pickle(tokenizers, kind, tmp_path):
    tok = tokenizers[kind]
    expected = tok.encode(TEXT, bos=True)
    state = json.loads(json.dumps(tok.to_state()))
    copies = [Tokenizer.from_state(state), pickle.loads(pickle.dumps(tok))]
    tok.save(tmp_path)
    copies += [Tokenizer.load(tmp_path), Tokenizer.load(tmp_path / "lm_tokenizer.json"), build_tokenizer(str(tmp_path))]
    for copy in copies:
        assert type(copy) is type(tok)
        assert copy.encode(TEXT, bos=True) == expected
        assert copy.fingerprint == tok.fingerprint
        assert copy.special_ids == tok.special_ids
        assert copy.encode(USER) == tok.encode(USER)  # specials still not parsed from text after a reload


def test_a_tokenizer_saved_over_another_leaves_no_file_of_the_other(tokenizers, tmp_path):
    """A char tokenizer saved where a BPE one was left its tokenizer.json: the folder then held two tokenizers, and
    transformers or a path to the file read the stale one."""
    tokenizers["bpe"].save(tmp_path)
    tokenizers["char"].save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_tokenizer.json"]
    assert build_tokenizer(str(tmp_path)).fingerprint == tokenizers["char"].fingerprint
    tokenizers["bpe"].save(tmp_path)  # and back: its own tokenizer.json again
    assert build_tokenizer(str(tmp_path / "tokenizer.json")).encode(TEXT) == tokenizers["bpe"].encode(TEXT)


def test_gpt2_matches_openai():
    tok = GPT2Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.bos_id == tok.eos_id == tok.token_id(BOS) == tok.token_id(EOS) == 50256
    assert [tok.token_id(t) for t in (SYSTEM, USER, ASSISTANT, END)] == [50257, 50258, 50259, 50260]
    assert tok.vocab_size == 50261
    assert 50258 not in tok.encode("<|user|>")
    assert tok.decode([50256, 50258]) == "<|endoftext|><|user|>"
    assert tok.to_state() == {"kind": "gpt2"}


def test_char_vocabulary_and_errors():
    tok = CharTokenizer.train(["hello\n", "world"])
    assert tok.chars == sorted(set("hello\nworld"))
    assert tok.vocab_size == 6 + len(tok.chars)
    assert tok.special_ids == {BOS: 0, EOS: 1, SYSTEM: 2, USER: 3, ASSISTANT: 4, END: 5}
    assert tok.encode("hello") == [6 + tok.chars.index(c) for c in "hello"]
    with pytest.raises(LMError, match="'z'"):
        tok.encode("hez")
    with pytest.raises(LMError, match="'日'"):
        tok.encode("日")
    assert CharTokenizer.train(["abc"]).fingerprint != CharTokenizer.train(["abd"]).fingerprint
    assert CharTokenizer.train(["cab"]).fingerprint == CharTokenizer.train(["abc"]).fingerprint


def test_bpe_specials_first_and_hf_interop(tokenizers, tmp_path):
    from tokenizers import Tokenizer as HFBackend

    tok = tokenizers["bpe"]
    assert isinstance(tok, BPETokenizer)
    assert 262 < tok.vocab_size <= 300
    assert [tok.token_id(t) for t in (BOS, EOS, SYSTEM, USER, ASSISTANT, END)] == [0, 1, 2, 3, 4, 5]
    tok.save(tmp_path)
    backend = HFBackend.from_file(str(tmp_path / "tokenizer.json"))
    plain = TEXT.replace(USER, "")  # a raw HF tokenizer parses special-token strings out of text; ours does not
    assert backend.encode(plain, add_special_tokens=False).ids == tok.encode(plain)

    hf = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(hf, HFTokenizer) and hf.kind == "hf"
    assert hf.encode(TEXT, bos=True, eos=True) == tok.encode(TEXT, bos=True, eos=True)
    assert hf.special_ids == tok.special_ids


def test_hf_reuses_existing_eos_and_adds_missing(tmp_path):
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import models, pre_tokenizers

    backend = HFBackend(models.WordLevel({"hello": 0, "world": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))

    tok = Tokenizer.load(path)
    assert tok.kind == "hf"
    assert tok.bos_id == tok.eos_id == 2  # an EOS-only tokenizer uses its EOS as BOS, like GPT-2
    assert tok.vocab_size == 4 + len(CHAT_TOKENS)
    assert sorted(tok.token_id(t) for t in CHAT_TOKENS) == [4, 5, 6, 7]
    assert tok.encode("hello world", eos=True) == [0, 1, 2]
    reloaded = Tokenizer.from_state(json.loads(json.dumps(tok.to_state())))
    assert reloaded.special_ids == tok.special_ids and reloaded.fingerprint == tok.fingerprint


def test_a_vocabulary_with_gaps_whose_added_specials_would_take_words_ids_is_refused(tmp_path):
    """HF numbers added tokens from the count of entries: EOS took id 5, which "b" has, so every document boundary in
    the token file read as "b" (and "c" decoded as <|user|>). Gaps past the added ids stay fine (tests/test_data.py)."""
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import models, pre_tokenizers

    backend = HFBackend(models.WordLevel({"a": 0, "[UNK]": 1, "b": 5, "c": 7}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(LMError, match=r"gave the special token '<\|eos\|>' that lm adds the id of 'b' \(5\)"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_a_vocabulary_with_a_gap_above_the_added_specials_counts_up_to_its_largest_id(tmp_path):
    """5 words and 4 added chat tokens are 9 entries, but "b" is id 20: the embedding needs 21 rows, or the id of "b"
    is out of range (the gap below the added ids is refused above)."""
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import models, pre_tokenizers

    backend = HFBackend(models.WordLevel({"a": 0, "[UNK]": 1, "<s>": 2, "</s>": 3, "b": 20}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.vocab_size == 21
    assert sorted(tok.token_id(t) for t in CHAT_TOKENS) == [5, 6, 7, 8]  # numbered from the count of entries
    assert tok.encode("a b", bos=True, eos=True) == [2, 0, 20, 3]
    assert tok.decode([20]) == "b"


def test_a_tokenizer_json_saved_with_truncation_or_padding_neither_cuts_nor_pads(tmp_path):
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import models, pre_tokenizers

    words = {"hello": 0, "world": 1, "</s>": 2, "[UNK]": 3, "<pad>": 4}
    backend = HFBackend(models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.enable_truncation(max_length=3)  # as files saved from transformers pipelines may carry
    backend.enable_padding(length=8, pad_id=4, pad_token="<pad>")
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    text = "hello world hello world hello"
    assert tok.encode(text) == [0, 1, 0, 1, 0] and tok.encode("world") == [1]
    assert tok.encode_batch([text, "world"]) == [[0, 1, 0, 1, 0], [1]]
    reloaded = Tokenizer.from_state(json.loads(json.dumps(tok.to_state())))
    assert reloaded.encode(text) == [0, 1, 0, 1, 0]


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(LMError, match="gpt2"):
        build_tokenizer("nope")
    with pytest.raises(LMError):
        build_tokenizer("char")
    with pytest.raises(LMError):
        build_tokenizer("bpe:300")
    with pytest.raises(LMError):
        build_tokenizer("bpe:100", _texts)
    with pytest.raises(LMError):
        Tokenizer.load(tmp_path)  # empty directory
    with pytest.raises(LMError):
        Tokenizer.from_state({"kind": "sentencepiece"})


def test_a_tokenizer_path_or_checkpoint_under_home_may_start_with_a_tilde(tmp_path, monkeypatch):
    """`tokenizer: ~/tokenizers/x` in a YAML reaches lm unexpanded (no shell): it was "unknown tokenizer '~/tok'"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    tok = CharTokenizer.train(["abc"])
    tok.save(tmp_path / "tok")
    torch.save({"lm": {"tokenizer": tok.to_state()}}, tmp_path / "run.ckpt")
    for spec in ("~/tok", "~/run.ckpt"):
        assert build_tokenizer(spec).encode("cab") == tok.encode("cab")


def test_a_trained_bpe_vocabulary_must_exceed_the_specials_and_the_bytes():
    """6 specials and 256 byte tokens take 262 ids: bpe:262 leaves room for no merge, bpe:263 for one."""
    with pytest.raises(LMError, match=r"tokenizer 'bpe:262': vocab size must exceed 262 \(6 specials \+ 256 bytes\)"):
        build_tokenizer("bpe:262", _texts)
    assert build_tokenizer("bpe:263", _texts).vocab_size == 263


def test_fingerprints_are_stable_and_include_the_kind(tokenizers, tmp_path):
    """The fingerprint keys the token cache: it hashes the whole state, kind included, and must not change between
    versions (every dataset would be tokenized again). A bpe tokenizer and its tokenizer.json loaded as hf give the
    same ids through other engines, and keep caches of their own."""
    assert GPT2Tokenizer().fingerprint == "051a62319469004c"
    assert CharTokenizer.train(["abc"]).fingerprint == "a94070585122e497"
    tokenizers["bpe"].save(tmp_path)
    hf = Tokenizer.load(tmp_path / "tokenizer.json")
    assert hf.kind == "hf" and hf.encode(TEXT) == tokenizers["bpe"].encode(TEXT)
    assert hf.fingerprint != tokenizers["bpe"].fingerprint


def test_a_binary_or_malformed_tokenizer_is_a_one_line_error(tmp_path):
    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"\x0a\x8b\xff\x00 sentencepiece")  # a binary model, not tokenizer.json: was a traceback
    with pytest.raises(LMError, match="is not a JSON tokenizer file"):
        Tokenizer.load(model)
    with pytest.raises(LMError, match="char tokenizer state is malformed"):
        Tokenizer.from_state({"kind": "char", "chars": 5})


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "hf"])
def test_a_lone_surrogate_is_replaced_alike_by_every_encoding_path(tokenizers, kind, tmp_path):
    """Python strings may hold a lone surrogate (not valid Unicode). encode replaced it for gpt2 and bpe, while
    encode_to_array (tiktoken's numpy path) and HF tokenizers raised UnicodeEncodeError / TypeError."""
    if kind == "hf":
        tokenizers["bpe"].save(tmp_path)
        tok = Tokenizer.load(tmp_path / "tokenizer.json")
        assert isinstance(tok, HFTokenizer)
    else:
        tok = tokenizers[kind]
    text = "ab\ud800cd"
    ids = tok.encode(text)
    assert tok.decode(ids) == "ab\ufffdcd"
    assert tok.encode_batch([text, "ok"])[0] == ids
    for threads in (1, 2):
        assert tok.encode_to_array([text], eos=False, num_threads=threads).tolist() == ids


@pytest.mark.parametrize("spec", ["gpt2", "bpe:400"])
def test_long_texts_cut_into_pieces_encode_exactly_as_whole(monkeypatch, spec):
    """encode_batch cuts long texts for multi-threaded encoding; the ids must not change, even around runs of
    newlines and spaces where a careless cut would merge or split pre-tokens differently."""
    import random

    from lm.tokenizer import _pieces

    rng = random.Random(0)
    parts = ["word", " word", "\n", "\n\n", "  \n", " ", "\t", "é", "12", "'s", "!\n", "X\nY", "<|end|>"]
    text = "".join(rng.choice(parts) for _ in range(5000))
    tok = build_tokenizer(spec, texts=lambda: iter([text]))
    whole = tok._encode_batch([text])[0]
    monkeypatch.setattr(tok, "piece_chars", 200)  # ~100 pieces
    assert len(_pieces(text, tok.piece_chars)) > 50
    assert tok.encode_batch([text, "short"], eos=True) == [whole + [tok.eos_id], tok.encode("short", eos=True)]
    for num_threads in (1, 3):
        flat = tok.encode_to_array([text, "short"], eos=True, num_threads=num_threads)
        assert flat.tolist() == whole + [tok.eos_id] + tok.encode("short", eos=True)


@pytest.mark.parametrize("edit", [{"add_prefix_space": True}, {"use_regex": False}])
def test_a_bpe_state_that_does_not_split_as_gpt2_encodes_long_texts_whole(edit):
    """A bpe state made elsewhere or edited (a prefix space) falls back to HF, which was still handed 4K-character
    pieces: each got its own prefix space, and tokens.bin's ids differed from encode's."""
    import json
    import random

    words = _pseudo_words(random.Random(0), 6000)
    text = "".join(" ".join(words[i : i + 12]) + ("\n\n" if i % 96 == 0 else "\n") for i in range(0, 6000, 12))
    trained = BPETokenizer.train([text], 500)
    state = json.loads(trained.to_state()["tokenizer_json"])
    state["pre_tokenizer"].update(edit)
    tok = BPETokenizer.from_json(json.dumps(state))
    assert tok.engine == "HF tokenizers" and tok.piece_chars is None and trained.piece_chars == 1 << 12
    whole = tok.encode(text)
    assert tok.encode_batch([text])[0] == whole
    assert tok.encode_to_array([text], num_threads=2).tolist() == whole


@pytest.mark.parametrize("kind", KINDS)
def test_encode_to_array_is_encode_batch_flattened(tokenizers, kind):
    tok = tokenizers[kind]
    texts = [*CORPUS[:6], "", TEXT * 3]
    for bos, eos, num_threads in [(False, False, 1), (False, True, 2), (True, True, 3)]:
        flat = tok.encode_to_array(texts, bos=bos, eos=eos, num_threads=num_threads)
        assert flat.dtype == np.uint32
        assert flat.tolist() == [i for ids in tok.encode_batch(texts, bos=bos, eos=eos) for i in ids]
    assert tok.encode_to_array([], eos=True).tolist() == []


def _pseudo_words(rng, n: int) -> list[str]:
    syllables = ["th", "e", "an", "qu", "ing", "o", "st", "re", "a", "ll", "é", "日本", "x", "'s", "12", "0"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 5))) for _ in range(n)]


def test_bpe_encodes_through_tiktoken_with_the_hf_ids():
    """BPETokenizer encodes with tiktoken (rank = id); HF's merge-list BPE on the same tokenizer.json must give the
    same ids, also on text unlike the training text: new words, glued vocabulary pieces, random unicode, spaces."""
    import random

    rng = random.Random(0)
    words = _pseudo_words(rng, 40_000)
    training = [" ".join(words[i : i + 50]) + "\n" for i in range(0, len(words), 50)]
    tok = BPETokenizer.train(training, 1500)
    assert tok.engine == "tiktoken" and tok.vocab_size > 1000

    pieces = [tok.decode([i]) for i in range(6, tok.vocab_size)]
    unlike = [
        " ".join(w[::-1] + rng.choice(words) for w in _pseudo_words(rng, 3000)),  # unseen words
        "".join(rng.choice(pieces) for _ in range(5000)),  # tokens glued in an order never trained on
        "".join(chr(rng.randrange(9, 0x3000)) for _ in range(5000)),  # random unicode, controls and whitespace
        "".join(rng.choice(["a", "b", "ab", " ", "  ", "\n", "\t", "'", "ll"]) for _ in range(5000)),
        TEXT,
        "",
    ]
    for texts in (training[:200], unlike):
        hf_ids = [e.ids for e in tok._tk.encode_batch(texts, add_special_tokens=False)]
        assert tok.encode_batch(texts) == hf_ids
        assert [tok.encode(t) for t in texts] == hf_ids
        assert tok.encode_to_array(texts, num_threads=2).tolist() == [i for ids in hf_ids for i in ids]


@pytest.mark.parametrize("change", ["prefix space", "merge order", "no tiktoken"])
def test_bpe_falls_back_to_hf_where_tiktoken_would_differ(tokenizers, monkeypatch, change):
    state = json.loads(tokenizers["bpe"].to_state()["tokenizer_json"])
    if change == "prefix space":  # HF would add a space before each text; tiktoken would not
        state["pre_tokenizer"]["add_prefix_space"] = True
    elif change == "merge order":  # ids no longer grow in merge order, so tiktoken's ranks would mis-order merges
        merges = state["model"]["merges"]
        merges[0], merges[-1] = merges[-1], merges[0]
    else:
        monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` raises ImportError
    tok = BPETokenizer.from_json(json.dumps(state))
    assert tok.engine == "HF tokenizers"
    expected = tok._tk.encode(TEXT, add_special_tokens=False).ids
    assert tok.encode(TEXT) == expected
    assert tok.encode_to_array([TEXT], num_threads=2).tolist() == expected


def test_a_lone_surrogate_is_an_unknown_character_for_the_char_tokenizer():
    """JSON can carry "\\ud800": it must be the usual one-line error, not a UnicodeEncodeError."""
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(LMError, match=r"character '\\ud800' \(at offset 1\) is not in the char tokenizer's vocabulary"):
        tok.encode("a\ud800b")


@pytest.mark.parametrize("surrogate", ["\ud800", "\udbff", "\udc00", "\udfff"])
def test_the_char_tokenizer_leaves_out_every_surrogate_and_keeps_their_neighbours(surrogate):
    """Surrogates are U+D800..U+DFFF, both ends included; U+D7FF and U+E000 are ordinary characters."""
    tok = CharTokenizer.train([f"a{surrogate}\ud7ff\ue000"])
    assert tok.chars == ["a", "\ud7ff", "\ue000"]
    assert len(tok.fingerprint) == 16  # the state is valid Unicode: it hashes (and saves)


def test_training_text_with_a_lone_surrogate_gives_a_tokenizer_that_saves(tmp_path):
    """Training took the surrogate in (char) or stopped in the Rust trainer (bpe); saving and the fingerprint then
    raised UnicodeEncodeError."""
    texts = ["ab\ud800c ", "abc abd "] * 20
    char = CharTokenizer.train(texts)
    assert "\ud800" not in char.decode(list(range(char.vocab_size)))
    with pytest.raises(LMError, match="character '\\\\ud800'"):
        char.encode(texts[0])
    bpe = BPETokenizer.train(texts, vocab_size=300)
    for tok in (char, bpe):
        tok.save(tmp_path / tok.kind)
        assert tok.fingerprint == type(tok).load(tmp_path / tok.kind).fingerprint
