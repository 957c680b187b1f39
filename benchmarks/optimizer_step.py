"""Optimizer step time alone: lm's optimizers against torch.optim.Muon, on a GPT's parameters with random gradients.

The rows: fused AdamW for every parameter (`model.optimizer: adamw`); Muon for the hidden matrices and AdamW for
the rest (`model.optimizer: muon`), with lm.optim.Muon (batched by shape) and with torch.optim.Muon (matrix by
matrix) in its place; and lm's Muon given a `found_inf` flag on the device, as training passes it. No forward or
backward pass: the difference between two rows is what the optimizer costs a training step. Each row also counts
the ops one step runs (views excluded): on a GPU, about the kernels the host has to launch.

    python benchmarks/optimizer_step.py                                   # CPU: the CPU recipe's model
    python benchmarks/optimizer_step.py --size 124m --device cuda --json optimizer_step.json
"""

import argparse
import json
import time
from dataclasses import replace

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils._python_dispatch import TorchDispatchMode

from lm.config import SIZES
from lm.model import GPT
from lm.optim import MuonWithAdamW, build_optimizer

CPU_RECIPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}  # as benchmarks/train_throughput.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, choices=sorted(SIZES), help="default: the CPU recipe's 4-layer, 128-wide")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=PositiveInt, default=50, help="timed steps per row")
    p.add_argument("--warmup", type=NonNegativeInt, default=5)
    p.add_argument(
        "--repeats", type=PositiveInt, default=2, help="go through the rows this many times; report the best"
    )
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def make_model(args) -> GPT:
    config = replace(SIZES["baby"], **CPU_RECIPE) if args.size is None else SIZES[args.size]
    torch.manual_seed(0)
    model = GPT(replace(config, tie_embeddings=args.size == "124m")).to(args.device)  # 124m: GPT-2's tied head
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def make_optimizer(model: GPT, row: str) -> torch.optim.Optimizer:
    hyper = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}
    optimizer, _ = build_optimizer(model, "adamw" if row == "adamw" else "muon", **hyper)
    if row == "muon_torch":  # the same parameters and settings, through torch.optim.Muon
        muon = torch.optim.Muon(
            optimizer.muon.param_groups[0]["params"], lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
        )
        optimizer = MuonWithAdamW(muon, optimizer.adamw)
    return optimizer


class CountOps(TorchDispatchMode):
    """Counts the ops that reach a kernel (views and metadata ops excluded): what the host launches on a GPU."""

    FREE = {"view", "_unsafe_view", "t", "transpose", "unbind", "select", "detach", "alias", "expand", "as_strided"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def time_row(model: GPT, row: str, args) -> tuple[float, int]:
    """Seconds per optimizer step, and the ops one step runs."""
    optimizer = make_optimizer(model, row)
    flag = torch.zeros((), device=args.device) if row == "muon_flag" else None
    if flag is not None and flag.device.type == "cpu":
        raise SystemExit("the muon_flag row is for a GPU: on a CPU the flag is read on the host")

    def step():
        if flag is not None:
            optimizer.found_inf = flag
        optimizer.step()

    for _ in range(args.warmup):
        step()
    with CountOps() as counter:
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize(args.device)  # the device it runs on: without one, the current device (cuda:0)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize(args.device)
    return (time.perf_counter() - start) / args.steps, counter.count


def main(argv=None):
    args = parse_args(argv)
    model = make_model(args)
    rows = ["adamw", "muon", "muon_torch"] + (["muon_flag"] if args.device.startswith("cuda") else [])
    best, ops = {row: float("inf") for row in rows}, {}
    for _ in range(args.repeats):
        for row in rows:
            seconds, ops[row] = time_row(model, row, args)
            best[row] = min(best[row], seconds)
    hidden = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers."))
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": args.size or "cpu recipe",
        "params": model.num_params(),
        "hidden_matrix_params": hidden,
        "steps": args.steps,
        "ms_per_step": {row: round(seconds * 1e3, 3) for row, seconds in best.items()},
        "ops_per_step": ops,
    }
    print(
        f"{result['device']}, torch {result['torch']}, {result['size']}: {result['params'] / 1e6:.2f}M params, "
        f"{hidden / 1e6:.2f}M in hidden matrices; best of {args.repeats} x {args.steps} steps"
    )
    print(f"{'optimizer':<12} {'ms/step':>9} {'ops/step':>9}")
    for row, ms in result["ms_per_step"].items():
        print(f"{row:<12} {ms:>9.3f} {ops[row]:>9,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
