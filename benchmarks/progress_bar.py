"""What a progress bar costs lm's training step: LanguageModel on train_throughput.py's model and batches, trained by
the same Trainer without a bar, with Lightning's default bars (rich's, tqdm's: both redrawn after every batch), rich's
at refresh rate 10 (a second: its thread's rate), tqdm's every 10 batches (lm's default in a terminal) and lm's
plain lines (what lm fit prints where the output is a file, one every trainer.log_every_n_steps steps: every 10 here,
five times as often as the CPU recipe's 50). Paired rounds in one process, each round starting one setting further
on; the table gives each setting's median ratio to no bar. A bar costs most in a terminal: run it in one (or under
`script -qc "..." /dev/null`) for the bars, with the output in a file for the lines.

    python benchmarks/progress_bar.py --rounds 6 --steps 100 [--size tiny] [--json out.json]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

sys.path.insert(0, str(Path(__file__).parent))
import train_throughput as bench  # noqa: E402 - the benchmark next to this file

from lm.__main__ import PROGRESS_BAR_REFRESH_RATE  # noqa: E402
from lm.callbacks import ProgressLines  # noqa: E402

SETTINGS = {
    "none": None,
    "rich (Lightning's default)": lambda: RichProgressBar(),
    "tqdm (Lightning's default)": lambda: TQDMProgressBar(),
    f"rich, refresh_rate {PROGRESS_BAR_REFRESH_RATE}": lambda: RichProgressBar(PROGRESS_BAR_REFRESH_RATE),
    f"tqdm, refresh_rate {PROGRESS_BAR_REFRESH_RATE} (lm's default)": lambda: TQDMProgressBar(
        PROGRESS_BAR_REFRESH_RATE
    ),
    "lines every 10 steps (lm's, in a file)": lambda: ProgressLines(every=10),
}


def seconds_per_step(config, batches, args, make_bar) -> float:
    """lm's path of train_throughput.py (LanguageModel, Trainer, Throughput), with this bar if any."""
    return bench.lightning_loop(config, batches, args, extra_callbacks=[make_bar()] if make_bar else [])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, help="as train_throughput.py (default: the CPU recipe's model)")
    p.add_argument("--steps", type=PositiveInt, default=100, help="timed steps")
    p.add_argument("--warmup", type=NonNegativeInt, default=10)
    p.add_argument("--rounds", type=PositiveInt, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shape = ["--size", args.size] if args.size else []
    bench_args = bench.parse_args([*shape, "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", "cpu"])
    config = bench.make_config(bench_args)
    batches = bench.make_batches(config, bench_args)
    names = list(SETTINGS)
    rounds = []
    for i in range(args.rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        rounds.append({name: seconds_per_step(config, batches, bench_args, SETTINGS[name]) for name in order})
    rows = [
        {
            "setting": name,
            "best_ms_per_step": round(min(r[name] for r in rounds) * 1e3, 2),
            "median_over_none": round(statistics.median(r[name] / r["none"] - 1 for r in rounds), 4),
        }
        for name in names
    ]
    print(f"{'progress bar':<40} {'best ms/step':>12} {'over none':>10}   ({args.rounds} paired rounds, CPU)")
    for row in rows:
        print(f"{row['setting']:<40} {row['best_ms_per_step']:>12.2f} {row['median_over_none']:>+10.1%}")
    result = {"torch": torch.__version__, "lightning": L.__version__, "steps": args.steps, "rows": rows}
    result["rounds_ms_per_step"] = [{k: round(v * 1e3, 2) for k, v in r.items()} for r in rounds]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
