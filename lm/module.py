"""The LightningModule for next-token training: pretraining and supervised fine-tuning are the same module.

It owns the loss, the optimizer and the LR schedule; the Trainer owns devices, precision, accumulation, clipping and
checkpoint files. The GPT itself is built in `configure_model`, once the data module's tokenizer is known, so the
embedding table always matches the tokenizer (its size padded to a multiple of 64).

    lm fit --config experiments/debug.yaml
"""

import math
from dataclasses import asdict, replace
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric

from lm.chat import CHAT_TEMPLATE_VERSION
from lm.checkpoint import CHECKPOINT_FORMAT, gpt_state_dict, read_checkpoint
from lm.config import GPTConfig, padded_vocab_size
from lm.distributed import sum_over_ranks
from lm.errors import LMError
from lm.model import GPT
from lm.optim import MuonWithAdamW, build_optimizer
from lm.tokenizer import Tokenizer

IGNORE_INDEX = -100  # labels with this value carry no loss (prompt tokens, padding)


def lr_multiplier(
    step: int,
    *,
    schedule: Literal["cosine", "wsd", "constant"],
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate at optimizer step `step`, as a fraction of the peak LR. A pure function, tested on its own.

    - warmup: linear from 1/warmup_steps to 1 over the first warmup_steps steps (all schedules);
    - cosine: then cosine from 1 down to min_lr_ratio at total_steps, flat after;
    - wsd (warmup-stable-decay): flat at 1, then linear down to min_lr_ratio over the last decay_fraction of training
      (or over all the steps after warmup, when that fraction reaches back into it);
    - constant: flat at 1 after warmup.

    Steps count from 0, so a run of total_steps steps ends with step total_steps - 1, one before the minimum (as
    nanoGPT's schedule reaches min_lr at lr_decay_iters). That last step is above min_lr_ratio by
    (1 - min_lr_ratio)(1 - cos(pi / D)) / 2 for a cosine over D steps (2.5e-6 for D = 1000), and by
    (1 - min_lr_ratio) / D for a wsd decay over D steps: a run's recorded results are of this schedule.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if total_steps <= warmup_steps:  # the schedule ended during warmup: flat at its minimum after, as after its end
        return min_lr_ratio
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        if step >= total_steps:  # a window of no steps (decay_fraction 0) ended at 1.0 there too, one step late
            return min_lr_ratio
        decay_start = total_steps - round(decay_fraction * total_steps)  # int() made 0.7 x 90 = 62.99... 62
        # A decay window reaching back into warmup starts where warmup ends: the LR must not jump from 1 to below it
        decay_start = max(decay_start, warmup_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over supervised positions (labels != -100), and the number of those positions.

    The one place where loss is normalised by the supervised-token count. logits: (B, T, V), labels: (B, T).
    The loss is taken in fp32 without holding an fp32 copy of all logits: under torch.compile (`compile: true`
    compiles this function too) Inductor fuses the upcast into the loss kernels; in eager mode the rows go through
    `chunked_cross_entropy`, one fp32 chunk at a time.
    """
    logits, labels = logits.flatten(0, 1), labels.flatten()
    if torch.compiler.is_compiling():
        loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        loss_sum = chunked_cross_entropy(logits, labels)
    n_tokens = (labels != IGNORE_INDEX).sum()
    return loss_sum / n_tokens.clamp(min=1), n_tokens


def _row_losses(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cross-entropy of each row of fp32 logits x (N, V), 0 where labels == -100: (N,); and, for the gradient, the
    rows' logsumexp (N, 1), the labels as gather indices (N, 1) and which rows are supervised (N, 1). Both paths of
    token_cross_entropy take their losses from here, so that they agree to the bit: DPO compares its policy's
    log-probabilities (with gradients) with its reference's (without), which must tie while the weights are equal."""
    supervised = (labels != IGNORE_INDEX).unsqueeze(1)
    # Masked rows take index 0 and are zeroed below; any other label out of range still fails in gather
    index = labels.masked_fill(labels == IGNORE_INDEX, 0).unsqueeze(1)
    log_z = torch.logsumexp(x, dim=1, keepdim=True)
    # where, not a multiply: a masked row's NaN or -inf logits must not reach the loss (NaN x 0 = NaN)
    return torch.where(supervised, log_z - x.gather(1, index), 0.0).squeeze(1), log_z, index, supervised


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy whose forward pass also computes d(loss)/d(logits), chunk by chunk in fp32.

    Eager `F.cross_entropy(logits.float())` keeps the fp32 logits and the fp32 log-probabilities for backward: for
    GPT-2's vocabulary at 32 x 1024 tokens that is 2 x 6.6 GB, on top of the 3.3 GB bf16 logits. Here only one chunk
    is ever in fp32 and what is kept for backward is the gradient itself, in the logits' dtype (softmax - one_hot).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        grad = torch.empty_like(logits)
        losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk_rows):
            # A copy even of fp32 logits: the softmax below works in this buffer, and the caller's logits stay intact
            x = logits[start : start + chunk_rows].to(torch.float32, copy=True)
            losses[start : start + chunk_rows], log_z, y, supervised = _row_losses(
                x, labels[start : start + chunk_rows]
            )
            probs = torch.exp(x.sub_(log_z))  # softmax, reusing the chunk's fp32 buffer
            probs.scatter_add_(1, y, torch.full_like(y, -1, dtype=probs.dtype))
            grad[start : start + chunk_rows] = probs.masked_fill_(~supervised, 0.0)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.unsqueeze(1).to(grad.dtype), None, None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = 2**25) -> torch.Tensor:
    """Cross-entropy of each row (N,) in fp32, 0 where labels == -100, for logits (N, V), labels (N,); see
    _ChunkedCrossEntropy. chunk_elements bounds the fp32 working set (2**25 floats = 128 MiB). Eager only: compiled
    code takes `F.cross_entropy(logits.float())`, whose upcast Inductor fuses (next_token_loss)."""
    chunk_rows = max(1, chunk_elements // logits.shape[1])
    if not torch.is_grad_enabled() or not logits.requires_grad:
        return torch.cat(
            [
                _row_losses(chunk.float(), chunk_labels)[0]
                for chunk, chunk_labels in zip(logits.split(chunk_rows), labels.split(chunk_rows), strict=True)
            ]
        )
    return _ChunkedCrossEntropy.apply(logits, labels, chunk_rows)


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = 2**25) -> torch.Tensor:
    """Sum of token cross-entropies (labels == -100 ignored) for logits (N, V), labels (N,): see token_cross_entropy."""
    return token_cross_entropy(logits, labels, chunk_elements).sum()


def convert_to_fp8(model: GPT, device: torch.device) -> GPT:
    """Swap the Linear layers of the blocks for torchao's Float8Linear, in place: their matmuls (forward and both
    backward ones) run in float8 with dynamic per-tensor scales, torchtitan's default float8 recipe. Weights,
    gradients and optimizer state stay in high precision, so `state_dict()` keys and shapes do not change.

    Call it before `compile` (the casts then fuse into the neighbouring kernels). Raises LMError when the device has
    no float8 matmuls (CUDA compute capability < 8.9), a width is not a multiple of 16, or torchao is not installed.
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise LMError(
                f"model.fp8 needs a GPU with float8 matmuls (compute capability >= 8.9: Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}: set model.fp8 false"
            )
    elif device.type == "cpu":
        # torch's CPU _scaled_mm computes the same numbers slowly: good for tests, never for speed
        if torch.__version__ < (2, 8):  # torch._scaled_mm got its CPU kernel in 2.8
            raise LMError(
                f"model.fp8 on CPU needs torch >= 2.8 (torch._scaled_mm on CPU); this is torch {torch.__version__}"
            )
        rank_zero_warn("model.fp8 on CPU runs float8 matmuls through torch's reference kernel: expect no speedup")
    else:
        raise LMError(f"model.fp8 runs on CUDA GPUs (compute capability >= 8.9) or, for tests, on CPU; not {device}")
    # float8 GEMMs (cuBLASLt) need both dimensions of every weight to be multiples of 16. The weight-gradient matmul
    # also contracts over the tokens of a micro-batch, so batch x sequence length must be a multiple of 16 as well:
    # training_step checks that (torch's CPU kernel accepts any size, so only a GPU would fail, mid-run).
    odd = [
        f"layers.{name} ({m.in_features} -> {m.out_features})"
        for name, m in model.layers.named_modules()
        if isinstance(m, torch.nn.Linear) and (m.in_features % 16 or m.out_features % 16)
    ]
    if odd:
        raise LMError(
            f"model.fp8 needs Linear widths that are multiples of 16; {', '.join(odd[:3])}"
            f"{' ...' if len(odd) > 3 else ''} are not: change model.arch.n_embd / n_head / n_kv_head / mlp_hidden"
        )
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise LMError(f"model.fp8 needs torchao ({e}): pip install 'lm[fp8]', or set model.fp8 false") from e
    # Only the blocks: lm_head stays in bf16, as torchtitan leaves the output layer by default. Its logits go
    # straight into the softmax, where float8's 3 mantissa bits would cost the most accuracy, and a tied head's
    # weight is the embedding table. Convert it only if a measurement shows the loss does not suffer.
    return convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn.startswith("layers."))


def _check_hyperparameters(
    *,
    lr: float,
    min_lr_ratio: float,
    warmup_steps: int,
    decay_steps: int | None,
    wsd_decay_fraction: float,
    weight_decay: float,
    betas: tuple[float, float],
    max_skipped_steps: int,
    muon_lr: float | None,
    muon_momentum: float,
    muon_ns_steps: int,
) -> None:
    """Refuse values no run could mean, naming the key, before torch or the schedule fail on them mid-setup."""
    problems = {
        "lr": (lr, not (math.isfinite(lr) and lr > 0), "a number > 0"),
        "min_lr_ratio": (min_lr_ratio, not 0 <= min_lr_ratio <= 1, "in [0, 1]"),
        "warmup_steps": (warmup_steps, warmup_steps < 0, ">= 0"),
        "decay_steps": (decay_steps, decay_steps is not None and decay_steps < 1, ">= 1, or null for the run's steps"),
        "wsd_decay_fraction": (wsd_decay_fraction, not 0 <= wsd_decay_fraction <= 1, "in [0, 1]"),
        "weight_decay": (weight_decay, not (math.isfinite(weight_decay) and weight_decay >= 0), ">= 0"),
        "betas": (tuple(betas), len(betas) != 2 or not all(0 <= b < 1 for b in betas), "two numbers in [0, 1)"),
        "max_skipped_steps": (max_skipped_steps, max_skipped_steps < 0, ">= 0"),
        "muon_lr": (muon_lr, muon_lr is not None and not (math.isfinite(muon_lr) and muon_lr > 0), "> 0, or null"),
        "muon_momentum": (muon_momentum, not 0 <= muon_momentum < 1, "in [0, 1)"),
        "muon_ns_steps": (muon_ns_steps, muon_ns_steps < 1, ">= 1"),
    }
    for key, (value, bad, expected) in problems.items():
        if bad:
            raise LMError(f"model.init_args.{key} must be {expected}, got {value}")


def _init_from_config(info: dict, path: str) -> GPTConfig:
    """The architecture stored in an init_from checkpoint's "lm" entry."""
    if "model_config" not in info:
        raise LMError(f"{path}: not an lm checkpoint (no model config inside), cannot init_from it")
    return GPTConfig.from_dict(info["model_config"], path)


def _adopt_callback_states_saved_under_class_names(callbacks: list[L.Callback], checkpoint: dict) -> None:
    """An older lm saved TaskAccuracy's and EvalCallback's states under their class names, before their keys named
    their tasks (so that two can train together): each goes to this run's callback of that class under its key.

    Done in the module's hook, which Lightning calls before it compares the checkpoint's callback keys with the
    run's: moved by the callbacks' own hooks, after that, the count was read but Lightning had asked to "add the
    following callbacks: ['TaskAccuracy']", which the run had. (A callback keyed by its class name alone finds its
    state there already and is left alone.)"""
    states = checkpoint.get("callbacks") or {}
    for callback in callbacks:
        older = type(callback).__qualname__
        if older in states and callback.state_key not in states:
            states[callback.state_key] = states.pop(older)


class LanguageModel(L.LightningModule):
    """A GPT trained on next-token prediction.

    Args:
        arch: Architecture of the GPT. `vocab_size` is replaced by the data module's tokenizer size (padded to 64).
        lr: Peak learning rate of AdamW.
        min_lr_ratio: Final learning rate as a fraction of `lr` (cosine and wsd schedules), reached at step
            decay_steps, or at max_steps when decay_steps is unset (one after the run's last step; see lr_multiplier),
            and flat after.
        schedule: LR schedule after warmup: cosine decay, warmup-stable-decay, or constant. cosine and wsd decay
            towards an end, so they need trainer.max_steps (or max_epochs over a sized loader) or decay_steps.
        warmup_steps: Optimizer steps of linear warmup.
        decay_steps: Optimizer step at which the schedule reaches its minimum; None means the Trainer's total steps
            (max_steps, or what max_epochs comes to).
        wsd_decay_fraction: Fraction of the wsd schedule spent decaying at its end: of decay_steps when set (a run
            that stops before decay_steps may never decay), else of the run's steps.
        weight_decay: Weight decay, applied to 2-D matmul weights only (not norms or the embedding).
        betas: AdamW betas; nanoGPT uses beta2 0.99 for small models and 0.95 for GPT-2.
        optimizer: adamw for every parameter, or muon: Muon (torch.optim.Muon's update, batched by shape in
            lm.optim.Muon; torch >= 2.9) for the 2-D weights inside the blocks and AdamW for embeddings, head and
            norms, with the same schedule. Muon scales its update to AdamW's RMS (adjust_lr_fn match_rms_adamw), so
            AdamW's lr is a sound start for both.
        muon_lr: Muon's peak LR; null: lr. The schedule scales both alike; train/lr logs AdamW's.
        muon_momentum: Muon's momentum (torch's default 0.95).
        muon_nesterov: Nesterov momentum in Muon (torch's default).
        muon_ns_steps: Newton-Schulz iterations that orthogonalise each update (torch's default 5).
        compile: Compile the GPT with torch.compile (off by default; gpt2_124m.yaml turns it on, while
            shakespeare_char.yaml stays eager: compiling costs its one-minute GPU run more than it saves; slow to
            start on CPU).
        fp8: Run the blocks' matmuls in float8 (torchao's float8 training, dynamic tensorwise scales; the head and
            everything else stay in bf16). Needs a GPU of CUDA compute capability >= 8.9 (Ada, Hopper, newer), the `fp8`
            extra (`pip install 'lm[fp8]'`), and layer widths and batch x sequence length that are multiples of 16 (chat
            data: `data.init_args.pad_to_multiple_of: 16`). Checkpoints are the same as without it.
        activation_checkpointing: Keep only each block's input for the backward pass and recompute the block there
            (torch.utils.checkpoint): activation memory drops to about one block's worth plus one (B, T, n_embd)
            tensor per block, for about a third more compute per step. For models or batches that do not fit
            otherwise; the trained weights are the same.
        init_from: An lm checkpoint to start from (fine-tuning): its architecture and weights replace `arch` (except
            dropout) and its tokenizer must be the data module's.
        max_skipped_steps: Optimizer steps with a non-finite loss or gradient are skipped (weights and optimizer state
            untouched, counted as train/skipped_steps); after this many the run stops. Under fp16 (16-mixed) the
            GradScaler skips overflowing steps itself: only non-finite losses are counted there.
    """

    trains_on_pairs = False  # lm.preference.PreferenceModel: True (its data module must be PreferenceData)

    # Attributes set on every step: Lightning's name of the running hook (set and restored around each hook it calls,
    # ~50 times a step) and this class's step bookkeeping. They never hold parameters, buffers or submodules, so they
    # skip nn.Module.__setattr__'s registry checks: 0.3 us a set instead of 2.2 us (measured on a CPU), ~0.1 ms a step.
    _PLAIN_STEP_ATTRIBUTES = frozenset(
        {
            "_current_fx_name",
            "_step_tokens",
            "_step_loss_sum",
            "_grad_scale",
            "_grad_norm",
            "_step_values",
            "_logged_step",
            "_nonfinite_steps",
            "_skips_counted_to",
        }
    )

    def __setattr__(self, name, value):
        if name in self._PLAIN_STEP_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(
        self,
        arch: GPTConfig = GPTConfig(),  # noqa: B008 - a dataclass default; jsonargparse copies it
        *,
        lr: float = 6e-4,
        min_lr_ratio: float = 0.1,
        schedule: Literal["cosine", "wsd", "constant"] = "cosine",
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        wsd_decay_fraction: float = 0.2,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float | None = None,
        muon_momentum: float = 0.95,
        muon_nesterov: bool = True,
        muon_ns_steps: int = 5,
        compile: bool = False,
        fp8: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
        max_skipped_steps: int = 10,
    ):
        _check_hyperparameters(
            lr=lr,
            min_lr_ratio=min_lr_ratio,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
            wsd_decay_fraction=wsd_decay_fraction,
            weight_decay=weight_decay,
            betas=betas,
            max_skipped_steps=max_skipped_steps,
            muon_lr=muon_lr,
            muon_momentum=muon_momentum,
            muon_ns_steps=muon_ns_steps,
        )
        super().__init__()
        self.arch = arch
        self.save_hyperparameters(ignore=["arch"])
        self.hparams["arch"] = asdict(self.arch)  # a plain dict, so checkpoints load with weights_only=True
        self.model: GPT | None = None
        self.tokenizer = None  # set from the data module; saved into every checkpoint
        self.run_config: str | None = None  # the resolved YAML of the run, set by the CLI; saved into checkpoints
        # Token-weighted across batches and ranks, as two sums. Not MeanMetric: its NaN check reads every batch on the
        # host, and it drops a NaN batch from the mean (a model failing on some batches would show a plausible
        # val/loss, and a checkpoint callback could keep it); with nan_strategy "disable" it drops the weights.
        self.val_loss_sum = SumMetric(nan_strategy="disable")
        self.val_tokens = SumMetric(nan_strategy="disable")
        self._step_tokens = None  # supervised tokens seen by the micro-batches of the current optimizer step
        self._step_loss_sum = None  # their summed loss (loss x tokens), for train/loss over the whole step
        self._logged_step = False  # whether the optimizer step just taken logged its metrics
        self._step_values: tuple | None = None  # (loss sum, tokens, LR) of the step just taken (all ranks' sums)
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss/gradient (saved in checkpoints)
        self.stopped_at_step: int | None = None  # the step (from 1) that went over max_skipped_steps, if one did
        self.checkpoint_step: int | None = None  # the global step of the checkpoint loaded, for lm validate's line
        self._loss = next_token_loss  # compiled in configure_model when `compile` is on
        self._grad_scale: torch.Tensor | None = None  # 1 / supervised tokens of the current optimizer step
        self._grad_norm: torch.Tensor | None = None  # of the current step, after token scaling, before clipping
        self._params: list[torch.nn.Parameter] = []  # the model's, cached by _model_parameters()
        self._shard_copies: int | None = None
        self._param_dims: dict[str, int] = {}  # each parameter's dims as built, before a strategy flattens them
        self._nonfinite_steps: torch.Tensor | None = None  # skipped steps not yet counted on the host
        self._skips_counted_to = 0  # the last step (from 1) whose skip, if any, the host has counted
        self._backward_divisor = 1.0  # fp16 only: the backward's loss is divided by it, the gradients multiplied back
        self._restored_scale_divisor: float | None = None  # the divisor a restored GradScaler's scale was found with

    # ---- model -------------------------------------------------------------------------------------------------

    def configure_model(self):
        if self.model is not None:
            return
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "tokenizer", None) is not None:
            self.tokenizer = datamodule.tokenizer
            self.arch = replace(self.arch, vocab_size=padded_vocab_size(self.tokenizer.vocab_size))
        if datamodule is not None and getattr(datamodule, "batch_holds_pairs", False) != self.trains_on_pairs:
            # The batch shape is the same, its rows are not: next-token loss on preference pairs would learn the
            # rejected replies, and DPO on plain rows would pair unrelated sequences.
            raise LMError(
                f"{type(self).__name__} cannot train on {type(datamodule).__name__}: preference pairs "
                "(lm.preference.PreferenceData) go with lm.preference.PreferenceModel, other data with "
                "lm.module.LanguageModel"
            )
        init_state = self._read_init_checkpoint() if self.hparams.init_from else None
        data_context = getattr(datamodule, "block_size", None)
        if data_context is not None and data_context > self.arch.block_size:
            raise LMError(
                f"data.init_args.block_size {data_context} is longer than the model's context "
                f"{self.arch.block_size}" + (f" (from {self.hparams.init_from})" if self.hparams.init_from else "")
            )
        self.hparams["arch"] = asdict(self.arch)
        self.model = GPT(self.arch)
        self.model.checkpoint_layers = self.hparams.activation_checkpointing
        # Before any strategy wraps it: FSDP gives configure_optimizers flat shards, the optimizer groups need these.
        self._param_dims = {name: p.dim() for name, p in self.model.named_parameters()}
        if init_state is not None:
            self.model.load_state_dict(init_state)
        if self.hparams.fp8:  # after loading weights (keys are unchanged anyway), before compiling
            device = self.trainer.strategy.root_device if self._trainer is not None else self.device
            convert_to_fp8(self.model, device)
        if self.hparams.compile:
            self.model.compile()  # in place: checkpoint keys stay free of `_orig_mod.`
            # The loss too: eager cross-entropy over GPT-2's vocabulary moves ~50 GB of fp32 logits per 32 x 1024
            # batch; compiled, it is two fused passes over the bf16 logits.
            self._loss = torch.compile(next_token_loss)

    @property
    def context_length(self) -> int:
        """The context the model trains with: init_from's when given (configure_model adopts that file's
        architecture), else arch's. The CLI sets the data's block_size from it, before any data is prepared."""
        if not self.hparams.init_from:
            return self.arch.block_size
        info = read_checkpoint(self.hparams.init_from, mmap=True).get("lm") or {}  # the weights stay on disk
        return _init_from_config(info, self.hparams.init_from).block_size

    def _read_init_checkpoint(self) -> dict[str, torch.Tensor]:
        """Weights of `init_from`; adopts its architecture (keeping this run's dropout) and checks the tokenizer."""
        path = self.hparams.init_from
        ckpt = read_checkpoint(path, mmap=True)  # a training checkpoint's optimizer state stays on disk
        info = ckpt.get("lm") or {}
        arch = _init_from_config(info, path)
        self._check_tokenizer(info, f"{path}: its tokenizer", f"set data.init_args.tokenizer to {path}")
        self.arch = replace(arch, dropout=self.arch.dropout)
        return gpt_state_dict(ckpt, path)

    def _check_tokenizer(self, info: dict, whose: str, advice: str) -> None:
        """Refuse a checkpoint whose tokenizer differs from the data's: its embedding rows mean other tokens."""
        if self.tokenizer is None or info.get("tokenizer") is None:
            return
        theirs = Tokenizer.from_state(info["tokenizer"])
        if theirs.fingerprint != self.tokenizer.fingerprint:
            raise LMError(
                f"{whose} ({theirs.kind}, {theirs.vocab_size} ids) differs from the data's "
                f"({self.tokenizer.kind}, {self.tokenizer.vocab_size} ids): {advice}"
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one training step per token (the numerator of train/mfu)."""
        return self.model.flops_per_token(seq_len)

    # ---- steps -------------------------------------------------------------------------------------------------

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The one step shared by training and validation: forward, then masked next-token loss."""
        logits = self.model(batch["input_ids"])
        return self._loss(logits, batch["labels"])

    def training_step(self, batch, batch_idx):
        if self.hparams.fp8 and batch["input_ids"].numel() % 16:  # a shape, no device sync
            raise LMError(
                f"model.fp8: a batch of {' x '.join(map(str, batch['input_ids'].shape))} tokens; float8 matmuls need "
                "batch x length to be a multiple of 16 (chat data: set data.init_args.pad_to_multiple_of 16)"
            )
        loss, n_tokens = self.model_step(batch)
        # Backpropagate the token-weighted sum; on_before_optimizer_step divides the gradients by the tokens of the
        # whole step, so accumulating 4 x B equals one batch of 4B even when micro-batches hold different numbers of
        # supervised tokens (chat data). Lightning divides by accumulate_grad_batches; we undo that there.
        loss_sum = loss * n_tokens
        # Summed on the device over the step's micro-batches: train/loss is logged once the step is complete.
        self._step_tokens = n_tokens if self._step_tokens is None else self._step_tokens + n_tokens
        detached = loss_sum.detach()
        self._step_loss_sum = detached if self._step_loss_sum is None else self._step_loss_sum + detached
        scaler = self._grad_scaler()
        if scaler is not None:
            # fp16: a sum over N tokens makes gradients N times a mean's, and every run began with ~log2(N) steps
            # the GradScaler skipped for overflow (its first scale, 2**16, is itself fp16's inf in the loss's backward).
            # So the backward gets about the mean; a constant for the whole fit, multiplied back in
            # on_before_optimizer_step, keeps micro-batches with different token counts weighted exactly.
            if self._backward_divisor == 1.0:
                self._backward_divisor = self._loss_units_per_batch(batch)
                if self._restored_scale_divisor is not None:
                    # A resumed scale was found for a backward divided by another divisor (1 in a checkpoint written
                    # before it; another batch size). What must carry over is scale / divisor, the factor that reaches
                    # the gradients: rescaled at once, instead of ~2000 clean steps per doubling to get there.
                    state = scaler.state_dict()
                    state["scale"] *= self._backward_divisor / self._restored_scale_divisor
                    scaler.load_state_dict(state)  # also before its first scale(), where it holds the state unset
                    self._restored_scale_divisor = None
            return loss_sum / self._backward_divisor
        return loss_sum

    def _loss_units_per_batch(self, batch) -> float:
        """What a micro-batch's loss sum counts at most (supervised tokens: rows x context), from shapes alone."""
        return float(batch["input_ids"].shape[0] * self.context_length)

    def on_train_start(self):
        self._params = []  # read again after the strategy's set-up: FSDP replaces the parameters
        self._shard_copies = (
            None  # FSDP: ranks holding each gradient shard (_fsdp_shard_copies), found at the first step
        )
        # A previous fit of this module may have stopped inside an accumulation window (max_time, should_stop)
        self._step_tokens = self._step_loss_sum = None
        self._logged_step, self._step_values = False, None
        self._backward_divisor = 1.0  # set by the first fp16 micro-batch
        self._skips_counted_to = self.global_step  # a resumed fit counted those before it
        self.checkpoint_step = None  # a resume's: a later validate in this process scores weights trained on since
        # optimizer_zero_grad below does nothing: the first step must not add to gradients left from before the fit
        self.model.zero_grad(set_to_none=True)
        self._schedule_lr_for_this_step()

    def _schedule_lr_for_this_step(self) -> None:
        """Set each group's LR to what this fit's schedule gives at the step it starts from. A resume restores the LR
        the checkpoint's schedule had set, and LambdaLR recomputes it only after the next step: a resume with a larger
        max_steps (a later end of decay) took its first step at the old schedule's LR (1e-4 where the longer run had
        1e-3). A fresh fit's LR is unchanged."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                groups = scheduler.optimizer.param_groups
                for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                    group["lr"] = base * factor(scheduler.last_epoch)
                scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports

    def _fsdp_shard_copies(self) -> int:
        """How many ranks hold each gradient shard under FSDP: one when fully sharded (FULL_SHARD, SHARD_GRAD_OP),
        every rank under NO_SHARD, one per shard group under HYBRID_SHARD (a node's shards copied on every node).
        Summed over ranks without it, the gradient norm came out sqrt(copies) times too large, and clipping too
        strong."""
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        fsdp = next((m for m in self.trainer.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)), None)
        if fsdp is None:
            return 1
        if fsdp.sharding_strategy == ShardingStrategy.NO_SHARD:
            return self.trainer.world_size
        return self.trainer.world_size // torch.distributed.get_world_size(fsdp.process_group)

    def _model_parameters(self) -> list[torch.nn.Parameter]:
        """The model's parameters, listed once per fit: walking the modules twice a step costs a small model on a CPU
        (~30 ms a step) about 1% of its step time."""
        if not self._params:
            self._params = list(self.model.parameters())
        return self._params

    def on_before_optimizer_step(self, optimizer):
        scaler = self._grad_scaler()
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Lightning leaves fp16 gradients scaled for optimizers that unscale inside their step (fused AdamW), so
            # the norm and clipping below would see them times the loss scale; unscale them first. The scaler then
            # only skips (or not) the step, and still records the overflow it found here.
            scaler.unscale_(optimizer)
        tokens = self._step_tokens.detach().float()
        loss_sum = self._step_loss_sum.float()
        world_size = self.trainer.world_size
        if world_size > 1:
            # DDP averages gradients over ranks; the mean must be over all ranks' tokens instead. The same all-reduce
            # carries the summed loss: train/loss is over all ranks, and every rank sees a non-finite loss on any.
            tokens, loss_sum = sum_over_ranks(torch.stack([tokens, loss_sum])).unbind()
        # Gradients are scaled (here by tokens, then by clipping) in one pass, in configure_gradient_clipping; the
        # world size undoes DDP's average. The clamp only keeps a step with no supervised token (zero gradients) from
        # dividing by 0: on the ranks' total, since their average (1 token on one of 2 ranks: 0.5) went up to 1.
        self._grad_scale = (
            self.trainer.accumulate_grad_batches * self._backward_divisor * world_size / tokens.clamp(min=1)
        )
        self._step_tokens = self._step_loss_sum = None
        grads = [p.grad for p in self._model_parameters() if p.grad is not None]
        norm_squared = torch.stack(torch._foreach_norm(grads)).float().square().sum()
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # each rank holds a shard: their squares add up, counted once per copy of each shard
            if self._shard_copies is None:  # once per fit: walking the modules every step costs a small model ~1%
                self._shard_copies = self._fsdp_shard_copies()
            norm_squared = sum_over_ranks(norm_squared) / self._shard_copies
        self._grad_norm = norm_squared.sqrt() * self._grad_scale
        if scaler is not None:
            # A GradScaler skips overflowing steps itself and lowers its scale: that is how fp16 training works,
            # not a fault. Only a non-finite loss, which no scale fixes, counts towards max_skipped_steps.
            bad_loss = ~torch.isfinite(loss_sum)
            self._nonfinite_steps_add(bad_loss)
            # The scaler skips only for overflowing gradients: a loss that is inf with finite gradients (a label's
            # logit at -inf) is flagged to it as one more overflow (the gradients were unscaled by now, into this
            # record, which its step reads; its scale backs off too).
            found = scaler._per_optimizer_states.get(id(optimizer), {}).get("found_inf_per_device", {})
            for flag in found.values():
                flag.add_(bad_loss.to(flag.device, flag.dtype))
        # The LR this step uses, read here: Lightning steps the scheduler before on_train_batch_end, which would show
        # the next step's. Kept with the step's sums for a stop at a step that is not a logging step (below).
        self._step_values = (loss_sum, tokens, optimizer.param_groups[-1]["lr"])  # AdamW's last group (Muon's first)
        self._logged_step = self._is_logging_step()
        if self._logged_step:
            self._log_train_metrics()

    def _log_train_metrics(self):
        loss_sum, tokens, lr = self._step_values
        loss = loss_sum / tokens.clamp(min=1)  # over every micro-batch (and rank) of the step, weighted by tokens
        self.log("train/loss", loss)
        # Lightning turns progress-bar values into Python numbers after every batch (a host sync for a GPU tensor),
        # so the bar gets a CPU copy, refreshed here, where the logger reads the loss anyway.
        self.log("loss", loss.cpu(), prog_bar=True, logger=False)
        self.log("train/grad_norm", self._grad_norm)
        self.log("train/lr", torch.tensor(lr))  # a CPU tensor: a Python float would be copied to the GPU (a sync)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Scale the gradients to the mean over the step's tokens and clip them by the global norm of
        on_before_optimizer_step, in one pass (one norm and one multiply per step), then drop the update if that norm
        is NaN/inf.

        Without a host sync where the optimizer can skip on the device: fused AdamW (CUDA and CPU) reads a
        `found_inf` flag, as under a GradScaler, and leaves weights, moments and step count untouched; MuonWithAdamW
        takes the same flag. The skipped steps are counted on the device and read at logging steps (every step on
        CPU, where reading is free). Other optimizers get every .grad set to None, after a sync. Under fp16 the
        GradScaler skips instead.
        """
        grads = [p.grad for p in self._model_parameters() if p.grad is not None]
        factor = self._grad_scale
        if gradient_clip_val and gradient_clip_algorithm != "value":
            # torch.nn.utils.clip_grad_norm_'s rule; a NaN norm makes NaN grads, which the skip below discards
            factor = factor * (gradient_clip_val / (self._grad_norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))
        if gradient_clip_val and gradient_clip_algorithm == "value":
            # Clamped here, not through self.clip_gradients: under fp16 Lightning refuses to clip for an optimizer
            # that unscales inside its step (fused AdamW), but on_before_optimizer_step has already unscaled them.
            torch._foreach_clamp_min_(grads, -gradient_clip_val)
            torch._foreach_clamp_max_(grads, gradient_clip_val)
        scaler = self._grad_scaler()
        if scaler is not None:
            # fp16: the GradScaler already decided from the unscaled gradients whether this step runs (a NaN factor
            # here makes NaN gradients only in a step it skips); non-finite losses were counted before the step.
            if self._host_may_read_device():
                self._count_skipped_steps(self.global_step + 1)
            return
        # A loss can be inf with finite gradients (a label's logit at -inf): that step is dropped too. The loss sum is
        # all-reduced under DDP, so every rank agrees.
        not_finite = ~torch.isfinite(self._grad_norm) | ~torch.isfinite(self._step_values[0])
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning may hand over its wrapper
        if getattr(optimizer, "defaults", {}).get("fused") or isinstance(optimizer, MuonWithAdamW):
            optimizer.found_inf = not_finite.float()
            self._nonfinite_steps_add(not_finite)
            if self._host_may_read_device():
                self._count_skipped_steps(self.global_step + 1)
            return
        if not_finite:  # read on the host at every step: an optimizer without found_inf
            for p in self._model_parameters():
                p.grad = None
            self._add_skipped_steps(1, self.global_step + 1)
        self._skips_counted_to = self.global_step + 1

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's GradScaler (fp16 mixed precision), or None (bf16, fp32, or no Trainer)."""
        return getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def _nonfinite_steps_add(self, not_finite: torch.Tensor):
        """Count a skipped step on the device (no sync); _count_skipped_steps moves the count to the host."""
        counted = not_finite.int()
        self._nonfinite_steps = counted if self._nonfinite_steps is None else self._nonfinite_steps + counted

    def _count_skipped_steps(self, step: int | None = None):
        """Move the device-side count of skipped steps to the host (one sync), warning and stopping as needed. `step`:
        the last step the count covers, numbered from 1 as the progress lines and last.ckpt count them (the step being
        taken, before its optimizer step); None: the last step taken."""
        step = self.global_step if step is None else step
        if self._nonfinite_steps is not None:
            new, self._nonfinite_steps = int(self._nonfinite_steps), None
            if new:
                self._add_skipped_steps(new, step)
        self._skips_counted_to = step

    def _add_skipped_steps(self, new: int, step: int):
        """Count `new` skipped steps among those after the last count, up to `step` (numbered from 1)."""
        self.skipped_steps += new
        first = self._skips_counted_to + 1
        # On CUDA the count reaches the host at logging steps only: which of the steps since then is not known
        where = f"at step {step}" if first >= step else f"in {new} of steps {first}-{step}"
        rank_zero_warn(
            f"non-finite loss or gradient {where}: update skipped ({self.skipped_steps} skipped so far, limit "
            f"model.max_skipped_steps={self.hparams.max_skipped_steps})"
        )
        if self.skipped_steps > self.hparams.max_skipped_steps:
            self.stopped_at_step = step
            self.trainer.should_stop = True

    def on_train_epoch_end(self):
        self._count_skipped_steps()

    def on_train_end(self):
        self._count_skipped_steps()

    def on_validation_epoch_start(self):
        # bf16-true casts every submodule, these metrics' running sums too, and a bf16 sum stops growing after a few
        # hundred batches: keep them in fp32.
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.set_dtype(torch.float32)

    def validation_step(self, batch, batch_idx):
        loss, n_tokens = self.model_step(batch)
        self.val_loss_sum.update(loss * n_tokens)
        self.val_tokens.update(n_tokens)

    def _val_loss(self) -> torch.Tensor:
        """The validation's loss over all its supervised tokens (and ranks: the metrics reduce), NaN if any batch's
        was; the sums are reset for the next validation."""
        val_loss = self.val_loss_sum.compute() / self.val_tokens.compute().clamp(min=1)
        self.val_loss_sum.reset()
        self.val_tokens.reset()
        return val_loss

    def on_validation_epoch_end(self):
        val_loss = self._val_loss()
        # The metrics already reduced across ranks, so every rank holds the same value: sync_dist only averages
        # identical numbers (and keeps Lightning from warning on every rank)
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(val_loss), sync_dist=True)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._step_values is None:  # a micro-batch inside an accumulation window: its step is still to come
            return
        stopping = self.trainer.should_stop
        if stopping and not self._logged_step:
            # Lightning writes the logs of a step that stops the run (max_skipped_steps, a signal) whatever
            # log_every_n_steps says: with this step's values, not the last logging step's, which it would repeat.
            self._log_train_metrics()
        if self._logged_step or stopping:
            # A host number goes in as a CPU tensor: Lightning would copy a Python float to the GPU, a sync.
            self.log("train/skipped_steps", torch.tensor(float(self.skipped_steps)))
        self._logged_step, self._step_values = False, None

    def _host_may_read_device(self) -> bool:
        """Whether this step may read device values on the host: off CUDA always (the values are there already), on
        CUDA only at logging steps, since a read waits for the device to finish its queue and so loses the host's
        lead over it. (A test pretends to be on CUDA by replacing this.)"""
        return self.device.type != "cuda" or self._is_logging_step()

    def _is_logging_step(self) -> bool:
        """Whether the Trainer hands this optimizer step's metrics to the logger (every log_every_n_steps; 0 = never,
        as Lightning reads it). Asked before the step: in on_before_optimizer_step and gradient clipping.

        Training metrics are logged on those steps only: what is logged in between never reaches a logger, and each
        `self.log` costs about a millisecond of Python, which a small model's step on a GPU cannot hide.
        """
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    # ---- optimizer ---------------------------------------------------------------------------------------------

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        # Free the gradients as soon as the step has used them, as a plain loop does. Lightning's default frees them
        # in the next step's closure, between its forward and its backward, so they stay allocated through that
        # forward: the peak memory holds the gradients beside the activations (433 MB more peak RSS at the 124M
        # shape on a CPU), and the CPU step ran ~2% slower (docs/benchmarks.md). Accumulation is unaffected:
        # Lightning zeroes only before a window's first micro-batch, where the gradients are gone already.
        optimizer.zero_grad(set_to_none=True)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        """Nothing: optimizer_step has freed the gradients after the previous step (and on_train_start before the
        first). Lightning still calls `on_before_zero_grad` hooks here, after the next training_step, but they and
        `on_train_batch_end` hooks find no gradients: read them in `on_before_optimizer_step` instead."""

    def configure_optimizers(self):
        hp = self.hparams
        dims = self._param_dims
        # a checkpoint from before these settings resumes with __init__'s defaults for them, like any missing argument
        muon = {
            "lr": hp.muon_lr or hp.lr,
            "momentum": hp.muon_momentum,
            "nesterov": hp.muon_nesterov,
            "ns_steps": hp.muon_ns_steps,
        }
        optimizer, summary = build_optimizer(self.model, hp.optimizer, hp.lr, hp.weight_decay, hp.betas, dims, muon)
        rank_zero_info(summary)
        if hp.decay_steps is None:
            run_steps = self.trainer.estimated_stepping_batches
        else:  # estimated_stepping_batches may load the data, needlessly here: max_steps tells enough for a warning
            run_steps = self.trainer.max_steps if self._trainer is not None else -1
        # Lightning's length of a run that has none: inf under max_epochs -1 (what max_time alone leaves), and -1
        # (max_steps) for an unsized, iterable, loader bounded by epochs. A decay cannot be placed in either, and a
        # fallback (a constant LR, or min_lr_ratio right after warmup) is not the schedule the config names.
        known_length = math.isfinite(run_steps) and run_steps >= 0
        if hp.decay_steps is None and not known_length and hp.schedule != "constant":
            raise LMError(
                f"schedule {hp.schedule} needs a length: set trainer.max_steps or model.init_args.decay_steps "
                f"(max_time, max_epochs -1 and an unsized loader give none)"
            )
        self._warn_if_the_run_misses_the_schedule(int(run_steps) if known_length else -1)
        # a constant schedule never reads its length
        total = hp.decay_steps or (int(run_steps) if known_length else hp.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step,
                schedule=hp.schedule,
                warmup_steps=hp.warmup_steps,
                total_steps=total,
                min_lr_ratio=hp.min_lr_ratio,
                decay_fraction=hp.wsd_decay_fraction,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _warn_if_the_run_misses_the_schedule(self, run_steps: int) -> None:
        """Say so where the LR never does what the schedule promises: the run ends inside warmup, below the peak LR,
        or as warmup ends, before any decay; or decay_steps ends the schedule within warmup. run_steps: -1 unknown."""
        hp = self.hparams
        warmup = hp.warmup_steps
        if run_steps == 0:  # max_steps 0 prepares the data and trains nothing
            return
        if 0 < run_steps < warmup:  # every schedule, constant included, warms up linearly
            rank_zero_warn(
                f"the run ends at step {run_steps}, inside the {warmup} warmup steps: the LR peaks at "
                f"{run_steps / warmup:.3g} x lr; lower model.init_args.warmup_steps"
            )
        elif hp.schedule == "constant":
            return
        # The decay's first step (warmup_steps, counted from 0) is still at the peak: a run one step past warmup
        # trains its last step there too
        elif hp.decay_steps is None and 0 < warmup <= run_steps <= warmup + 1:
            rank_zero_warn(
                f"the run ends at step {run_steps}, as its {warmup} warmup steps do or one after: the {hp.schedule} "
                f"schedule never decays from the peak LR; lower model.init_args.warmup_steps"
            )
        elif hp.decay_steps is not None and hp.decay_steps <= warmup:
            rank_zero_warn(
                f"the {hp.schedule} schedule ends at step {hp.decay_steps}, within the {warmup} warmup steps: the LR "
                f"warms up, then stays at min_lr_ratio x lr (set model.init_args.decay_steps or warmup_steps)"
            )

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint):
        """Make the checkpoint self-contained: model config, tokenizer and run config travel with the weights."""
        self._count_skipped_steps()
        checkpoint["lm"] = {
            "format": CHECKPOINT_FORMAT,
            "model_config": asdict(self.arch),
            "tokenizer": self.tokenizer.to_state() if self.tokenizer is not None else None,
            "chat_template_version": CHAT_TEMPLATE_VERSION,
            "run_config": self.run_config,
            "skipped_steps": self.skipped_steps,
            "wandb_run_id": self.wandb_run_id(),
            # what the GradScaler's saved scale was found with: the restored checkpoint's until this fit's first
            # fp16 step has set (and rescaled to) its own divisor
            "fp16_backward_divisor": (
                self._restored_scale_divisor if self._restored_scale_divisor is not None else self._backward_divisor
            ),
        }

    def on_load_checkpoint(self, checkpoint):
        """Resuming: refuse a checkpoint whose tokenizer or architecture differs from this run's (its weights would
        not fit, or would mean something else)."""
        info = checkpoint.get("lm") or {}
        self._check_tokenizer(info, "checkpoint tokenizer", "resume with the data it was trained on")
        self._check_architecture(info)
        self.skipped_steps = int(info.get("skipped_steps", 0))
        # Lightning restores an fp16 run's GradScaler (its state: the precision plugin's entry); older checkpoints'
        # scales were found without a backward divisor, i.e. with 1
        if any(isinstance(v, dict) and "_growth_tracker" in v for v in checkpoint.values()):
            self._restored_scale_divisor = float(info.get("fp16_backward_divisor", 1.0))
        # lm validate restores no loop state, so trainer.global_step reads 0 there: this names the weights' step
        self.checkpoint_step = checkpoint.get("global_step")
        if self._trainer is not None:  # not under load_from_checkpoint
            _adopt_callback_states_saved_under_class_names(self.trainer.callbacks, checkpoint)

    def _check_architecture(self, info: dict) -> None:
        """Compare the checkpoint's model config with this run's, before Lightning loads the weights (a size mismatch
        there is a wall of tensor shapes). Fields are compared as the model resolves them (n_kv_head None = n_head)."""
        if self.model is None or "model_config" not in info:  # nothing built to load into, or not an lm checkpoint
            return
        theirs, ours = GPTConfig.from_dict(info["model_config"], "the checkpoint"), self.arch

        def resolved(config: GPTConfig) -> dict:
            return {**asdict(config), "n_kv_head": config.kv_heads, "mlp_hidden": config.mlp_width}

        theirs_fields, ours_fields = resolved(theirs), resolved(ours)
        # A continued run may change these: dropout is training-time only, and neither block_size nor rope_theta
        # changes a weight (the RoPE tables are rebuilt, not saved): a longer context is a continued run. Other fields
        # change shapes, or (n_head, norm_eps at the same shapes) what the trained weights compute.
        changeable = {"dropout", "block_size", "rope_theta"}
        # n_kv_head / mlp_hidden left unset on both sides differ only as a consequence of n_head / n_embd: not named.
        derived = {k for k in ("n_kv_head", "mlp_hidden") if getattr(theirs, k) is None and getattr(ours, k) is None}
        differ = [k for k in theirs_fields if k not in changeable | derived and theirs_fields[k] != ours_fields[k]]
        if differ:
            path = getattr(self.trainer, "ckpt_path", None) if self._trainer is not None else None
            raise LMError(
                f"{path or 'checkpoint'}: its model has "
                + ", ".join(f"{k}={theirs_fields[k]}" for k in differ)
                + " but this run's has "
                + ", ".join(f"{k}={ours_fields[k]}" for k in differ)
                + ": resume with the checkpoint's model.init_args.arch, or start a new run"
            )

    def wandb_run_id(self) -> str | None:
        """The W&B run this run logs to, kept in checkpoints so a resumed run continues the same W&B run."""
        from lightning.pytorch.loggers import WandbLogger

        if self._trainer is None:
            return None
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                return logger.experiment.id
        return None
