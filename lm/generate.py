"""The one generation engine: KV-cache decoding with temperature / top-k / top-p sampling, stop tokens, streaming.

`lm generate`, the sample callback (and later chat, eval and serve) all call `stream_tokens` / `generate_text`.

    lm generate --ckpt runs/quickstart/checkpoints/last.ckpt --prompt "ROMEO:" --max_new_tokens 200
"""

from collections.abc import Iterator, Sequence

import torch

from lm.model import GPT, KVCache


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> (B,). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays).
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_tokens(
    model: GPT,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    vocab_size: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time until max_new_tokens or a stop token (which is not yielded).

    With the cache, each step feeds one token. When the context fills up, the cache is rebuilt from the last half
    of the context, so generation can run past block_size (like a sliding window, at the cost of one prefill).
    Without the cache, each step recomputes the (cropped) prefix: slow, kept as the reference for tests.
    vocab_size: the tokenizer's size; the embedding rows past it are padding and are never sampled.
    """
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token (e.g. the tokenizer's BOS)")
    device = next(model.parameters()).device
    block_size = model.config.block_size
    tokens = list(prompt_ids)
    cache = None
    pending = tokens[-block_size:]  # tokens not yet in the cache
    for _ in range(max_new_tokens):
        if use_cache:
            if cache is None or cache.pos + len(pending) > block_size:
                cache = KVCache(model.config, 1, block_size, device=device, dtype=model.lm_head.weight.dtype)
                pending = tokens[-(block_size // 2) :] if len(tokens) >= block_size else tokens
            logits = model(torch.tensor([pending], device=device), cache=cache)[:, -1]
        else:
            logits = model(torch.tensor([tokens[-block_size:]], device=device))[:, -1]
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        next_id = int(sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator))
        if next_id in stop_ids:
            return
        tokens.append(next_id)
        pending = [next_id]
        yield next_id


def generate_text(model: GPT, tokenizer, prompt: str, **sampling) -> str:
    """Prompt text in, continuation text out (without the prompt). Stops at the tokenizer's EOS.

    Pretraining documents are packed as `text EOS text EOS ...`, so an empty prompt starts from EOS: the state the
    model is in at the beginning of a document.
    """
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    sampling.setdefault("stop_ids", (tokenizer.eos_id,))
    sampling.setdefault("vocab_size", tokenizer.vocab_size)
    return tokenizer.decode(list(stream_tokens(model, prompt_ids, **sampling)))
