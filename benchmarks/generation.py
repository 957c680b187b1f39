"""Generation speed: the KV cache against recomputing the whole prefix at every step, with identical greedy tokens.

A randomly initialised GPT of a named size (weights do not change the cost), one prompt of `--prompt_len` random
tokens, `--new_tokens` greedy tokens each way. Prints a table; `--json PATH` also writes the numbers.

    python benchmarks/generation.py                      # 124m, 128-token prompt, 128 new tokens, on CPU
    python benchmarks/generation.py --size baby --device cuda --json gen.json
"""

import argparse
import json
import platform
import time

import torch
from jsonargparse.typing import PositiveInt

from lm.config import get_config
from lm.generate import stream_tokens
from lm.model import GPT


def timed(model: GPT, prompt: list[int], new_tokens: int, use_cache: bool) -> tuple[list[int], float]:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the model's GPU: without one, the current device (cuda:0)
    start = time.perf_counter()
    ids = list(stream_tokens(model, prompt, max_new_tokens=new_tokens, temperature=0, use_cache=use_cache))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ids, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="124m", help="a name of lm.config.SIZES")
    p.add_argument("--prompt_len", type=PositiveInt, default=128)
    p.add_argument("--new_tokens", type=PositiveInt, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    config = get_config(args.size)
    model = GPT(config).to(args.device).eval()
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,)).tolist()
    list(stream_tokens(model, prompt[:8], max_new_tokens=2, temperature=0))  # warm-up: first-call allocations

    cached, t_cache = timed(model, prompt, args.new_tokens, use_cache=True)
    recomputed, t_full = timed(model, prompt, args.new_tokens, use_cache=False)
    result = {
        "size": args.size,
        "params": model.num_params(),
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "kv_cache_s": round(t_cache, 3),
        "recompute_s": round(t_full, 3),
        "kv_cache_tokens_per_s": round(args.new_tokens / t_cache, 2),
        "recompute_tokens_per_s": round(args.new_tokens / t_full, 2),
        "speedup": round(t_full / t_cache, 2),
        "identical_greedy_tokens": cached == recomputed,
    }
    print(
        f"{args.size} ({result['params'] / 1e6:.0f}M params) on {args.device}, {torch.get_num_threads()} threads, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy"
    )
    print("| method | seconds | tokens/s |\n| --- | --- | --- |")
    print(f"| KV cache | {t_cache:.2f} | {result['kv_cache_tokens_per_s']} |")
    print(f"| recompute prefix | {t_full:.2f} | {result['recompute_tokens_per_s']} |")
    print(f"speedup {result['speedup']}x; identical greedy tokens: {result['identical_greedy_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
