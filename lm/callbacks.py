"""Callbacks the `lm` CLI adds to every run: throughput/MFU logging and text samples at validation end."""

import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lm import LAUNCHED_AT
from lm.generate import generate_text

_PRECISION_DTYPE = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}

# Dense peak FLOP/s of chips that Lightning's table misses under the name the driver reports. A plain "NVIDIA H200"
# is the SXM part: the H100 SXM's tensor cores with faster memory (vendor datasheet).
_MORE_PEAK_FLOPS = {"nvidia h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak FLOP/s for dtype (None for CPUs and unknown chips): the MFU denominator."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    if name in _MORE_PEAK_FLOPS:
        return _MORE_PEAK_FLOPS[name].get(dtype)
    return get_available_flops(device, dtype)


class Throughput(L.Callback):
    """Logs `train/tokens_per_sec` (all ranks together) and `train/mfu` every `log_every_n_steps` batches.

    Time is taken on the host once per interval (with one device sync there, none per step), so the first interval,
    which includes compilation and warm-up, is skipped. MFU = model FLOPs per token (`GPT.flops_per_token`) x tokens
    per second per device / the device's peak for the training precision, from Lightning's table of chips; it is
    not logged where the peak is unknown (CPUs).
    """

    def __init__(self):
        self._start: float | None = None
        self._tokens = 0
        self._intervals = 0
        self._peak_flops: float | None = None

    def on_train_start(self, trainer, pl_module):
        precision = str(trainer.precision).split("-")[0]
        dtype = _PRECISION_DTYPE.get(precision, torch.float32)
        self._peak_flops = peak_flops(pl_module.device, dtype)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch["input_ids"].numel()
        if (batch_idx + 1) % trainer.log_every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._start is not None and self._intervals > 0:
            per_device = self._tokens / (now - self._start)
            pl_module.log("train/tokens_per_sec", per_device * trainer.world_size)
            if self._peak_flops:
                seq_len = batch["input_ids"].shape[1]
                mfu = per_device * pl_module.model.flops_per_token(seq_len) / self._peak_flops
                pl_module.log("train/mfu", mfu)
        self._intervals += 1
        self._start, self._tokens = now, 0

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        """One line per validation with the wall time since launch: time-to-loss, start-up and compilation included."""
        val_loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or val_loss is None:
            return
        rank_zero_info(
            f"step {trainer.global_step}: val/loss {val_loss:.4f}, {time.time() - LAUNCHED_AT:.1f} s since launch"
        )


class SampleText(L.Callback):
    """Prints a few generated samples at the end of each validation, appends them to `<root>/samples.txt` and logs
    them as a W&B table (`samples`).

    Args:
        prompts: Text to continue; an empty string starts a fresh document.
        max_new_tokens: Tokens to generate per prompt.
        temperature: Sampling temperature (0 is greedy).
        top_k: Sample only among the k most likely tokens; None for all.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 200,
    ):
        self.prompts = prompts if prompts is not None else [""]
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.prompts or self.max_new_tokens <= 0 or pl_module.tokenizer is None:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            # rank 0 alone cannot run a sharded model (the other ranks would have to join every all-gather)
            rank_zero_warn("samples are not generated under FSDP; run `lm generate` on a checkpoint instead")
            return
        was_training = pl_module.model.training
        pl_module.model.eval()
        generator = torch.Generator(pl_module.device).manual_seed(trainer.global_step)
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
                    rows.append([trainer.global_step, prompt, text])
        except RuntimeError as e:  # e.g. a diverged model's NaN probabilities: report it, don't end the run
            rank_zero_warn(f"samples skipped at step {trainer.global_step}: {e}")
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
