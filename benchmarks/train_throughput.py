"""Training throughput of one GPT through `lm`'s Lightning path and through a minimal raw PyTorch loop, same run.

Both train the same model (the same initial weights on CPU; on CUDA, Lightning builds lm's model on the GPU, whose
random numbers differ), on the same random token batches, with the same optimizer, LR schedule, precision, clipping
and compile setting, and read the loss at the same logging interval; the table reports ms/step, tokens/s, MFU (where
the device's peak is known) and peak memory, and the Lightning path's overhead over the raw loop.

    python benchmarks/train_throughput.py                                   # CPU: a 4-layer, 128-wide model
    python benchmarks/train_throughput.py --size 124m --batch 32 --device cuda --precision bf16 --compile
    python benchmarks/train_throughput.py ... --json results.json
    python benchmarks/train_throughput.py ... --fp8                         # float8 block matmuls (lm[fp8], sm89+)
    python benchmarks/train_throughput.py ... --optimizer muon              # Muon for the hidden matrices
    python benchmarks/train_throughput.py ... --profile prof/               # then where each path's step time goes
    python benchmarks/train_throughput.py ... --bare                        # split the overhead: Lightning's, lm's
    python benchmarks/train_throughput.py --interleave --repeats 3 --steps 300  # CPU: raw and lm steps alternate
"""

import argparse
import gc
import json
import resource
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from lm.__main__ import LMCLI
from lm.callbacks import peak_flops
from lm.config import SIZES
from lm.model import GPT
from lm.module import LanguageModel, convert_to_fp8, lr_multiplier, next_token_loss
from lm.optim import build_optimizer

PROFILE_STEPS = 5  # steps recorded by --profile, after the warm-up steps
LR, WARMUP_STEPS, LOG_EVERY = 1e-3, 10, 50  # both paths: peak LR, its warm-up steps, and the logging interval
CPU_RECIPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}  # the default model, on baby's vocabulary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size",
        default=None,
        choices=sorted(SIZES),
        help="a named size of lm.config (default: the CPU recipe's model, baby's vocabulary with 4 layers, 4 heads, "
        "128 wide, context 64)",
    )
    p.add_argument("--n_layer", type=PositiveInt, default=None, help="override the size's depth")
    p.add_argument("--n_head", type=PositiveInt, default=None, help="override the size's heads")
    p.add_argument("--n_embd", type=PositiveInt, default=None, help="override the size's width")
    p.add_argument("--block_size", type=PositiveInt, default=None, help="override the size's context")
    p.add_argument("--vocab_size", type=PositiveInt, default=None, help="default: the size's vocabulary")
    p.add_argument("--batch", type=PositiveInt, default=12)
    p.add_argument("--steps", type=PositiveInt, default=60, help="timed steps")
    p.add_argument("--warmup", type=NonNegativeInt, default=10, help="untimed steps first (compilation, allocator)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fp8", action="store_true", help="float8 matmuls in the blocks (torchao), as model.fp8 does")
    p.add_argument(
        "--activation_checkpointing",
        action="store_true",
        help="recompute each block in the backward, as model.activation_checkpointing does",
    )
    p.add_argument(
        "--optimizer", choices=["adamw", "muon"], default="adamw", help="as model.optimizer (muon: for hidden matrices)"
    )
    p.add_argument(
        "--repeats",
        type=PositiveInt,
        default=2,
        help="run the paths this many times, in turns, each repeat starting one path further on (a multiple of the "
        "number of paths puts each in every place equally); report the best of each, and the median of each repeat's "
        "overhead",
    )
    p.add_argument("--tie_embeddings", action="store_true", help="share the embedding with the head (GPT-2 124M)")
    p.add_argument(
        "--sync_debug",
        action="store_true",
        help="CUDA: then run the lm path once more, untimed, reporting every host synchronisation in its steps after "
        "warm-up (torch sync debug mode; recording them inside a timed run would slow the lm path only)",
    )
    p.add_argument(
        "--bare",
        action="store_true",
        help="also time a bare LightningModule on the same Trainer, lm fit's (the model, the loss, the same schedule, "
        "Lightning's own clipping; none of LanguageModel's hooks): splits the overhead into Lightning's loop with lm "
        "fit's callbacks, and LanguageModel's",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="CPU: run one raw-loop step before each lm step in the same fit, timing each apart, instead of the "
        "paths one after the other: the machine's drift then hits both alike (each repeat is one such fit)",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help=f"then run each path once more under torch.profiler ({PROFILE_STEPS} steps after warm-up) and write "
        "where the time goes (top kernels, and by category) to DIR/profile_{raw,lm}.txt",
    )
    args = p.parse_args(argv)
    if args.interleave and (args.bare or args.device.startswith("cuda") or args.steps < 2):
        # A GPU step would need a sync around each timed part, which exposes the host work a GPU otherwise overlaps;
        # the last lm step is not timed, so one step leaves no pair
        p.error("--interleave: CPU only, without --bare, and at least 2 --steps")
    if args.profile and args.warmup < 1:  # the profiler's own warm-up step is one of them; compilation another
        p.error("--profile needs --warmup 1 or more (the profiled steps come after an untimed profiler warm-up)")
    if args.device.startswith("cuda:") and torch.device(args.device).index != 0:
        # Lightning's devices=1 is the first GPU: the two paths would train on different cards
        p.error("--device cuda:N: one GPU, the first; pick another with CUDA_VISIBLE_DEVICES=N and --device cuda")
    if args.size is None:  # the CPU recipe's model; a flag given still overrides its part
        args.size = "baby"
        for key, value in CPU_RECIPE.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
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
    if args.device.startswith("cuda"):  # page-locked, as lm's data loaders pin them, for every path alike
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    return batches


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark, KB -> MB


def model_and_loss(config, args):
    """The model (seeded as the lm path's) and the loss of the raw and bare paths, on the device, converted to float8
    and compiled as LanguageModel.configure_model does."""
    torch.manual_seed(0)
    model = GPT(config).to(args.device)
    model.checkpoint_layers = args.activation_checkpointing
    if args.fp8:  # before compiling, as LanguageModel.configure_model does
        convert_to_fp8(model, torch.device(args.device))
    loss_fn = next_token_loss
    if args.compile:  # the model and the loss, as LanguageModel compiles them
        model.compile()
        loss_fn = torch.compile(next_token_loss)
    return model, loss_fn


def make_optimizer(model, args):
    """lm's optimizer with LanguageModel's settings (decay groups; Muon for the hidden matrices with --optimizer)."""
    return build_optimizer(model, args.optimizer, lr=LR, weight_decay=0.1, betas=(0.9, 0.95))[0]


def lr_factor(step: int, total_steps: int) -> float:
    """LanguageModel's warm-up and cosine schedule, as the lm path runs it: the fraction of LR at `step`."""
    return lr_multiplier(step, schedule="cosine", warmup_steps=WARMUP_STEPS, total_steps=total_steps, min_lr_ratio=0.1)


class RawStep:
    """The plain loop's step: LR schedule, forward, loss, backward, clip, optimizer step, gradients freed, and the
    loss read every LOG_EVERY steps. Its own model, seeded as the lm path's."""

    def __init__(self, config, args, total_steps: int):
        self.model, self.loss_fn = model_and_loss(config, args)
        self.optimizer = make_optimizer(self.model, args)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.autocast = torch.autocast(
            args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16"
        )
        self.device, self.total_steps = args.device, total_steps

    def __call__(self, i: int, batch: dict[str, torch.Tensor]) -> None:
        # LanguageModel's schedule, set as nanoGPT's loop sets it (LambdaLR does the same multiply)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * lr_factor(i, self.total_steps)
        x = batch["input_ids"].to(self.device, non_blocking=True)
        y = batch["labels"].to(self.device, non_blocking=True)
        with self.autocast:
            loss, _ = self.loss_fn(self.model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if (i + 1) % LOG_EVERY == 0:
            loss.item()  # what a loop logs at its interval (a host sync on a GPU, as lm's logging step has)


def raw_loop(config, batches, args, profiler=None) -> float:
    """Seconds per step of the plain loop (RawStep over the batches)."""
    step = RawStep(config, args, len(batches))
    start = None
    if profiler is not None:
        profiler.start()
    for i, batch in enumerate(batches):
        if i == args.warmup:
            sync(args.device)
            start = time.perf_counter()
        step(i, batch)
        if profiler is not None:
            profiler.step()
    sync(args.device)
    if profiler is not None:
        profiler.stop()
    return (time.perf_counter() - start) / (len(batches) - args.warmup)


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


class _ProfilerSteps(L.Callback):
    """Drives a torch.profiler schedule from the Trainer's loop: one profiler step per training step."""

    def __init__(self, profiler):
        self.profiler = profiler

    def on_train_start(self, trainer, pl_module):
        self.profiler.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.profiler.step()

    def on_train_end(self, trainer, pl_module):
        self.profiler.stop()


def lightning_loop(config, batches, args, profiler=None, extra_callbacks=(), count_syncs=False) -> float:
    """Seconds per step through LanguageModel on the Trainer `lm fit` builds (lm_fit_trainer: its callbacks,
    checkpoint IO and profiler), minus data loading from disk and the progress bar, unless extra_callbacks holds one
    (benchmarks/progress_bar.py). With count_syncs (CUDA), the host syncs after warm-up are recorded in
    lightning_loop.syncs: a run whose time means nothing."""
    torch.manual_seed(0)
    module = LanguageModel(
        config,
        lr=LR,
        warmup_steps=WARMUP_STEPS,
        weight_decay=0.1,
        compile=args.compile,
        fp8=args.fp8,
        activation_checkpointing=args.activation_checkpointing,
        optimizer=args.optimizer,
    )
    timer = _StepTimer(args.warmup, args.device, count_syncs and profiler is None)
    callbacks = [timer, *extra_callbacks] + ([_ProfilerSteps(profiler)] if profiler else [])
    with tempfile.TemporaryDirectory() as root:
        trainer = lm_fit_trainer(args, len(batches), root)
        module.run_config = trainer.lm_run_config
        seconds = _fit(module, batches, args, callbacks, trainer)
    if timer.sync_debug:
        sites = {site: timer.syncs.count(site) for site in dict.fromkeys(timer.syncs)}
        print(f"host syncs in {args.steps} lm steps after warm-up (an untimed run): {len(timer.syncs)}", sites)
        lightning_loop.syncs = sites
    return seconds


class _BareModule(L.LightningModule):
    """The least a LightningModule needs to train the raw loop's model: no lm hooks, metrics or callbacks."""

    def __init__(self, config, args):
        super().__init__()
        self.model, self.loss_fn = model_and_loss(config, args)
        self.args = args

    def training_step(self, batch, batch_idx):
        loss, _ = self.loss_fn(self.model(batch["input_ids"]), batch["labels"])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if (batch_idx + 1) % LOG_EVERY == 0:
            outputs["loss"].item()  # as the raw loop reads it (a host sync on a GPU)

    def train_flops_per_token(self, seq_len: int) -> float:  # lm's Throughput callback logs MFU where the peak is known
        return self.model.flops_per_token(seq_len)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.model, self.args)
        total = self.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def bare_lightning_loop(config, batches, args) -> float:
    """Seconds per step of _BareModule on the Trainer lightning_loop trains on (lm fit's, its callbacks and all): the
    share of Lightning's loop and lm fit's callbacks in the overhead, without LanguageModel's own hooks."""
    timer = _StepTimer(args.warmup, args.device)
    with tempfile.TemporaryDirectory() as root:
        return _fit(_BareModule(config, args), batches, args, [timer], lm_fit_trainer(args, len(batches), root))


class _Interleaved(L.Callback):
    """--interleave: before each of lm's steps, one raw-loop step on its own model and the same batch, timed apart.

    An lm step is timed from the end of one raw step to the start of the next: the whole iteration of Lightning's loop
    (data fetch, hooks, closure, optimizer and scheduler steps) and nothing of the raw step. On this 2-core VM the
    machine's speed moves by ~10% within seconds, so paths run one after the other scattered by several percent per
    repeat; step by step, the drift hits both alike."""

    def __init__(self, raw_step: RawStep, batches, warmup: int):
        self.raw_step, self.batches, self.warmup = raw_step, batches, warmup
        self.raw_seconds: list[float] = []
        self.lm_seconds: list[float] = []
        self._resumed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx > self.warmup:
            self.lm_seconds.append(now - self._resumed)  # lm's step batch_idx - 1
        start = time.perf_counter()
        self.raw_step(batch_idx, self.batches[batch_idx])
        if batch_idx >= self.warmup:
            self.raw_seconds.append(time.perf_counter() - start)
        self._resumed = time.perf_counter()


def interleaved_loops(config, batches, args) -> dict[str, float]:
    """--interleave (CPU): seconds per step of the raw loop and of the lm path, alternating step by step in one fit.

    The last lm step is not timed (the loop's teardown follows it), so both means are over the same len - warmup - 1
    step pairs."""
    interleaved = _Interleaved(RawStep(config, args, len(batches)), batches, args.warmup)
    lightning_loop(config, batches, args, extra_callbacks=[interleaved])
    pairs = list(zip(interleaved.raw_seconds[:-1], interleaved.lm_seconds, strict=True))  # the last raw step: unpaired
    return {"raw": sum(r for r, _ in pairs) / len(pairs), "lm": sum(m for _, m in pairs) / len(pairs)}


class _TrainerOnly(LMCLI):
    """`lm fit`'s command line, which builds the Trainer (callbacks and all) but does not run it."""

    def _run_subcommand(self, subcommand):
        pass


def lm_fit_trainer(args, max_steps: int, root: str) -> L.Trainer:
    """The Trainer `lm fit` builds, with every callback, plugin and replacement lm's CLI adds (the checkpoint
    callbacks, throughput, RNG, preemption, model summary, ...), on this benchmark's settings: no logger, no progress
    bar, and checkpoint callbacks that run their per-step checks but write nothing. Its run config is
    trainer.lm_run_config. (The CLI also builds a model and a data module from its config; both go unused.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningCLI's note on args given while sys.argv is set too
        cli = _TrainerOnly(
            args=[
                "fit",
                "--model=lm.module.LanguageModel",
                *("--model.init_args.arch.n_layer=1", "--model.init_args.arch.n_head=1"),
                *("--model.init_args.arch.n_embd=8", "--model.init_args.arch.block_size=8"),
                "--data=lm.data.PretrainData",
                "--seed_everything=false",
                f"--trainer.default_root_dir={root}",
                f"--trainer.accelerator={'gpu' if args.device.startswith('cuda') else 'cpu'}",
                "--trainer.devices=1",
                f"--trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
                f"--trainer.max_steps={max_steps}",
                "--trainer.gradient_clip_val=1.0",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.log_every_n_steps={LOG_EVERY}",
                *("--checkpoint.save_top_k=0", "--checkpoint.save_last=false"),
            ]
        )
    cli.trainer.lm_run_config = cli.model.run_config
    return cli.trainer


def _fit(module, batches, args, callbacks, trainer) -> float:
    """Train module on the batches on the trainer (lm_fit_trainer's), with the callbacks added first; seconds per
    timed step (callbacks[0]: the timer)."""
    timer = callbacks[0]
    trainer.callbacks[:0] = callbacks
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return (timer.end - timer.start) / (len(batches) - args.warmup)


# --profile: kernel/op names -> categories; the first match wins. Attention comes before matmul (flash and cutlass
# attention kernels contain "cutlass" or "gemm"), Inductor's kernels before matmul: its matmul templates are
# triton_tem_*, and its other kernels are named after the ops they fuse, which may include "addmm" or "mm".
CATEGORIES = [
    ("communication", ("nccl",)),
    ("matmul/GEMM", ("triton_tem",)),
    ("triton/fused elementwise", ("triton_",)),  # before attention: Inductor names kernels after the ops they fuse
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer + clip", ("adam", "foreach", "multi_tensor")),
    ("matmul/GEMM", ("gemm", "cutlass", "xmma", "nvjet", "aten::mm", "aten::addmm", "aten::bmm", "_scaled_mm")),
]


def category(name: str) -> str:
    name = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in name for k in keys)), "other")


def make_profiler(args):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # one untimed profiler warm-up step (its start-up cost), then PROFILE_STEPS recorded steps
    wait = max(args.warmup - 1, 0)
    schedule = torch.profiler.schedule(wait=wait, warmup=args.warmup - wait, active=PROFILE_STEPS, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule)


def profile_report(profiler, path: str, args, top: int = 25) -> str:
    """Where a step's time goes: self time of each kernel (CUDA) or op (CPU) per step, as a share of the step.

    The step is the span of the recorded timeline (first kernel start to last kernel end) divided by the steps; what
    no kernel covers is the GPU waiting for the host. On CPU the ops are the host's own, and the rest is Python.
    record_function ranges (ProfilerStep#, Lightning's Optimizer.step#..., which wraps its forward/backward closure)
    are left out: on the GPU they span kernels already counted, on CPU their self time is Python between ops.
    """
    on_gpu = args.device.startswith("cuda")
    device = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    on_device = [e for e in profiler.events() if e.device_type == device]
    step_us = (max(e.time_range.end for e in on_device) - min(e.time_range.start for e in on_device)) / PROFILE_STEPS
    rows = []
    for e in profiler.key_averages():
        if e.device_type != device or e.is_user_annotation or e.key.startswith("ProfilerStep"):
            continue
        us = (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / PROFILE_STEPS
        if us > 0:
            rows.append((us, e.count / PROFILE_STEPS, e.key))
    rows.sort(reverse=True)
    by_category = dict.fromkeys([cat for cat, _ in CATEGORIES] + ["other"], 0.0)
    for us, _, name in rows:
        by_category[category(name)] += us
    rest = "idle (GPU waits for host)" if on_gpu else "outside ops (Python)"
    by_category[rest] = max(0.0, step_us - sum(by_category.values()))

    what = "kernels by self CUDA time" if on_gpu else "ops by self CPU time"
    lines = [
        f"{path} path, {args.device}, {PROFILE_STEPS} profiled steps after {args.warmup} warm-up; precision "
        f"{args.precision}, compile {args.compile}, fp8 {args.fp8}: {step_us / 1e3:.3f} ms/step (profiled)",
        "",
        f"{'category':<26} {'ms/step':>9} {'share':>7}",
    ]
    lines += [f"{cat:<26} {us / 1e3:>9.3f} {us / step_us:>7.1%}" for cat, us in by_category.items()]
    lines += ["", f"top {top} {what}", f"{'ms/step':>9} {'share':>7} {'calls':>6}  name"]
    lines += [f"{us / 1e3:>9.3f} {us / step_us:>7.1%} {calls:>6.0f}  {name[:110]}" for us, calls, name in rows[:top]]
    return "\n".join(lines) + "\n"


def profile_paths(config, batches, args):
    """--profile: one more run of each path under the profiler, after the timed ones (whose numbers it leaves alone)."""
    Path(args.profile).mkdir(parents=True, exist_ok=True)
    batches = [batches[i % len(batches)] for i in range(args.warmup + PROFILE_STEPS)]
    for name, loop in (("raw", raw_loop), ("lm", lightning_loop)):
        profiler = make_profiler(args)
        loop(config, batches, args, profiler=profiler)
        report = profile_report(profiler, name, args)
        (Path(args.profile) / f"profile_{name}.txt").write_text(report)
        print(report)


def main(argv=None):
    args = parse_args(argv)
    lightning_loop.syncs = None  # set by this run's --sync_debug, not an earlier call's
    config = make_config(args)
    batches = make_batches(config, args)
    tokens_per_step = args.batch * config.block_size
    flops_per_token = GPT(config).flops_per_token(config.block_size)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = peak_flops(torch.device(args.device), dtype)  # also with --fp8: a float8 gain shows as higher MFU

    on_cuda = args.device.startswith("cuda")
    paths = {"raw": raw_loop} | ({"bare": bare_lightning_loop} if args.bare else {}) | {"lm": lightning_loop}
    names = list(paths)
    if args.interleave:  # one fit gives both paths' times
        names, paths = ["interleaved"], {"interleaved": interleaved_loops}
    repeats = []  # in turns, so drift in machine load hits every path alike
    peak_mb = dict.fromkeys(names, 0.0)  # CUDA: each path's own peak
    for i in range(args.repeats):
        # Each repeat starts one path further on (raw, lm / lm, raw; with --bare raw, bare, lm / bare, lm, raw / ...):
        # on the 2-core VM the second of two identical raw loops ran 0.2-3.1% faster (medians of six pairs, three
        # runs), which must not favour one path. A multiple of the number of paths puts each in every place equally.
        order = names[i % len(names) :] + names[: i % len(names)]
        seconds = {}
        for name in order:
            # A compiled model sits in a reference cycle (nn.Module.compile keeps a bound method of the module), so
            # the last path's weights lived on until the collector ran and counted in this path's peak: 470 MB more
            # for lm than for raw on an H200 at the 124M shape, one fp32 copy of the parameters.
            gc.collect()
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds[name] = paths[name](config, batches, args)
            if on_cuda:
                peak_mb[name] = max(peak_mb[name], torch.cuda.max_memory_allocated() / 2**20)
        repeats.append(seconds["interleaved"] if args.interleave else {name: seconds[name] for name in names})
    if args.sync_debug and on_cuda:
        lightning_loop(config, batches, args, count_syncs=True)  # after the timed runs, which it would slow
    best = {name: min(r[name] for r in repeats) for name in repeats[0]}
    # Each repeat's own ratio, next to the ratio of the bests: on a shared machine whose speed drifts, the median
    # of the paired ratios says more than one lucky run on either side.
    paired = sorted(r["lm"] / r["raw"] - 1 for r in repeats)
    paired_median = statistics.median(paired)
    # --bare: the same split into Lightning's loop with lm fit's callbacks (bare over raw) and lm's module (lm over
    # bare)
    split = {
        f"{b}_over_{a}": statistics.median(r[b] / r[a] - 1 for r in repeats)
        for a, b in (("raw", "bare"), ("bare", "lm"))
        if args.bare
    }

    rows = []
    for name, seconds in best.items():
        tps = tokens_per_step / seconds
        rows.append(
            {
                "path": name,
                "ms_per_step": round(seconds * 1e3, 2),
                "tokens_per_sec": round(tps),
                "mfu": round(tps * flops_per_token / peak, 4) if peak else None,
                "peak_memory_mb": round(peak_mb[name]) if on_cuda else None,
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
        "fp8": args.fp8,
        "activation_checkpointing": args.activation_checkpointing,
        "optimizer": args.optimizer,
        "steps": args.steps,
        "interleave": args.interleave,
        "params": GPT(config).num_params(),
        "rows": rows,
        "lightning_overhead": round(overhead, 4),
        "lightning_overhead_per_repeat": [round(x, 4) for x in paired],
        "lightning_overhead_median": round(paired_median, 4),
        "repeats_ms_per_step": [{k: round(v * 1e3, 2) for k, v in r.items()} for r in repeats],
        "overhead_split_median": {k: round(v, 4) for k, v in split.items()} or None,
        # CPU: the process's high-water mark; CUDA: the largest path's (each row has its own)
        "peak_memory_mb": round(max(peak_mb.values()) if on_cuda else peak_memory_mb(args.device)),
        "host_syncs": getattr(lightning_loop, "syncs", None),
    }
    print(
        f"{result['device']}, torch {result['torch']}, {result['params'] / 1e6:.2f}M params, batch {args.batch} x "
        f"{config.block_size}, precision {args.precision}, compile {args.compile}, fp8 {args.fp8}, "
        f"activation checkpointing {args.activation_checkpointing}, {args.optimizer}, "
        f"{args.steps} timed steps" + (", interleaved step by step" if args.interleave else "")
    )
    print(f"{'path':<6} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7}" + (f" {'peak MB':>8}" if on_cuda else ""))
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        memory = f" {row['peak_memory_mb']:>8,}" if on_cuda else ""
        print(f"{row['path']:<6} {row['ms_per_step']:>9.2f} {row['tokens_per_sec']:>10,} {mfu:>7}{memory}")
    print(f"Lightning overhead: {overhead:+.1%} (best of each); peak memory {result['peak_memory_mb']} MB")
    if len(repeats) > 1:
        print(f"per repeat: median {paired_median:+.1%}, from {paired[0]:+.1%} to {paired[-1]:+.1%}")
    if split:
        print(
            f"median per repeat: bare Lightning over raw {split['bare_over_raw']:+.1%}, lm over bare Lightning "
            f"{split['lm_over_bare']:+.1%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.profile:
        profile_paths(config, batches, args)
    return result


if __name__ == "__main__":
    main()
