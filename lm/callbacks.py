"""Callbacks the `lm` CLI adds to every run (throughput/MFU logging, text samples at validation end, plain progress
lines where the output is not a terminal), and an exponential moving average of the weights that experiments can
switch on (`EMA`)."""

import contextlib
import datetime
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ProgressBar, WeightAveraging
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lm import LAUNCHED_AT
from lm.errors import LMError
from lm.generate import check_sampling, generate_text

_PRECISION_DTYPE = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}

# Dense peak FLOP/s of chips that Lightning's table misses or gets wrong under the name the driver reports (vendor
# datasheets, per GPU, without sparsity). A plain "NVIDIA H200" is the SXM part: the H100 SXM's tensor cores with
# faster memory. Lightning reads "NVIDIA H100 NVL" as twice an H100 SXM (a two-card NVL pair's figure), has no entry
# for "NVIDIA H200 NVL", parses "NVIDIA L40S" and "NVIDIA L40" as an L4, and finds no peak for a Grace Hopper
# superchip ("NVIDIA GH200 480GB", "NVIDIA GH200 144G HBM3e": the H100 SXM's tensor cores, whatever the memory).
# For the GeForce RTX 30 and 40 cards in its table (3070 to 4090), the RTX A6000 and the A40, its bf16 and fp16 are the
# non-tensor fp32 figure: MFU read 2x (GeForce) to 4x (A6000, A40) too high. Theirs are the tensor cores' bf16/fp16
# with fp32 accumulation, as PyTorch's matmuls run (NVIDIA's GA102 and Ada whitepapers; for the 3090 Ti, 3080 Ti and
# 4080 SUPER, which came after them, a quarter of the dense INT8 figure, the ratio every GeForce part there shows).
_NVL = {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, "tfloat32": 417.5e12, torch.float32: 60e12}
_HOPPER_SXM = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12}


def _tensor_cores(half: float, fp32: float, tf32: float | None = None) -> dict:
    """A card's dense peaks: bf16 = fp16 (fp32 accumulation), TF32 (on GeForce parts the fp32 figure), fp32."""
    return {torch.bfloat16: half, torch.float16: half, "tfloat32": tf32 or fp32, torch.float32: fp32}


_MORE_PEAK_FLOPS = {
    "nvidia h200": _HOPPER_SXM,
    "nvidia gh200": _HOPPER_SXM,  # any memory size: matched by the start of the name
    "nvidia h100 nvl": _NVL,
    "nvidia h200 nvl": _NVL,
    "nvidia l40s": {torch.bfloat16: 362.05e12, torch.float16: 362.05e12, "tfloat32": 183e12, torch.float32: 91.6e12},
    "nvidia l40": {torch.bfloat16: 181.05e12, torch.float16: 181.05e12, "tfloat32": 90.5e12, torch.float32: 90.5e12},
    "nvidia geforce rtx 4090": _tensor_cores(165.2e12, 82.6e12),
    "nvidia geforce rtx 4080 super": _tensor_cores(104.4e12, 52.2e12),
    "nvidia geforce rtx 4080": _tensor_cores(97.5e12, 48.7e12),
    "nvidia geforce rtx 3090 ti": _tensor_cores(80e12, 40e12),
    "nvidia geforce rtx 3090": _tensor_cores(71e12, 35.6e12),
    "nvidia geforce rtx 3080 ti": _tensor_cores(68.2e12, 34.1e12),
    "nvidia geforce rtx 3080": _tensor_cores(59.5e12, 29.8e12),
    "nvidia geforce rtx 3070": _tensor_cores(40.6e12, 20.3e12),
    "nvidia rtx a6000": _tensor_cores(154.8e12, 38.7e12, tf32=77.4e12),
    "nvidia a40": _tensor_cores(149.7e12, 37.4e12, tf32=74.8e12),
}


def training_dtype(precision: str) -> torch.dtype:
    """The dtype whose peak FLOP/s an MFU is measured against, from a Trainer's precision ("bf16-mixed", "32-true",
    "transformer-engine", "transformer-engine-float16", ...). Transformer Engine's matmuls count against the bf16
    (or fp16) peak, as fp8 training's MFU usually is; anything unknown against fp32's."""
    if precision.startswith("transformer-engine"):
        return torch.float16 if precision.endswith("float16") else torch.bfloat16
    return _PRECISION_DTYPE.get(precision.split("-")[0], torch.float32)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak FLOP/s for dtype (None for CPUs and unknown chips): the MFU denominator."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    if name.startswith("nvidia gh200"):
        name = "nvidia gh200"
    if name in _MORE_PEAK_FLOPS:
        if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
            dtype = "tfloat32"  # fp32 matmuls run on the tensor cores as TF32, as Lightning's table reads it
        return _MORE_PEAK_FLOPS[name].get(dtype)
    return get_available_flops(device, dtype)


def inside_accumulation_window(trainer: L.Trainer) -> bool:
    """Whether the optimizer step of the current batch is still to come (more micro-batches of its window to run)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


class Throughput(L.Callback):
    """Logs `train/tokens_per_sec` (all ranks together), `train/mfu` and `train/tokens` (the tokens trained on so far,
    all ranks, kept across resumes: an x-axis on which runs of different batch sizes compare) every
    `log_every_n_steps` optimizer steps.

    Both measure training steps only: the time spent in validation and in saving checkpoints is left out (the window
    restarts at the first batch after them), and so is work between steps run inside `paused` (lm.eval.EvalCallback's
    every_n_steps evaluations), so neither shows as a dip in throughput.

    Time is taken on the host once per interval (with one device sync there, none per step), so the first interval,
    which includes compilation and warm-up, is skipped. MFU = the window's model FLOPs (`train_flops_per_token` at
    each batch's own length, x its tokens) per second per device / the device's peak for the training precision,
    from Lightning's table of chips; it is not logged where the peak is unknown (CPUs). Tokens are positions of the
    batches, padding included (chat and preference batches pad each to its longest row). "All ranks" is this rank's
    count times the world size, with no collective: exact where every batch has one shape (pretraining), an estimate
    for chat and preference data, whose ranks pad to their own longest rows.
    """

    def __init__(self):
        self._start: float | None = None
        self._tokens = 0
        self.tokens_trained = 0  # this rank's, in this fit
        # All ranks', in the fits this run resumed from: a total, so that a resume on another number of devices goes
        # on from it (this rank's count times the new world size rescaled the whole history)
        self._tokens_before = 0
        self._rank_tokens_before: int | None = None  # a checkpoint of an older lm: its rank's count
        self._world_size = 1
        self._flops = 0.0  # the window's model FLOPs, each batch at its own length (chat batches differ)
        self._flops_per_token: dict[int, float] = {}  # by sequence length: the count is Python arithmetic
        self._intervals = 0
        self._peak_flops: float | None = None
        self._restart = False  # validation or a checkpoint save interrupted the window: restart at the next batch
        self._first_step_pending = False
        self._paused = 0.0  # seconds of the window spent in `paused` blocks (evaluations between steps)

    def on_train_start(self, trainer, pl_module):
        self._world_size = trainer.world_size
        dtype = training_dtype(str(trainer.precision))
        self._peak_flops = peak_flops(pl_module.device, dtype)
        # Start-up (imports, device, data, model) and the first step (compilation, kernel choice) are most of a short
        # run's time to loss: these two lines show which one to work on.
        rank_zero_info(f"training starts: {time.time() - LAUNCHED_AT:.1f} s since launch")
        self._first_step_pending = True
        # Each fit's first window is its warm-up: a second fit with this callback would have logged its first window,
        # timed from the end of the previous fit
        self._open_window(None)
        self._intervals = 0
        self._flops_per_token = {}  # the model's: a second fit with this callback may train another one

    def _open_window(self, start: float | None) -> None:
        self._start, self._tokens, self._flops, self._paused = start, 0, 0.0, 0.0

    @staticmethod
    def _idle_clock(pl_module) -> float:
        """time.perf_counter() once the device has run what was queued: a window's ends on the host (one sync each)."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def paused(self, pl_module):
        """Leave the block's time out of the current window: work between training steps that is not training
        (lm.eval.EvalCallback's every_n_steps evaluations), whichever side of this callback's batch end it runs on."""
        start = self._idle_clock(pl_module)
        try:
            yield
        finally:
            self._paused += self._idle_clock(pl_module) - start

    def on_validation_start(self, trainer, pl_module):
        self._restart = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Called while a checkpoint is being assembled, before it is written: the restart comes at the next batch,
        # after the write (Lightning runs checkpoint callbacks after this one's batch-end and validation hooks, when
        # this one comes before them in trainer.callbacks, as lm fit puts it).
        self._restart = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._restart and self._start is not None:
            # Once per validation or save, not per step; the sync makes the window start when the device is idle.
            self._open_window(self._idle_clock(pl_module))
        self._restart = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        batch_size, seq_len = batch["input_ids"].shape
        self._tokens += batch_size * seq_len
        self.tokens_trained += batch_size * seq_len
        if self._peak_flops:
            if seq_len not in self._flops_per_token:
                self._flops_per_token[seq_len] = pl_module.train_flops_per_token(seq_len)
            self._flops += batch_size * seq_len * self._flops_per_token[seq_len]
        if inside_accumulation_window(trainer):
            return  # windows end at optimizer steps
        if self._first_step_pending:
            self._first_step_pending = False
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()  # once per fit: the step's kernels have run, not only been queued
            rank_zero_info(f"first step done: {time.time() - LAUNCHED_AT:.1f} s since launch")
            # The recipes' LRs and schedules are tuned for a number of tokens per step, which the device count
            # multiplies: the same YAML on 4 nodes instead of 1 trains 4x the tokens a step (a different recipe).
            devices, micro = trainer.world_size, trainer.accumulate_grad_batches
            rank_zero_info(
                f"tokens per optimizer step: {batch_size * seq_len * devices * micro:,} = {batch_size} x {seq_len} "
                f"(this batch) x {devices} device(s) x {micro} micro-batch(es)"
            )
        # At the optimizer steps whose metrics Lightning writes (global_step counts them across epochs; batch_idx,
        # which counts micro-batches and restarts each epoch, put windows where nothing was written). 0: no logging.
        if not trainer.log_every_n_steps or trainer.global_step % trainer.log_every_n_steps:
            return
        # float64: float32 counts in steps of 1,024 past 2^33 tokens. A CPU tensor: no copy to the GPU.
        self._world_size = trainer.world_size
        pl_module.log("train/tokens", torch.tensor(self.tokens_all_ranks(), dtype=torch.float64))
        now = self._idle_clock(pl_module)
        if self._start is not None and self._intervals > 0:
            elapsed = now - self._start - self._paused
            per_device = self._tokens / elapsed
            pl_module.log("train/tokens_per_sec", per_device * trainer.world_size)
            if self._peak_flops:
                # the attention term grows with the length: one batch's length for the window read MFU 10-14% off
                pl_module.log("train/mfu", self._flops / elapsed / self._peak_flops)
        self._intervals += 1
        self._open_window(now)

    def tokens_all_ranks(self) -> int:
        """Tokens trained on since the run began, by all ranks, resumes included (train/tokens)."""
        before = self._tokens_before
        if self._rank_tokens_before is not None:  # saved per rank, by a run on (we take it) as many devices
            before = self._rank_tokens_before * self._world_size
        return before + self.tokens_trained * self._world_size

    def state_dict(self) -> dict[str, int]:
        return {"tokens_all_ranks": self.tokens_all_ranks()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.tokens_trained = 0
        if "tokens_all_ranks" in state_dict:
            self._tokens_before = state_dict["tokens_all_ranks"]
        else:
            self._rank_tokens_before = state_dict.get("tokens_trained", 0)

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        """One line per validation with the wall time since launch: time-to-loss, start-up and compilation included."""
        val_loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or val_loss is None:
            return
        rank_zero_info(
            f"step {weights_step(trainer, pl_module)}: val/loss {val_loss:.4f}, {time.time() - LAUNCHED_AT:.1f} s "
            "since launch"
        )


class ProgressLines(ProgressBar):
    """The progress bar of a run whose output is not a terminal (a Slurm log, `nohup`, a sweep's trial.log): one plain
    line every `every` optimizer steps, `step 200/5000: loss 1.8312, 91,750 tokens/s, 11.2 steps/s, 0:07:08 left`, with
    the metrics a bar would show (what was last logged) and the training speed since the previous line (tokens are
    batch positions of all ranks, padding included, as train/tokens_per_sec counts them; validation, the checkpoints
    saved after it and lm.eval.EvalCallback's every_n_steps evaluations left out, as is their time from the time
    left). A bar's redraws end in carriage returns and cursor codes, and put lm's own lines (`step N: val/loss ...`)
    in the middle of a line in a file.
    A validation (fit's, or `lm validate`'s) that runs longer than `validation_seconds` gets a line that often,
    `validation 120/400 batches, 0:01:02 so far, 0:02:05 left`: a short one stays quiet, and a long one (a large
    held-out set on a cluster) no longer looks like a hung job. lm prints each validation's result itself."""

    def __init__(self, every: int = 50, validation_seconds: float = 60.0):
        super().__init__()
        if every < 1:
            raise LMError(f"ProgressLines(every={every}): a line every N >= 1 optimizer steps")
        if not validation_seconds > 0:
            raise LMError(f"ProgressLines(validation_seconds={validation_seconds}): a line every T > 0 seconds")
        self.every, self.validation_seconds, self._enabled = every, validation_seconds, True
        self._validation_clock = (0.0, 0.0)  # (start of this validation, time of its last line)
        self._validation_batches = 0  # done in this validation, over all its dataloaders
        self._last: tuple[float, float] | None = None  # (step, time) of the previous line
        self._tokens = 0  # this rank's batch positions since then
        self._total: int | None = None  # the run's optimizer steps (max_steps, or what its epochs come to)
        self._saves_at_step_end = False  # a validation inside an accumulation window: its saves come at the step's end
        self._restart = False  # such a save came: the window starts again at the next batch, after the writes

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _open_window(self, trainer) -> None:
        self._last, self._tokens = (trainer.global_step, time.perf_counter()), 0

    @contextlib.contextmanager
    def paused(self):
        """Leave the block's time out of the lines' speed and time left, as Throughput.paused leaves it out of
        train/tokens_per_sec: work between steps that is not training (lm.eval.EvalCallback's every_n_steps
        evaluations), whichever side of this callback's batch end it runs on."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._last is not None:  # the window's start moves on by the block's time
                step, since = self._last
                self._last = (step, since + time.perf_counter() - start)

    def on_train_start(self, trainer, pl_module):
        self._open_window(trainer)
        total = trainer.estimated_stepping_batches  # max_steps, or the epochs' steps where those end first
        self._total = int(total) if total != float("inf") else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        micro = trainer.accumulate_grad_batches
        done = batch_idx % micro  # micro-batches of this optimizer step run before this one
        if done == 0:  # a new step: past the end of any step a validation fell inside
            self._saves_at_step_end = False
        if self._last is None or self._restart:  # after a validation: its time and the saves' are not training's
            self._restart = False
            self._open_window(trainer)
            # A validation inside an accumulation window (val_check_interval counts micro-batches) comes with part of
            # the step done: the window starts that far into it. The next line counted a whole step in the time of
            # the micro-batches left (after 7 of 8: 8x the speed and an eighth of the time left).
            self._last = (trainer.global_step + done / micro, self._last[1])
            # lm's Checkpoint writes such a validation's checkpoints at the end of the step: left out too (below)
            self._saves_at_step_end = done > 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # A flag rather than _last = None: a callback before this one may save in the batch's on_train_batch_end,
        # which reads _last after it
        if self._saves_at_step_end:
            self._restart = True

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._last = None
        now = time.perf_counter()
        self._validation_clock, self._validation_batches = (now, now), 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._validation_batches += 1
        started, last_line = self._validation_clock
        now = time.perf_counter()
        if not self._enabled or trainer.sanity_checking or now - last_line < self.validation_seconds:
            return
        self._validation_clock = (started, now)
        done, total = self._validation_batches, sum(trainer.num_val_batches)  # every dataloader's
        finite = total != float("inf")
        line = f"validation {done}{f'/{total}' if finite else ''} batches, "
        line += f"{datetime.timedelta(seconds=round(now - started))} so far"
        if finite:
            line += f", {datetime.timedelta(seconds=round((now - started) / done * max(total - done, 0)))} left"
        print(line, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch["input_ids"].numel()
        step = trainer.global_step
        if not self._enabled or step <= self._last[0] or step % self.every:
            return  # (not past the line's step: more micro-batches of one accumulation window)
        now = time.perf_counter()
        seconds = max(now - self._last[1], 1e-9)
        rate = (step - self._last[0]) / seconds
        tokens_per_sec = self._tokens * trainer.world_size / seconds
        self._last, self._tokens = (step, now), 0
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        parts.append(f"{tokens_per_sec:,.0f} tokens/s")
        parts.append(f"{rate:.3g} steps/s" if rate < 100 else f"{rate:.0f} steps/s")
        total = self._total
        if total:
            parts.append(f"{datetime.timedelta(seconds=round(max(total - step, 0) / rate))} left")
        print(f"step {step}{f'/{total}' if total else ''}: {', '.join(parts)}", flush=True)


def weights_step(trainer, pl_module) -> int:
    """The optimizer step of the weights being validated: the loaded checkpoint's in lm validate, which restores no
    loop state (trainer.global_step reads 0 there), else the loop's."""
    loaded = getattr(pl_module, "checkpoint_step", None)
    return loaded if trainer.state.fn == "validate" and loaded is not None else trainer.global_step


class SampleText(L.Callback):
    """Prints a few generated samples at the end of each validation, appends them to `<root>/samples.txt` and logs
    them as a W&B table (`samples`).

    Args:
        prompts: Text to continue; an empty string starts a fresh document.
        max_new_tokens: Tokens to generate per prompt.
        temperature: Sampling temperature (0 is greedy).
        top_k: Sample only among the k most likely tokens; 0 or None for all.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 200,
    ):
        check_sampling(temperature=temperature, top_k=top_k)  # a bad value fails at startup, not at the first sample
        self.prompts = prompts if prompts is not None else [""]
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k

    def on_fit_start(self, trainer, pl_module):
        """Encode the prompts now, on every rank, so a prompt the tokenizer cannot encode stops the run before
        training rather than at its first validation."""
        self._check_prompts(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        """lm validate: before the pass, not after it (whose loss was then lost to the error)."""
        if trainer.state.fn == "validate":
            self._check_prompts(trainer, pl_module)

    def _check_prompts(self, trainer, pl_module) -> None:
        tokenizer = getattr(pl_module, "tokenizer", None)
        if not self.prompts or self.max_new_tokens <= 0 or tokenizer is None:
            return
        if isinstance(trainer.strategy, FSDPStrategy):  # no samples under FSDP (see below): the prompts go unused
            return
        for prompt in self.prompts:
            try:
                tokenizer.encode(prompt)
            except LMError as e:
                raise LMError(
                    f"samples.prompts: {prompt!r} cannot be encoded by the data's tokenizer ({e}); change "
                    "samples.prompts, or set samples.max_new_tokens 0 to turn samples off"
                ) from e

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.prompts or self.max_new_tokens <= 0 or pl_module.tokenizer is None:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            # rank 0 alone cannot run a sharded model (the other ranks would have to join every all-gather)
            rank_zero_warn("samples are not generated under FSDP; run `lm generate` on a checkpoint instead")
            return
        was_training = pl_module.model.training
        pl_module.model.eval()
        step = weights_step(trainer, pl_module)
        generator = torch.Generator(pl_module.device).manual_seed(step)
        rows = []
        # Generation has a new shape at every step: run it eagerly rather than recompiling a compiled model.
        try:
            with torch.compiler.set_stance("force_eager"):
                for prompt in self.prompts:
                    text = generate_text(
                        pl_module.model,
                        pl_module.tokenizer,
                        prompt,
                        max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature,
                        top_k=self.top_k,
                        generator=generator,
                    )
                    rows.append([step, prompt, text])
        except RuntimeError as e:  # e.g. a diverged model's NaN probabilities: report it, don't end the run
            rank_zero_warn(f"samples skipped at step {step}: {e}")
            return
        finally:
            pl_module.model.train(was_training)

        report = "\n".join(f"--- sample at step {step} ---\n{prompt}{text}" for step, prompt, text in rows)
        rank_zero_info(report)
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "samples.txt", "a", encoding="utf-8") as f:
            f.write(report + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=["step", "prompt", "text"], data=rows)


def _ema_update(decay: float):
    """torch.optim.swa_utils.get_ema_multi_avg_fn, casting the live weights to the average's dtype: under bf16-true
    Lightning casts the model to bf16 after the average was copied in fp32, and a mixed-dtype lerp fails (an fp32
    average is also the better one: small (1 - decay) steps vanish in bf16)."""

    def update(average: list[torch.Tensor], live: list[torch.Tensor], num_averaged) -> None:
        live = [w.to(a.dtype) for a, w in zip(average, live, strict=True)]  # no copy where the dtypes agree
        torch._foreach_lerp_(average, live, 1 - decay)

    return update


def _ema_update_one(decay: float):
    """_ema_update for one tensor at a time (AveragedModel's avg_fn): for an average wider than the weights on torch
    < 2.12, whose foreach grouping refuses two dtypes at one index ("Tensors of the same index must be on the same
    device and the same dtype") before multi_avg_fn is called."""

    def update(average: torch.Tensor, live: torch.Tensor, num_averaged) -> torch.Tensor:
        return torch.lerp(average, live.to(average.dtype), 1 - decay)

    return update


class EMA(WeightAveraging):
    """An exponential moving average (EMA) of the weights: validation, checkpoints and the end of training use it.

    After each optimizer step from `update_starting_at_step` on (every `update_every_n_steps`), the average moves
    towards the live weights: avg = decay * avg + (1 - decay) * weights, so it spans the last ~1 / (1 - decay) updates.
    Then `val/loss` is the average's; every checkpoint's `state_dict` holds the average (what `lm generate`,
    `lm export` and `init_from` read) and `current_model_state` the live weights (what a resumed run continues from);
    the model in memory after `fit` is the average, and so are the text samples and the evaluations run at
    validation. Until the first update there is no average yet: validation and checkpoints use the live weights
    (Lightning's callback would hand them the weights from before step 0).

        trainer:
          callbacks:
            - class_path: lm.callbacks.EMA
              init_args: {decay: 0.99, update_starting_at_step: 100}

    Lightning's `WeightAveraging` (torch.optim.swa_utils.AveragedModel underneath) does the work; this is its
    `EMAWeightAveraging` with three changes: the update is one `torch._foreach_lerp_` over all weights
    (`get_ema_multi_avg_fn`'s, with the live weights cast to the average's dtype: under `bf16-true` the average stays
    fp32) rather than a Python loop over tensors; buffers (the RoPE tables, rebuilt from the config)
    are copied, not averaged; FSDP is refused, since the average is one full, unsharded copy. Cost: memory for that
    copy, and AveragedModel reads its update counter on the host at each update (a device sync): on large GPU runs
    update every 10 steps with decay**10.

    Args:
        decay: Weight of the old average at each update (0.99: ~the last 100 updates).
        update_every_n_steps: Optimizer steps between updates.
        update_starting_at_step: First optimizer step (0-based) that updates the average; before it the average just
            waits, and the first update copies the weights. None: from the first step.
    """

    def __init__(self, decay: float = 0.99, update_every_n_steps: int = 1, update_starting_at_step: int | None = None):
        if not 0.0 <= decay <= 1.0:
            raise LMError(f"EMA decay must be in [0, 1], got {decay}")
        if update_every_n_steps < 1:
            raise LMError(f"EMA update_every_n_steps must be >= 1, got {update_every_n_steps}")
        if update_starting_at_step is not None and update_starting_at_step < 0:
            # counted from it, the updates would come at steps that depend on how far below 0 it is
            raise LMError(f"EMA update_starting_at_step must be >= 0 (or None), got {update_starting_at_step}")
        super().__init__(use_buffers=False, multi_avg_fn=_ema_update(decay))
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step or 0
        self._swapped = False  # whether the model holds the average (during validation) and the copy the live weights
        self._kept_average: list[torch.Tensor] | None = None  # the average, unrounded, while the model holds it

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After optimizer steps only (step_idx is 0-based), never at epoch ends."""
        if step_idx is None:
            return False
        since = step_idx - self.update_starting_at_step  # counted from the start: its first update is at the start
        return since >= 0 and since % self.update_every_n_steps == 0

    def _has_average(self) -> bool:
        """Whether the average has been updated at least once (the step of the last update is 0 before that)."""
        return self._average_model is not None and self._latest_update_step > 0

    def _put(self, pl_module, average: bool):
        """Put the average (average=True) or the live weights into the model; nothing if they are there already."""
        if self._has_average() and self._swapped != average:
            self._swap_models(pl_module)
            self._swapped = average

    @contextlib.contextmanager
    def average_in(self, trainer, pl_module):
        """The average in the model for the block (the live weights while there is none yet), as validation sees it;
        afterwards the model holds what it held before. For evaluations run between training steps: the average
        first takes this step's update if it is due and this callback's on_train_batch_end has not run yet (it runs
        after the caller's when it comes later in trainer.callbacks; the update happens once a step either way)."""
        if not self._swapped:
            super().on_train_batch_end(trainer, pl_module, None, None, 0)
        before = self._swapped
        self._put(pl_module, average=True)
        try:
            yield
        finally:
            self._put(pl_module, average=before)

    def _swap_models(self, pl_module):
        """Lightning's swap, except that an average wider than the model (fp32 under bf16-true) comes back from
        validation as it was: the swap itself passes it through the model's bf16 and would round it."""
        average = [*self._average_model.module.parameters(), *self._average_model.module.buffers()]
        current = [*pl_module.parameters(), *pl_module.buffers()]
        if not self._swapped:  # the average goes into the model
            wider = any(a.dtype != c.dtype for a, c in zip(average, current, strict=False))  # as Lightning pairs them
            self._kept_average = [a.detach().clone() for a in average] if wider else None
        super()._swap_models(pl_module)
        if self._swapped and self._kept_average is not None:  # back: the live weights return, and the average whole
            torch._foreach_copy_([a.data for a in average], self._kept_average)
            self._kept_average = None

    def on_fit_start(self, trainer, pl_module):
        """The average was built in `setup`, before the strategy moved the model to its device, so it sits on the CPU:
        every update would copy all the weights from the GPU and average them on the CPU. It follows the model now
        (unless a device was chosen for it), with a resumed checkpoint's average, which Lightning loaded before this."""
        if self._average_model is not None and self._device is None:
            self._average_model.to(pl_module.device)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._put(pl_module, average=True)

    def on_validation_epoch_end(self, trainer, pl_module):
        """Swapped back in on_validation_end instead (Lightning does it here), so that every callback's
        on_validation_epoch_end (text samples, lm.eval.EvalCallback, lm.tasks.TaskAccuracy) sees the average
        whatever the order of the callbacks; the checkpoint callbacks, which Lightning always runs last, save after
        the swap back."""

    def on_validation_end(self, trainer, pl_module):
        self._put(pl_module, average=False)

    def on_exception(self, trainer, pl_module, exception):
        # A crash or SIGTERM/SIGUSR1 in the middle of validation: the live weights go back before lm's Checkpoint
        # (whose on_exception runs after this one) saves them.
        self._put(pl_module, average=False)

    def on_train_end(self, trainer, pl_module):
        """The average replaces the live weights in on_fit_end instead: lm's Checkpoint writes last.ckpt in its own
        on_train_end, after this one, and that checkpoint must keep the live weights to resume from."""

    def on_fit_end(self, trainer, pl_module):
        if self._has_average():
            self._copy_average_to_current(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not self._has_average():
            return
        if not self._swapped:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        # A save in the middle of validation (a callback's trainer.save_checkpoint in on_validation_epoch_end): the
        # model holds the average and the copy the live weights, and the checkpoint takes each from where it is.
        # Swapping them back for the save left the live weights in the model for the rest of the validation (the
        # callbacks after the saving one sampled and evaluated them): no hook comes after the write to swap again.
        copy = self._average_model.state_dict()  # the live weights under "module.", the averaging state beside them
        model_state = checkpoint["state_dict"]  # the average, in the model's dtype
        # the live weights in the model's dtype too, as outside validation (the copy holds them in the average's)
        checkpoint["current_model_state"] = {k: copy[f"module.{k}"].to(v.dtype) for k, v in model_state.items()}
        if self._kept_average is not None:  # the model holds the average rounded to its dtype; the whole one is kept
            tensors = [*self._average_model.module.parameters(), *self._average_model.module.buffers()]
            kept = {id(tensor): whole for tensor, whole in zip(tensors, self._kept_average, strict=True)}
            by_name = self._average_model.module.state_dict(keep_vars=True)  # tied weights: one tensor, two names
            model_state = {name: kept[id(by_name[name])] for name in model_state}
        checkpoint["state_dict"] = model_state
        checkpoint["averaging_state"] = {name: value for name, value in copy.items() if not name.startswith("module.")}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        # A checkpoint from before the first update holds only the live weights; the average starts from them when
        # its first update comes, as in the run that wrote it.
        if "current_model_state" in checkpoint:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def setup(self, trainer, pl_module, stage):
        if isinstance(trainer.strategy, FSDPStrategy):
            raise LMError("lm.callbacks.EMA keeps a full copy of the weights and does not work with FSDP: use DDP")
        with warnings.catch_warnings():
            # The parent warns that configure_model is run unsharded; outside FSDP that is exactly what happens anyway.
            warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback with a model")
            if trainer.precision in ("bf16-true", "16-true", "64-true") and torch.__version__ < (2, 12):
                # The model is cast after the average was copied in fp32, and torch < 2.12 refuses to group the two
                # dtypes for multi_avg_fn (measured: 2.6-2.11 fail, 2.12 works): average tensor by tensor instead.
                # _kwargs: what WeightAveraging hands to AveragedModel.
                self._kwargs = {"avg_fn": _ema_update_one(self.decay)}
            super().setup(trainer, pl_module, stage)
