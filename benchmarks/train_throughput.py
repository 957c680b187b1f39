"""Training throughput of one GPT through `lm`'s Lightning path and through a minimal raw PyTorch loop, same run.

Both train the same model (same init), on the same random token batches, with the same optimizer, precision,
clipping and compile setting; the table reports ms/step, tokens/s, MFU (where the device's peak is known) and peak
memory, and the Lightning path's overhead over the raw loop.

    python benchmarks/train_throughput.py                                   # CPU: a 4-layer, 128-wide model
    python benchmarks/train_throughput.py --size 124m --batch 32 --device cuda --precision bf16 --compile
    python benchmarks/train_throughput.py ... --json results.json
"""

import argparse
import json
import resource
import time
import warnings
from dataclasses import asdict, replace

import lightning as L
import torch

from lm.callbacks import Throughput, peak_flops
from lm.config import SIZES
from lm.model import GPT
from lm.module import LanguageModel, next_token_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="baby", choices=sorted(SIZES))
    p.add_argument("--n_layer", type=int, default=4, help="override the size's depth (CPU default: 4)")
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--vocab_size", type=int, default=None, help="default: the size's vocabulary")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--steps", type=int, default=60, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, allocator)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="alternate raw/lm this many times; report the best of each")
    p.add_argument("--tie_embeddings", action="store_true", help="share the embedding with the head (GPT-2 124M)")
    p.add_argument(
        "--sync_debug",
        action="store_true",
        help="CUDA: report every host synchronisation during the lm path's timed steps (torch sync debug mode)",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.size in ("124m", "350m") and args.n_layer == 4 and args.n_embd == 128:
        args.n_layer = args.n_head = args.n_embd = args.block_size = None  # keep the named size as it is
    return args


def make_config(args):
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(SIZES[args.size], **overrides, dropout=0.0, tie_embeddings=args.tie_embeddings)


def make_batches(config, args) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    n = args.warmup + args.steps
    tokens = torch.randint(0, config.vocab_size, (n, args.batch, config.block_size + 1), generator=g)
    batches = [{"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()} for t in tokens]
    if args.device.startswith("cuda"):  # page-locked, like the DataLoader's pin_memory gives the Lightning path
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    return batches


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark, KB -> MB


def raw_loop(config, batches, args) -> float:
    """Seconds per step of the plain loop: forward, loss, backward, clip, AdamW step."""
    torch.manual_seed(0)
    model = GPT(config).to(args.device)
    loss_fn = next_token_loss
    if args.compile:  # the model and the loss, as LanguageModel compiles them
        model.compile()
        loss_fn = torch.compile(next_token_loss)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
        fused=True,  # as LanguageModel's
    )
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")
    start = None
    for i, batch in enumerate(batches):
        if i == args.warmup:
            sync(args.device)
            start = time.perf_counter()
        x = batch["input_ids"].to(args.device, non_blocking=True)
        y = batch["labels"].to(args.device, non_blocking=True)
        with autocast:
            loss, _ = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(args.device)
    return (time.perf_counter() - start) / args.steps


class _StepTimer(L.Callback):
    """Times the steps after warm-up; with sync_debug, records where the host waited for the GPU meanwhile."""

    def __init__(self, warmup: int, device: str, sync_debug: bool = False):
        self.warmup, self.device, self.start, self.end = warmup, device, None, None
        self.sync_debug = sync_debug and device.startswith("cuda")
        self.syncs: list[str] = []
        self._recorder = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
            if self.sync_debug:
                self._recorder = warnings.catch_warnings(record=True)
                self._records = self._recorder.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module):
        if self._recorder is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._recorder.__exit__(None, None, None)
            self.syncs = [f"{w.filename}:{w.lineno}" for w in self._records if "synchroniz" in str(w.message)]
        sync(self.device)
        self.end = time.perf_counter()


def lightning_loop(config, batches, args) -> float:
    """Seconds per step through LanguageModel + Trainer, as `lm fit` runs it (minus data loading from disk)."""
    torch.manual_seed(0)
    module = LanguageModel(config, lr=1e-3, warmup_steps=10, weight_decay=0.1, compile=args.compile)
    timer = _StepTimer(args.warmup, args.device, args.sync_debug)
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_steps=len(batches),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, Throughput()],
        log_every_n_steps=50,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    if timer.sync_debug:
        sites = {site: timer.syncs.count(site) for site in dict.fromkeys(timer.syncs)}
        print(f"host syncs in {args.steps} timed lm steps: {len(timer.syncs)}", sites)
        lightning_loop.syncs = sites
    return (timer.end - timer.start) / args.steps


def main(argv=None):
    args = parse_args(argv)
    config = make_config(args)
    batches = make_batches(config, args)
    tokens_per_step = args.batch * config.block_size
    flops_per_token = GPT(config).flops_per_token(config.block_size)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = peak_flops(torch.device(args.device), dtype)

    best = {"raw": float("inf"), "lm": float("inf")}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        best["raw"] = min(best["raw"], raw_loop(config, batches, args))
        best["lm"] = min(best["lm"], lightning_loop(config, batches, args))

    rows = []
    for name, seconds in best.items():
        tps = tokens_per_step / seconds
        rows.append(
            {
                "path": name,
                "ms_per_step": round(seconds * 1e3, 2),
                "tokens_per_sec": round(tps),
                "mfu": round(tps * flops_per_token / peak, 4) if peak else None,
            }
        )
    overhead = best["lm"] / best["raw"] - 1
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "threads": torch.get_num_threads(),
        "config": asdict(config),
        "batch": args.batch,
        "precision": args.precision,
        "compile": args.compile,
        "steps": args.steps,
        "params": GPT(config).num_params(),
        "rows": rows,
        "lightning_overhead": round(overhead, 4),
        "peak_memory_mb": round(peak_memory_mb(args.device)),
        "host_syncs": getattr(lightning_loop, "syncs", None),
    }
    print(
        f"{result['device']}, torch {result['torch']}, {result['params'] / 1e6:.2f}M params, batch {args.batch} x "
        f"{config.block_size}, precision {args.precision}, compile {args.compile}, {args.steps} timed steps"
    )
    print(f"{'path':<6} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7}")
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(f"{row['path']:<6} {row['ms_per_step']:>9.2f} {row['tokens_per_sec']:>10,} {mfu:>7}")
    print(f"Lightning overhead: {overhead:+.1%}; peak memory {result['peak_memory_mb']} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
