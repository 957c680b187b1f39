"""Muon for the Transformer's hidden matrices, AdamW for everything else, as one optimizer.

Lightning's automatic optimization drives a single optimizer, so the two are wrapped: one `step`, one `zero_grad`,
one `state_dict`, and `param_groups` that are the two optimizers' own group dicts, so the LR schedule (LambdaLR)
and gradient clipping see every parameter. Muon uses `adjust_lr_fn="match_rms_adamw"`, which scales its
orthogonalised update to AdamW's typical RMS, so one learning rate and weight decay serve both (Moonlight's recipe).
"""

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
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer LanguageModel trains with (the throughput benchmark's raw loop builds the same one), and a line
    that says how the parameters were split.

    2-D matmul weights decay; norm gains and the embedding table (also the head when tied) do not. With "muon", the
    blocks' hidden matrices go to Muon and everything else to AdamW. AdamW is fused: one kernel for all tensors (CUDA
    and CPU), and it can skip a non-finite step on the device.

    dims: each parameter's number of dimensions in the unwrapped model, by plain name. FSDP hands the optimizer
    flat 1-D shards, which would otherwise all land in the no-decay group; Muon cannot take shards at all.
    """
    params = [(plain_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    dim = {n: (dims or {}).get(n, p.dim()) for n, p in params}
    decay, no_decay = [], []
    for n, p in params:
        (decay if dim[n] >= 2 and "embed_tokens" not in n else no_decay).append(p)
    hidden = []
    if optimizer == "muon":
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
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(muon, adamw), summary


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps Muon, then AdamW. Set `found_inf` (a 0-dim tensor, 1.0 = skip) before `step` to skip a step without a
    host sync, as fused AdamW does: AdamW reads the flag itself. On a GPU, Muon steps anyway and its parameters and
    momentum buffers are then put back where the flag is set: a copy of the hidden matrices and their momentum per
    step, ~5 GB of memory traffic for GPT-2 124M, where reading the flag would stall the host until the backward pass
    ends and leave the GPU idle while Muon's many kernels launch (+12% step time on an H100, measured). On a CPU the
    flag is read. The flag is used by one step only.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        self.found_inf: torch.Tensor | None = None
        super().__init__([p for opt in (muon, adamw) for g in opt.param_groups for p in g["params"]], {})
        self._share_groups()

    def _share_groups(self):
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf, self.found_inf = self.found_inf, None
        if found_inf is None:
            self.muon.step()
        elif found_inf.device.type == "cpu":  # reading the flag is free here, and copying the matrices is not
            if not found_inf:
                self.muon.step()
        else:
            self._muon_step_unless(found_inf.bool())
        self.adamw.found_inf = found_inf  # fused AdamW skips on the device where it is set; None: it steps
        self.adamw.step()
        return loss

    @torch.no_grad()
    def _muon_step_unless(self, skip: torch.Tensor):
        params = [p for g in self.muon.param_groups for p in g["params"] if p.grad is not None]
        before = [p.clone() for p in params]
        buffers = [self.muon.state[p].get("momentum_buffer") for p in params]
        buffers = [b.clone() if b is not None else None for b in buffers]  # None: created by this step, from zeros
        self.muon.step()
        for p, old, old_buffer in zip(params, before, buffers, strict=True):
            p.copy_(torch.where(skip, old, p))
            buffer = self.muon.state[p]["momentum_buffer"]
            buffer.copy_(torch.where(skip, 0.0 if old_buffer is None else old_buffer, buffer))

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._share_groups()  # loading replaced the inner group dicts
