"""lm.optim.Muon against torch.optim.Muon, whose update it batches by shape."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lm.optim import Muon
from tests.conftest import needs_muon

# square, wide, tall (X^T X in Newton-Schulz), and repeats of each, as a Transformer's blocks have
SHAPES = [(48, 48), (32, 64), (64, 32), (48, 48), (32, 64), (64, 32), (16, 80)]


def run_both(steps: int, dtype=torch.float32, shapes=SHAPES, **hyper):
    torch.manual_seed(0)
    start = [torch.randn(shape).to(dtype) for shape in shapes]
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    their_opt, our_opt = torch.optim.Muon(theirs, **hyper), Muon(ours, **hyper)
    for _ in range(steps):
        for a, b in zip(theirs, ours, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        their_opt.step()
        our_opt.step()
    return start, (theirs, their_opt), (ours, our_opt)


@needs_muon
@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original", None])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("momentum", [0.95, 0.0])
def test_muon_matches_torch_muon(adjust_lr_fn, nesterov, momentum):
    """Same momentum, and the same weights up to Newton-Schulz's bf16 rounding after five steps: within 1% of how
    far the steps moved them (a wrong LR adjustment or orientation gives ~30%). Bit-equal for these shapes on the
    CPUs of earlier runs; on an AMD EPYC the batched bf16 matmuls of one tall (64 x 32) matrix round differently,
    0.34% of its move without Nesterov (0.42% after the first step), bit-equal everywhere else."""
    start, (theirs, their_opt), (ours, our_opt) = run_both(
        5, lr=1e-2, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn, nesterov=nesterov, momentum=momentum
    )
    for p0, a, b in zip(start, theirs, ours, strict=True):
        assert (a - b).abs().max() <= 1e-2 * (a - p0).abs().max()
        torch.testing.assert_close(our_opt.state[b]["momentum_buffer"], their_opt.state[a]["momentum_buffer"])


@needs_muon
@pytest.mark.parametrize("steps", [1, 2])
def test_muon_matches_torch_muon_up_to_bf16_rounding_where_shapes_round_differently(steps):
    """fp32 weights, shapes whose batched bf16 Newton-Schulz rounds unlike torch's one matrix at a time (two 48 x 32
    matrices: ~0.25% of the move), still within 1% of how far the steps moved the weights (a wrong LR adjustment
    or orientation gives ~30%)."""
    start, (theirs, _), (ours, _) = run_both(steps, shapes=[(48, 32), (48, 32)], lr=1e-2, weight_decay=0.1)
    for p0, a, b in zip(start, theirs, ours, strict=True):
        assert (a - b).abs().max() <= 1e-2 * (a - p0).abs().max()


@needs_muon
@pytest.mark.parametrize("lr", [1e-2, 2e-2])
def test_muon_matches_torch_muon_on_bf16_weights(lr):
    """bf16 weights (precision bf16-true): all but ~1% of the elements are bit-equal after five steps; the rest
    differ in the last bits, where batched matmuls sum in another order. A decay factor rounded to bf16
    (1 - 2e-3 -> 0.996) changed ~99% of them at lr 2e-2."""
    start, (theirs, _), (ours, _) = run_both(5, dtype=torch.bfloat16, lr=lr, weight_decay=0.1)
    differ = sum((a != b).sum().item() for a, b in zip(theirs, ours, strict=True))
    moved = sum((a != p0).sum().item() for a, p0 in zip(theirs, start, strict=True))
    total = sum(p.numel() for p in start)
    assert moved > 0.4 * total and differ < 0.02 * total


@needs_muon
def test_muon_batches_newton_schulz_by_shape():
    """One batch of matmuls per distinct shape, not per matrix: 4 shapes x 5 iterations x 3 matmuls."""
    params = [torch.randn(shape, requires_grad=True) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = Muon(params, ns_steps=5)

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (
                torch.ops.aten.mm,
                torch.ops.aten.bmm,
                torch.ops.aten.addmm,
                torch.ops.aten.baddbmm,
            ):
                CountMatmuls.count += 1
            return func(*args, **(kwargs or {}))

    with CountMatmuls():
        optimizer.step()
    assert CountMatmuls.count == len(set(SHAPES)) * 5 * 3


@needs_muon
def test_muon_splits_a_large_shape_into_bounded_batches(monkeypatch):
    """Stacks stay under MUON_BATCH_ELEMENTS: with room for two 48x48 matrices, the three of them take two batches
    (and the same numbers as one batch)."""
    import lm.optim

    batch_sizes = []
    step_batch = Muon._step_batch

    def recorded(self, group, params, *rest):
        batch_sizes.append(len(params))
        return step_batch(self, group, params, *rest)

    monkeypatch.setattr(Muon, "_step_batch", recorded)
    torch.manual_seed(0)
    start, grads = [torch.randn(48, 48) for _ in range(3)], [torch.randn(48, 48) for _ in range(3)]
    results = []
    for limit in (lm.optim.MUON_BATCH_ELEMENTS, 2 * 48 * 48):
        monkeypatch.setattr(lm.optim, "MUON_BATCH_ELEMENTS", limit)
        params = [p.clone().requires_grad_() for p in start]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        batch_sizes.clear()
        Muon(params, lr=1e-2).step()
        results.append(([p.detach() for p in params], list(batch_sizes)))
    (one_batch, sizes_one), (two_batches, sizes_two) = results
    assert sizes_one == [3] and sizes_two == [2, 1]
    for a, b in zip(one_batch, two_batches, strict=True):
        torch.testing.assert_close(a, b)


@needs_muon
def test_muon_state_loads_into_torch_muon_and_back():
    """Checkpoints written with torch.optim.Muon (and by it) load either way: same state layout."""
    _, (theirs, their_opt), (ours, our_opt) = run_both(2, lr=1e-2)
    loaded = Muon(ours)
    loaded.load_state_dict(their_opt.state_dict())
    torch.testing.assert_close(loaded.state_dict(), their_opt.state_dict())
    back = torch.optim.Muon(theirs)
    back.load_state_dict(our_opt.state_dict())
    torch.testing.assert_close(back.state_dict(), our_opt.state_dict())


@needs_muon
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("on_device", [False, True])
def test_muon_skips_a_flagged_step_and_takes_an_unflagged_one(on_device, dtype):
    """found_inf = 1 (NaN gradients) leaves weights and momentum exactly as they were; found_inf = 0 steps exactly as
    without a flag, bf16 weights included. A CPU flag is read on the host; a GPU's is not, and its path runs here
    too, with reading the flag made to fail."""

    def step_with_flag(optimizer, flag: float):
        if not on_device:
            optimizer.found_inf = torch.tensor(flag)
            return optimizer.step()
        host_reads = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "__float__")}
        for name in host_reads:
            setattr(torch.Tensor, name, None)
        try:
            optimizer._step(torch.tensor(flag))
        finally:
            for name, method in host_reads.items():
                setattr(torch.Tensor, name, method)

    torch.manual_seed(0)
    params = [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in SHAPES]
    optimizer = Muon(params, lr=2e-2, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # momentum exists from here on
    before = [p.detach().clone() for p in params]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    step_with_flag(optimizer, 1.0)
    assert on_device or optimizer.found_inf is None  # one step only
    for p, old, old_momentum in zip(params, before, momentum, strict=True):
        assert torch.equal(p, old) and torch.equal(optimizer.state[p]["momentum_buffer"], old_momentum)

    grads = [torch.randn_like(p) for p in params]
    twin = [p.detach().clone().requires_grad_() for p in params]
    twin_optimizer = Muon(twin, lr=2e-2, weight_decay=0.1)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # loading would share the buffers
    for p, q, g in zip(params, twin, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    step_with_flag(optimizer, 0.0)
    twin_optimizer.step()
    for p, q, old in zip(params, twin, before, strict=True):
        assert torch.equal(p, q) and not torch.equal(p, old)


def test_muon_on_a_torch_without_it_is_a_one_line_error(monkeypatch):
    """torch < 2.9 has no torch.optim.Muon: lm still imports (in a fresh process, where lm.optim is first imported
    without it) and trains with AdamW; asking for Muon says what to do."""
    import subprocess
    import sys

    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; vars(torch.optim).pop('Muon', None); import lm.optim, lm.module, lm.__main__",
        ],
        capture_output=True,
        text=True,
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    from lm.errors import LMError
    from lm.optim import build_optimizer

    model = torch.nn.Linear(4, 4)
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(LMError, match=r"needs torch >= 2.9"):
        build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95))
    optimizer, _ = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)


@needs_muon
def test_muon_with_adamw_shows_its_state_to_code_that_walks_optimizer_state():
    """Lightning moves optimizer.state to the device at set-up and to the CPU at teardown: the wrapper's own state
    was empty, so Muon's and AdamW's buffers stayed where they were."""
    from lm.config import get_config
    from lm.module import LanguageModel

    module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=20, optimizer="muon")
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    ids = torch.randint(0, 64, (2, 16))
    module.model_step({"input_ids": ids, "labels": ids})[0].backward()
    optimizer.step()

    def walked():
        return {id(p) for p in optimizer.state}, {id(p) for opt in (optimizer.muon, optimizer.adamw) for p in opt.state}

    ours, inner = walked()
    assert ours == inner and len(ours) == sum(1 for _ in module.model.parameters())
    for state in optimizer.state.values():  # what Lightning's _optimizer_to_device does, in place
        for key in state:
            state[key] = state[key].clone() if key != "step" else state[key]
    for state in optimizer.state.values():
        for value in state.values():
            value.fill_(7.0)
    inner_values = [v for opt in (optimizer.muon, optimizer.adamw) for st in opt.state.values() for v in st.values()]
    assert all((v == 7.0).all() for v in inner_values)  # every inner buffer reached, AdamW's step counts too
    assert walked()[0] == inner  # and no entries added to either optimizer by the lookups
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    ours, inner = walked()
    assert ours == inner and ours  # still the inner optimizers' state after loading


@needs_muon
def test_muon_with_adamw_state_of_a_parameter_without_state_is_its_own_optimizer_s():
    """optimizer.state[p] for a parameter not stepped yet: an empty entry, as torch's defaultdict gives, in the
    optimizer that owns p (not a KeyError, and not an entry in the other optimizer)."""
    from lm.config import get_config
    from lm.module import LanguageModel

    module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=20, optimizer="muon")
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    embedding, hidden = module.model.embed_tokens.weight, module.model.layers[0].attn.q_proj.weight
    assert optimizer.state[embedding] == {} and optimizer.state[hidden] == {}
    assert embedding in optimizer.adamw.state and embedding not in optimizer.muon.state
    assert hidden in optimizer.muon.state and hidden not in optimizer.adamw.state
    with pytest.raises(KeyError):
        optimizer.state[torch.nn.Parameter(torch.zeros(2))]  # not one of its parameters
    # setting a state (as Lightning's device moves do) puts it in the owner's optimizer too
    head_norm = module.model.norm.weight
    optimizer.state[head_norm] = {"step": torch.tensor(0.0)}
    assert head_norm in optimizer.adamw.state and head_norm not in optimizer.muon.state
