"""Muon for the Transformer's hidden matrices, AdamW for everything else, as one optimizer.

Lightning's automatic optimization drives a single optimizer, so the two are wrapped: one `step`, one `zero_grad`,
one `state_dict`, and `param_groups` that are the two optimizers' own group dicts, so the LR schedule (LambdaLR)
and gradient clipping see every parameter. Muon uses `adjust_lr_fn="match_rms_adamw"`, which scales its
orthogonalised update to AdamW's typical RMS, so one learning rate and weight decay serve both (Moonlight's recipe).
"""

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
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
        self.muon.step()
        self.adamw.step()
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
