"""The one generation engine: KV-cache decoding of a batch of prompts, sampling, stop conditions, streaming.

`lm generate`, `lm chat`, `lm serve`, the sample callback and the task evaluations all call this module:

    stream_batch(model, prompts, ...)           -> per step, one new token per row (None once a row has stopped)
    generate_batch(model, prompts, ...)         -> the new tokens of every row
    stream_tokens(model, prompt_ids, ...)       -> new token ids of one prompt, one at a time
    stream_text(model, tokenizer, ids, ...)     -> new text of one prompt, piece by piece, honouring stop strings
    generate_text(model, tokenizer, prompt)     -> continuation text of one prompt

Prompts of different lengths are left-padded into one batch; the KV cache's `valid` mask hides the padding from
attention, RoPE is relative, and each row keeps its own context window past block_size, so every row decodes as it
would alone. Sampling: temperature (0 = greedy), top-k, top-p, repetition penalty; bad values raise LMError before any
work. Stopping: max_new_tokens, stop token ids (not yielded) and stop strings (not returned).

    lm generate --ckpt runs/quickstart/checkpoints/last.ckpt --prompt "ROMEO:" --max_new_tokens 200
    python benchmarks/generation.py   # the KV cache against recomputing the prefix, on the 124m shape
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lm.errors import LMError
from lm.model import GPT, KVCache

DEFAULT_MAX_NEW_TOKENS = 256
DECODE_CONTEXT_TOKENS = 8  # prompt tokens a continuation is decoded after (continuation_decoder)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> (B,). temperature 0 means greedy; top_k 0 or None and top_p None or
    1 filter nothing."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    # Shifted so the top logit is 0 before the division, and the temperature kept above float32's underflow: a tiny
    # temperature then sends the other logits to -inf (not the top one to +inf, or 0/0), so it tends to greedy.
    logits = logits.float()
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays).
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop_sorted[..., 0] = False  # even for top_p <= 0: an empty set would make softmax NaN
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as in transformers: for every token already in the row (seen: (B, V)
    bool), a positive logit is divided by `penalty` and a negative one multiplied. A penalty above 1 makes those
    tokens less likely (a logit of exactly 0 stays), one below 1 more likely."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def check_sampling(
    *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0
) -> None:
    """Raise LMError naming the first sampling argument out of range (they come from users: CLI flags, requests)."""
    # Each test reads "not in range" rather than "out of range": NaN fails every comparison, so it is refused too.
    if not (math.isfinite(temperature) and temperature >= 0):
        raise LMError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not top_k >= 0:
        raise LMError(f"top_k must be at least 0 (0 = no top-k filter), got {top_k}")
    # 0 keeps the top token alone (greedy), as OpenAI's API and transformers take it; vLLM refuses it
    if top_p is not None and not 0 <= top_p <= 1:
        raise LMError(f"top_p must be in [0, 1] (0: the top token only; unset: no top-p filter), got {top_p}")
    # Bounded: a penalty of 1e-300 divides a logit into inf, and sampling from inf - inf fails
    if not 1e-3 <= repetition_penalty <= 1e3:
        raise LMError(f"repetition_penalty must be in [0.001, 1000] (1 = off), got {repetition_penalty}")


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> ids (B, T) padded on the left with 0, and valid (B, T) bool (False on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        valid[i, width - len(row) :] = True
    return ids.to(device), valid.to(device)


def _cache_dtype(model: GPT, device: torch.device) -> torch.dtype:
    """The dtype attention computes in: under autocast (bf16-mixed: TaskAccuracy, EvalCallback) its dtype, as autocast
    casts scaled_dot_product_attention's keys and values to it at every step. A cache of the fp32 weights' dtype held
    twice the memory for the same bf16 attention, and was cast whole at every step."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.lm_head.weight.dtype


def _prefill(model: GPT, rows: list[list[int]], device, feeds: int) -> tuple[KVCache, torch.Tensor]:
    """A fresh cache holding `rows` (left-padded when their lengths differ) and room for `feeds` more positions (the
    tokens still to be fed; block_size at most, where the next slide rebuilds it); returns it and the last logits
    (B, V). Sized to what is left, not to block_size: TaskAccuracy's 64 short prompts with answers of a few tokens
    took a block_size cache, 4.5 GiB on the 124m shape where 0.2 GiB holds them."""
    max_len = min(model.config.block_size, max(len(r) for r in rows) + feeds)
    cache = KVCache(model.config, len(rows), max_len, device=device, dtype=_cache_dtype(model, device))
    ids, valid = _left_pad(rows, device)
    if not valid.all():  # only padded batches need the mask; one prompt keeps SDPA's fast causal path
        cache.valid = torch.ones(len(rows), max_len, dtype=torch.bool, device=device)
        cache.valid[:, : ids.size(1)] = valid
    return cache, model(ids, cache=cache, last_only=True)[:, -1]


@torch.no_grad()
def stream_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    vocab_size: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    row_finished: Callable[[int, Sequence[int]], bool] | None = None,
) -> Iterator[list[int | None]]:
    """Decode a batch of prompts (token id lists, any lengths) together; each step yields one entry per row: its new
    token, or None once the row has stopped (a stop token, which is not yielded). Ends when every row has stopped or
    after max_new_tokens steps.

    row_finished(i, new_tokens), asked after each token of a running row i, with that row's new tokens so far: True
    stops the row after this token, which is yielded (generate_texts stops a row once its text holds a stop string).

    Every row has its own context window, rows[i][starts[i]:]: a prompt longer than block_size starts with its last
    block_size tokens, and when a row's context outgrows block_size it slides to its last block_size // 2 tokens (at
    least one), so generation can run past block_size. With the cache, each step feeds one token per row, and a slide
    rebuilds the shared cache (one prefill); the rows whose context still fits keep their window, so each row sees
    exactly the tokens it would see decoded alone. The cost, not a correctness issue: a batch whose rows outgrow
    block_size at different steps rebuilds for each of them, more often than any row alone would. A row that has stopped
    is cut to its last token at the next rebuild (it is never read again), so it stops widening the cache. Without the
    cache, each step recomputes every row's window alone, the same windows: slow, kept as the reference for tests and
    benchmarks.
    vocab_size: the tokenizer's size; the embedding rows past it are padding and are never sampled.
    Raises LMError for a sampling argument out of range (see `check_sampling`).
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token (e.g. the tokenizer's BOS)")
    device = next(model.parameters()).device
    block_size = model.config.block_size
    rows = [list(p) for p in prompts]
    prompt_lengths = [len(p) for p in prompts]
    # Where each row's context window begins (the cache holds rows[i][starts[i]:]): a long prompt's last block_size.
    starts = [max(0, len(r) - block_size) for r in rows]
    running = [True] * len(rows)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(rows), model.config.vocab_size, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            seen[i, row] = True
        # The tokens that end a reply are never penalised: a chat prompt holds <|end|> after every turn, and SFT
        # trains each reply to end with it, so penalising it as "seen" would make every reply less likely to end.
        seen[:, stop[(stop >= 0) & (stop < seen.size(1))]] = False  # an id past the vocabulary can never be seen
    cache, next_ids = None, None
    for step in range(max_new_tokens):
        if cache is None or not use_cache or cache.pos + 1 > cache.max_len:
            # First step, no cache, or the cache is full (its widest row outgrew block_size): slide every running
            # window that no longer fits, and cut each finished row to its last token: it is never read again, so it
            # must not fill the cache again and force rebuilds that no running row needs.
            for i, row in enumerate(rows):
                if not running[i]:
                    starts[i] = len(row) - 1
                elif len(row) - starts[i] > block_size:
                    starts[i] = len(row) - max(1, block_size // 2)  # a context of 1 keeps its 1 token
            windows = [r[s:] for r, s in zip(rows, starts, strict=True)]
            if use_cache:
                cache = None  # freed first: the old cache and the new one held together twice a full cache's memory
                cache, logits = _prefill(model, windows, device, max_new_tokens - step - 1)  # the feeds left
            else:
                logits = torch.cat([model(torch.tensor([w], device=device), last_only=True)[:, -1] for w in windows])
        else:
            logits = model(next_ids[:, None], cache=cache)[:, -1]
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen[:, : logits.size(-1)], repetition_penalty)
        next_ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if seen is not None:
            seen[torch.arange(len(rows), device=device), next_ids] = True
        stopped = torch.isin(next_ids, stop).tolist()
        step: list[int | None] = []
        for i, token in enumerate(next_ids.tolist()):
            running[i] = running[i] and not stopped[i]
            step.append(token if running[i] else None)
            rows[i].append(token)  # finished rows keep decoding (simpler than shrinking the batch); nobody reads it
            if running[i] and row_finished is not None and row_finished(i, rows[i][prompt_lengths[i] :]):
                running[i] = False  # after this token, which is yielded: it is part of the row's text
        if any(token is not None for token in step):
            yield step
        if not any(running):
            return


def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], **sampling) -> list[list[int]]:
    """The new tokens of every prompt (stop tokens excluded); see `stream_batch` for the sampling arguments."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_batch(model, prompts, **sampling):
        for row, token in zip(out, step, strict=True):
            if token is not None:
                row.append(token)
    return out


def stream_tokens(model: GPT, prompt_ids: Sequence[int], **sampling) -> Iterator[int]:
    """Yield the new token ids of one prompt until max_new_tokens or a stop token (which is not yielded).

    Arguments as `stream_batch`: max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids,
    vocab_size, use_cache, generator.
    """
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token (e.g. the tokenizer's BOS)")
    for (token,) in stream_batch(model, [prompt_ids], **sampling):
        yield token


def _first_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in text, or None when there is none. A partial character at the end
    (a BPE token can stop mid-character) is left out: a stop string before it is found now, not a token later."""
    text = text.rstrip("\ufffd")
    # an empty stop string is no stop (lm-eval skips them too); "".find would cut every text at 0
    return min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=None)


def continuation_decoder(
    tokenizer, prompt_ids: Sequence[int], skip_special: bool = False
) -> Callable[[Sequence[int]], str]:
    """A function from a continuation's ids to the text they add after the prompt.

    Decoded alone, a continuation can lose the space it starts with: Metaspace (SentencePiece-style, as Llama's and
    Mistral's tokenizer.json) decoders strip the space that begins a decoded text, so "Hello" continued by " world"
    read "Helloworld". So the continuation is decoded after the prompt's last tokens (at most DECODE_CONTEXT_TOKENS,
    and none before the last special token: the text after a chat marker was encoded on its own, and begins the
    text), and the context's own text is cut off. Where the context's text does not begin the whole (it ends inside a
    character that the continuation completes) the continuation is decoded alone. lm's own tokenizers (char, byte
    level) give the same text either way."""
    specials = set(tokenizer.special_ids.values())
    context: list[int] = []
    for token in reversed(list(prompt_ids)[-DECODE_CONTEXT_TOKENS:]):
        if token in specials:
            break
        context.append(token)
    context.reverse()
    prefix = tokenizer.decode(context, skip_special=skip_special)

    def decode(ids: Sequence[int]) -> str:
        if context:
            whole = tokenizer.decode(context + list(ids), skip_special=skip_special)
            if whole.startswith(prefix):
                return whole[len(prefix) :]
        return tokenizer.decode(ids, skip_special=skip_special)

    return decode


def _stop_cut(decode: Callable[[Sequence[int]], str], ids: Sequence[int], stop_strings: Sequence[str]) -> int | None:
    """Where `stream_text` cuts the text of these tokens (decoded by a `continuation_decoder`): at the earliest stop
    string in the text of the shortest token prefix that holds one (with overlapping stop strings, the first to
    complete decides), or None."""

    def text(n: int) -> str:
        return decode(ids[:n])

    if not stop_strings or _first_stop(text(len(ids)), stop_strings) is None:
        return None  # the common case: one decode
    return next(cut for n in range(1, len(ids) + 1) if (cut := _first_stop(text(n), stop_strings)) is not None)


@dataclass
class Finish:
    """How a stream_text stream ended, for callers that report it (lm serve's usage and finish_reason)."""

    tokens: int = 0  # new tokens generated; a stop token is not counted, the tokens of a stop string are
    reason: str = "stop"  # "length": max_new_tokens ran out first; "stop": a stop token or stop string


def stream_text(
    model: GPT,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    stop_strings: Sequence[str] = (),
    finish: Finish | None = None,
    skip_special: bool = False,
    **sampling,
) -> Iterator[str]:
    """Yield the continuation of one prompt as text pieces, for printing as they come.

    Stops at a stop token (default: the tokenizer's EOS) or at the first stop string, which is not yielded: text that
    could still become a stop string is held back until it cannot. A BPE token can end mid-character, so text is
    only released once it decodes cleanly. A `finish` passed in is filled in when the stream ends. skip_special:
    special tokens that are not stop tokens leave no text (a chat reply must not hold marker strings).
    """
    sampling.setdefault("stop_ids", (tokenizer.eos_id,))
    sampling.setdefault("vocab_size", tokenizer.vocab_size)
    finish = finish if finish is not None else Finish()
    decode = continuation_decoder(tokenizer, prompt_ids, skip_special)
    ids: list[int] = []
    released = 0  # characters of the decoded continuation already yielded
    for token in stream_tokens(model, prompt_ids, **sampling):
        ids.append(token)
        finish.tokens = len(ids)
        text = decode(ids)
        cut = _first_stop(text, stop_strings)
        if cut is not None:
            if cut > released:
                yield text[released:cut]
            return
        if text.endswith("\ufffd"):  # a partial character: released once it decodes whole
            continue
        # Hold back the longest tail that is a prefix of a stop string.
        # (n up to the text's length: a long stop string must not cost its length squared per token)
        hold = max(
            (n for s in stop_strings for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])), default=0
        )
        if len(text) - hold > released:
            yield text[released : len(text) - hold]
            released = len(text) - hold
    # The stream ended (a stop token, max_new_tokens), maybe on text the loop skipped (a partial character at the
    # end) or held back: it can still hold a stop string.
    text = decode(ids)
    cut = _first_stop(text, stop_strings)
    # No stop token ended it (stream_tokens ran every step) and no stop string cut it: the length limit did.
    end = len(text) if cut is None else cut
    if cut is None and len(ids) == sampling.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS):
        finish.reason = "length"
        # The limit cut the last character short: its first bytes are no text. (Text cannot tell them from a U+FFFD the
        # model wrote as the very last character, which is dropped too.)
        end = len(text.rstrip("\ufffd"))
    if end > released:
        yield text[released:end]


def generate_text(model: GPT, tokenizer, prompt: str, **sampling) -> str:
    """Prompt text in, continuation text out (without the prompt). Stops at the tokenizer's EOS and `stop_strings`.

    Pretraining documents are packed as `text EOS text EOS ...`, so an empty prompt starts from EOS: the state the
    model is in at the beginning of a document.
    """
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    return "".join(stream_text(model, tokenizer, prompt_ids, **sampling))


def generate_texts(
    model: GPT,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    stop_strings: Sequence[str] = (),
    skip_special: bool = False,
    **sampling,
) -> list[str]:
    """A batch of prompts (token ids) -> the decoded continuation of each, cut where `stream_text` would cut it
    (with skip_special, special tokens decode to nothing, as `stream_text(skip_special=True)` shows them in chat).
    A row stops at the token that completes a stop string, and the batch once every row has stopped: a one-line answer
    cut at the newline costs its own few steps, not max_new_tokens."""
    sampling.setdefault("stop_ids", (tokenizer.eos_id,))
    sampling.setdefault("vocab_size", tokenizer.vocab_size)
    decoders = [continuation_decoder(tokenizer, prompt, skip_special) for prompt in prompts]
    stopped_texts: dict[int, str] = {}  # a row a stop string stopped: its text at that token

    def holds_stop_string(row: int, ids: Sequence[int]) -> bool:
        # The whole continuation is decoded at every step, as stream_text does: a token's text alone is not its part
        # of the whole (a BPE token can end mid-character, a Metaspace decoder strips a text's first space), and a
        # stop string can span tokens.
        text = decoders[row](ids)
        if _first_stop(text, stop_strings) is None:
            return False
        stopped_texts[row] = text
        return True

    batch = generate_batch(model, prompts, row_finished=holds_stop_string if stop_strings else None, **sampling)
    texts = []
    for row, (decode, ids) in enumerate(zip(decoders, batch, strict=True)):
        if row in stopped_texts:  # the first token prefix holding a stop string is the whole: no need to search
            text = stopped_texts[row]
            cut = _first_stop(text, stop_strings)
        else:
            text = decode(ids)
            cut = _stop_cut(decode, ids, stop_strings)
        if cut is None and len(ids) == sampling.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS):
            cut = len(text.rstrip("\ufffd"))  # as stream_text: a character the limit cut short is left out
        texts.append(text if cut is None else text[:cut])
    return texts
