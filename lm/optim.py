"""Muon for the Transformer's hidden matrices, AdamW for everything else, as one optimizer.

Lightning's automatic optimization drives a single optimizer, so the two are wrapped: one `step`, one `zero_grad`,
one `state_dict`, and `param_groups` that are the two optimizers' own group dicts, so the LR schedule (LambdaLR)
and gradient clipping see every parameter. Muon uses `adjust_lr_fn="match_rms_adamw"`, which scales its
orthogonalised update to AdamW's typical RMS, so one learning rate and weight decay serve both (Moonlight's recipe).
"""

from collections import ChainMap, defaultdict
from typing import Literal

import torch

from lm.errors import LMError

# What FSDP, activation checkpointing and torch.compile insert into parameter names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter's name in the unwrapped model."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def build_optimizer(
    model: torch.nn.Module,
    optimizer: Literal["adamw", "muon"],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    dims: dict[str, int] | None = None,
    muon: dict | None = None,
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer LanguageModel trains with (the throughput benchmark's raw loop builds the same one), and a line
    that says how the parameters were split.

    2-D matmul weights decay; norm gains and the embedding table (also the head when tied) do not. With "muon", the
    blocks' hidden matrices go to Muon and everything else to AdamW. AdamW is fused: one kernel for all tensors (CUDA
    and CPU), and it can skip a non-finite step on the device.

    dims: each parameter's number of dimensions in the unwrapped model, by plain name. FSDP hands the optimizer
    flat 1-D shards, which would otherwise all land in the no-decay group; Muon cannot take shards at all.
    muon: Muon's settings (lr, momentum, nesterov, ns_steps); lr defaults to AdamW's, the rest to torch's.
    """
    params = [(plain_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    dim = {n: (dims or {}).get(n, p.dim()) for n, p in params}
    decay, no_decay = [], []
    for n, p in params:
        (decay if dim[n] >= 2 and "embed_tokens" not in n else no_decay).append(p)
    hidden = []
    if optimizer == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise LMError(
                f"model.optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}"
            )
        # Muon orthogonalises whole-matrix updates: only for the blocks' hidden matrices, not the embedding/head
        hidden = [p for n, p in params if dim[n] == 2 and n.startswith("layers.")]
        if any(p.dim() != 2 for p in hidden):
            raise LMError(
                "model.optimizer muon orthogonalises whole matrices, and this strategy (FSDP) shards them: use "
                "DDP, or optimizer adamw"
            )
        hidden_ids = {id(p) for p in hidden}
        decay = [p for p in decay if id(p) not in hidden_ids]
    summary = (
        f"AdamW: {len(decay)} tensors with weight decay ({sum(p.numel() for p in decay):,} params), "
        f"{len(no_decay)} without ({sum(p.numel() for p in no_decay):,} params)"
    )
    if hidden:
        summary += f"; Muon: {len(hidden)} hidden matrices ({sum(p.numel() for p in hidden):,} params)"
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)
    if optimizer != "muon":
        return adamw, summary
    muon_optimizer = Muon(
        hidden, **{"lr": lr, **(muon or {})}, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    return MuonWithAdamW(muon_optimizer, adamw), summary


def _closure_and_flag(optimizer, closure) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The start of a step that can be skipped: the closure's loss (None without one), and the optimizer's
    `found_inf` flag, taken off it so that it serves this step only."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    found_inf, optimizer.found_inf = optimizer.found_inf, None
    return loss, found_inf


# Matrices of one shape are stacked up to this many elements (256 MB in fp32) per batch: one batch per shape up to
# GPT-2 124M's 48 768x768 matrices, several for larger models, whose stacked copies would otherwise take gigabytes.
MUON_BATCH_ELEMENTS = 1 << 26


class Muon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):  # torch.optim.Muon: torch >= 2.9
    """torch.optim.Muon's update (same hyperparameters, defaults and state), computed for all matrices of one shape at
    once, and able to skip a step on the device.

    torch.optim.Muon orthogonalises matrix by matrix, with ~28 small ops each: GPT-2 124M's 84 hidden matrices cost
    2,408 ops a step, and its step took 38 ms more than AdamW's on an H100 (measured), which we take to be mostly
    the host launching kernels. Here the matrices of one shape are stacked and go through the iteration as one
    batch of matmuls: 3 shapes at 124M, 92 ops a step (not yet timed on a GPU). On this repository's 2-core CPU
    the step for the CPU recipe's 28 matrices takes 6-7 ms instead of 17-18 ms (benchmarks/optimizer_step.py).
    With fp32 weights the result equals torch.optim.Muon's up to the bf16 rounding inside Newton-Schulz: bit-equal
    for some shapes, for others (48 x 32; on an AMD CPU also 64 x 32) within ~0.3-0.4% of how far the step moved the
    weights, as batched bf16 matmuls may round differently. With bf16 weights ~1% of the elements differ in their
    last bits (tests/test_optim.py).

    Set `found_inf` (a 0-dim float tensor, 1.0 = skip) before `step` to skip that step, as fused AdamW does. On a GPU
    the flag is not read on the host: where it is set, torch.where keeps the old momentum, a zero update and no
    decay, and zeros stand in for the (non-finite) gradients. On a CPU it is read. The flag is used by one step only.
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss, found_inf = _closure_and_flag(self, closure)
        if found_inf is not None and self._host_reads_flag(found_inf):
            if found_inf:
                return loss
            found_inf = None
        self._step(found_inf)
        return loss

    def _host_reads_flag(self, found_inf: torch.Tensor) -> bool:
        """On a CPU reading the flag is free and masking is not; on a GPU reading waits for its queue to drain."""
        return found_inf.device.type == "cpu"

    @torch.no_grad()
    def _step(self, found_inf: torch.Tensor | None):
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            by_shape = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[p.shape].append(i)
            for shape, indices in by_shape.items():
                per_batch = max(1, MUON_BATCH_ELEMENTS // shape.numel())  # bounds the stacks' extra memory
                for start in range(0, len(indices), per_batch):
                    batch = indices[start : start + per_batch]
                    self._step_batch(
                        group, *[[items[i] for i in batch] for items in (params, grads, buffers)], found_inf
                    )

    def _step_batch(self, group, params, grads, buffers, found_inf):
        """One step for matrices of one shape, as one batch. With a flag, the results are selected (torch.where)
        rather than scaled by it: the hyperparameters stay Python numbers, as in torch.optim.Muon, so bf16 weights
        get the same rounding."""
        rows, cols = params[0].shape
        momentum, lr = group["momentum"], float(group["lr"])
        skip = None if found_inf is None else found_inf.bool()
        grad, buffer = torch.stack(grads), torch.stack(buffers)
        if skip is None:
            buffer.lerp_(grad, 1 - momentum)
        else:
            grad = torch.where(skip, 0.0, grad)  # non-finite gradients would make NaNs below, even where unused
            buffer = torch.where(skip, buffer, buffer.lerp(grad, 1 - momentum))
        torch._foreach_copy_(buffers, list(buffer))
        update = grad.lerp_(buffer, momentum) if group["nesterov"] else buffer
        update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        if group["adjust_lr_fn"] == "match_rms_adamw":
            adjusted_lr = lr * 0.2 * max(rows, cols) ** 0.5
        elif group["adjust_lr_fn"] in (None, "original"):
            adjusted_lr = lr * max(1, rows / cols) ** 0.5
        else:
            adjusted_lr = lr
        # Decoupled decay with the plain lr. The factor is an fp32 tensor: a Python number would be rounded to bf16
        # for bf16 weights by the multi-tensor op on a CPU (1 - 2e-3 -> 0.996). torch.full fills it on the device,
        # with no copy from the host.
        decay = torch.full((), 1 - lr * group["weight_decay"], dtype=torch.float32, device=grad.device)
        if skip is not None:
            decay, update = torch.where(skip, 1.0, decay), torch.where(skip, 0.0, update)
        torch._foreach_mul_(params, decay)
        torch._foreach_add_(params, list(update.to(params[0].dtype)), alpha=-adjusted_lr)


def newton_schulz(matrices: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """torch.optim.Muon's quintic Newton-Schulz iteration (in bf16) on a batch of matrices (k, m, n): each divided
    by its own Frobenius norm, then approximately orthogonalised.

    The iteration works with the smaller Gram matrix. torch.optim.Muon transposes a tall matrix to get it; here the
    tall case uses X^T X and multiplies from the right, which is the same iteration transposed, with no transposed
    copies of the batch.
    """
    a, b, c = coefficients
    tall = matrices.size(-2) > matrices.size(-1)
    x = matrices.bfloat16()
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x.mT @ x if tall else x @ x.mT
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, x, polynomial, beta=a) if tall else torch.baddbmm(x, polynomial, x, beta=a)
    return x


class _JointState(ChainMap):
    """Muon's and AdamW's per-parameter state as one live mapping. Not a plain ChainMap: a lookup there would call
    the first optimizer's defaultdict factory for the other's parameters, adding empty entries to it. A parameter
    with no state yet gets an empty entry in its own optimizer's state, as torch's defaultdict gives one."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        super().__init__(muon.state, adamw.state)
        self._owners = (muon, adamw)

    def _state_of(self, param) -> dict | None:
        """The state mapping of the optimizer that holds `param`'s state, or else owns it; None for neither."""
        for state in self.maps:
            if param in state:
                return state
        for owner in self._owners:
            if any(param is p for group in owner.param_groups for p in group["params"]):
                return owner.state
        return None

    def __getitem__(self, param):
        state = self._state_of(param)
        if state is None:
            raise KeyError(param)
        return state[param]

    def __setitem__(self, param, value):
        state = self._state_of(param)  # an owned parameter's new state goes to its own optimizer
        (self.maps[0] if state is None else state)[param] = value


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps Muon, then AdamW. Set `found_inf` (a 0-dim tensor, 1.0 = skip) before `step` to skip a step without a
    host sync: both optimizers read the flag themselves (reading it on the host would stall the host until the
    backward pass ends, and leave the GPU idle while Muon's kernels launch: +12% step time on an H100, measured with
    an earlier version that did). The flag is used by one step only.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        self.found_inf: torch.Tensor | None = None
        super().__init__([p for opt in (muon, adamw) for g in opt.param_groups for p in g["params"]], {})
        self._share_groups()

    def _share_groups(self):
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        # The state too, for code that walks optimizer.state: Lightning moves it to the device at set-up and back to
        # the CPU at teardown, and an empty state of its own left Muon's and AdamW's buffers on the GPU.
        self.state = _JointState(self.muon, self.adamw)

    @torch.no_grad()
    def step(self, closure=None):
        loss, found_inf = _closure_and_flag(self, closure)
        for optimizer in (self.muon, self.adamw):  # fused AdamW skips on the device too; None: they step
            optimizer.found_inf = found_inf
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._share_groups()  # loading replaced the inner group dicts
