"""Exact match of a built-in chat task through a running `lm serve`, one request at a time, and the latency.

    lm serve --ckpt runs/sft_addition/checkpoints/last.ckpt --port 8000 &
    python benchmarks/serve_tasks.py http://127.0.0.1:8000 --task addition --num_problems 500

The problems are `lm tasks eval`'s (the test split, same seed), answered greedily, so the two must agree.
"""

import argparse
import json
import time
import urllib.request

from jsonargparse.typing import PositiveInt

from lm.tasks import make_problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--task", default="addition")
    p.add_argument("--num_problems", type=PositiveInt, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max_tokens",
        type=PositiveInt,
        default=None,
        help="the reply's budget (default: as lm tasks eval gives it with a char tokenizer, the longest answer's "
        "characters + 4; give eval's own, its longest answer's tokens + 4, for another tokenizer)",
    )
    args = p.parse_args(argv)

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    problems = make_problems(args.task, "test", args.num_problems, seed=args.seed)
    # lm tasks eval's budget, counted in characters (each is one token of the task recipes' char tokenizer): the fixed
    # 8 of before was one more than eval's 7 for addition's default 2 digits
    max_tokens = args.max_tokens or max(len(p.answer) for p in problems) + 4
    correct, latencies, tokens = 0, [], 0
    for problem in problems:
        # lm tasks eval's decoding: greedy, and no repetition penalty (the server's default is lm chat's 1.1, which
        # changed answers that repeat the question's digits)
        body = {
            "messages": [{"role": "user", "content": problem.question}],
            "temperature": 0,
            "repetition_penalty": 1.0,
        }
        body["max_tokens"] = max_tokens
        request = urllib.request.Request(
            args.url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        start = time.perf_counter()
        with opener.open(request, timeout=60) as response:
            reply = json.loads(response.read())
        latencies.append(time.perf_counter() - start)
        tokens += reply["usage"]["completion_tokens"]
        correct += reply["choices"][0]["message"]["content"].strip() == problem.answer
    n = len(problems)
    latencies.sort()
    print(
        f"{args.task}: exact match {correct}/{n} = {correct / n:.1%}; latency median {latencies[n // 2] * 1e3:.1f} ms, "
        f"p90 {latencies[int(n * 0.9)] * 1e3:.1f} ms; {tokens / sum(latencies):.0f} completion tokens/s"
    )


if __name__ == "__main__":
    main()
