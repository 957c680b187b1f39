import re
import warnings

import lightning as L
import pytest
import torch

from lm.config import get_config
from lm.errors import LMError
from lm.module import IGNORE_INDEX, LanguageModel, chunked_cross_entropy, lr_multiplier, next_token_loss
from tests.conftest import OPTIMIZERS, MemoryLogger, needs_cpu_fp8, needs_muon


def schedule(step, name, **kw):
    args = dict(schedule=name, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) | kw
    return lr_multiplier(step, **args)


def test_warmup_is_linear_from_one_step():
    assert schedule(0, "cosine") == pytest.approx(0.1)
    assert schedule(4, "cosine") == pytest.approx(0.5)
    assert schedule(9, "cosine") == pytest.approx(1.0)


def test_cosine_reaches_min_at_total_and_stays():
    assert schedule(10, "cosine") == pytest.approx(1.0)
    assert schedule(60, "cosine") == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert schedule(110, "cosine") == pytest.approx(0.1)
    assert schedule(500, "cosine") == pytest.approx(0.1)
    values = [schedule(s, "cosine") for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_is_flat_then_linear_decay():
    # decay over the last 20% of 110 steps: from step 88
    assert schedule(50, "wsd") == 1.0
    assert schedule(88, "wsd") == 1.0
    assert schedule(99, "wsd") == pytest.approx(1 - 0.9 * 11 / 22)
    assert schedule(110, "wsd") == pytest.approx(0.1)


def test_constant_after_warmup():
    assert schedule(5, "constant") == pytest.approx(0.6)
    assert schedule(1000, "constant") == 1.0


def test_a_schedule_that_ends_within_warmup_stays_at_its_minimum_after():
    """decay_steps <= warmup_steps: the schedule is over when warmup ends (it used to stay at the peak LR forever)."""
    for name in ("cosine", "wsd"):
        assert schedule(4, name, total_steps=10) == pytest.approx(0.5)  # still warming up
        assert schedule(10, name, total_steps=10) == schedule(50, name, total_steps=8) == pytest.approx(0.1)
    assert schedule(50, "constant", total_steps=8) == 1.0


def test_wsd_decays_over_the_rounded_fraction():
    # 0.7 x 90 = 62.99999...: 63 decay steps from step 27, not 62 from step 28
    args = dict(warmup_steps=0, total_steps=90, min_lr_ratio=0.0, decay_fraction=0.7)
    assert lr_multiplier(26, schedule="wsd", **args) == 1.0 and lr_multiplier(27, schedule="wsd", **args) == 1.0
    assert lr_multiplier(28, schedule="wsd", **args) == pytest.approx(1 - 1 / 63)


def test_a_wsd_schedule_with_no_decay_window_is_at_its_minimum_from_its_end():
    """decay_fraction 0 (or one that rounds to no step): flat at the peak, then min_lr_ratio from total_steps on, as
    every schedule is; step total_steps was still at the peak, one step past the end of the schedule."""
    for fraction in (0.0, 0.02):  # 0.02 x 20 = 0.4 steps, rounded to none
        values = [schedule(s, "wsd", total_steps=20, decay_fraction=fraction) for s in range(10, 23)]
        assert values[:10] == [1.0] * 10  # steps 10-19
        assert values[10:] == [pytest.approx(0.1)] * 3  # steps 20-22


def test_a_wsd_decay_window_that_reaches_into_warmup_starts_where_warmup_ends():
    """Warmup 100 of 300 steps with decay_fraction 0.8 (from step 60): the LR went 0.99, 1.0, then 0.85 at step 100."""
    args = dict(warmup_steps=100, total_steps=300, min_lr_ratio=0.1, decay_fraction=0.8)
    values = [lr_multiplier(s, schedule="wsd", **args) for s in range(300)]
    assert values[99] == values[100] == 1.0
    assert values[200] == pytest.approx(1 - 0.9 * 100 / 200)  # linear over the 200 steps after warmup
    assert all(a >= b for a, b in zip(values[99:], values[100:], strict=False))
    assert lr_multiplier(300, schedule="wsd", **args) == pytest.approx(0.1)


def _tiny_batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, 64, (2, 16), generator=g)), "labels": ids} for _ in range(n)]


class _UnsizedBatches(torch.utils.data.IterableDataset):
    """Batches with no len(): Lightning cannot count an epoch's steps, and gives max_steps (-1) as the run's."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(_tiny_batches(self.n))


class _StopAfterOneStep(L.Callback):
    """Keeps a run without a length from going on for ever, should it start."""

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = True


def _fit_tiny(module: LanguageModel, batches, **trainer_kwargs) -> L.Trainer:
    """A fit of `module` on `batches` (one dict per step) on the CPU, quiet: no logger, checkpoints, progress bar,
    model summary or validation unless trainer_kwargs ask for them."""
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(**{"accelerator": "cpu", **quiet, "limit_val_batches": 0, **trainer_kwargs})
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


@pytest.mark.parametrize(
    ("schedule", "run", "batches"),
    [
        ("cosine", {"max_time": "00:00:00:30"}, _tiny_batches(4)),  # Lightning: max_epochs -1, no length
        ("wsd", {"max_epochs": -1}, _tiny_batches(4)),
        ("cosine", {"max_epochs": 1}, _UnsizedBatches(4)),  # Lightning: a length of -1
    ],
    ids=["max_time", "max_epochs-1", "unsized-loader"],
)
def test_a_decaying_schedule_without_a_run_length_is_refused(schedule, run, batches):
    """The run gives the schedule no end to decay towards: it trained at a constant LR (max_time, max_epochs -1) or
    dropped to min_lr_ratio x lr right after warmup (an unsized loader), and said nothing."""
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, schedule=schedule)
    message = f"schedule {schedule} needs a length: set trainer.max_steps or model.init_args.decay_steps ("
    with pytest.raises(LMError, match=re.escape(message)):
        _fit_tiny(module, batches, callbacks=[_StopAfterOneStep()], **run)


def test_a_constant_schedule_or_an_explicit_decay_needs_no_run_length():
    constant = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, schedule="constant")
    trainer = _fit_tiny(constant, _UnsizedBatches(3), max_epochs=1)
    assert trainer.global_step == 3 and trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)
    decaying = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=5, min_lr_ratio=0.0)
    trainer = _fit_tiny(decaying, _UnsizedBatches(3), max_epochs=1)
    assert trainer.global_step == 3 and trainer.optimizers[0].param_groups[0]["lr"] < 1e-3  # decaying towards step 5


def _configured_schedule(max_steps: int, **module_kwargs):
    """The LR multiplier configure_optimizers sets up for a run of max_steps, and the warnings it gave."""
    module = LanguageModel(get_config("tiny"), lr=1e-3, **module_kwargs)
    module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    return scheduler.lr_lambdas[0], [str(w.message) for w in caught if "warmup steps" in str(w.message)]


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_a_run_that_ends_inside_warmup_is_told_the_peak_it_reaches(name):
    """It was told the LR "warms up, then stays at min_lr_ratio x lr", while the run ended warming up at 10/100 of
    the peak; a constant schedule, which never reached its peak either, was told nothing."""
    multiplier, warned = _configured_schedule(10, schedule=name, warmup_steps=100)
    assert warned == [
        "the run ends at step 10, inside the 100 warmup steps: the LR peaks at 0.1 x lr; lower "
        "model.init_args.warmup_steps"
    ]
    assert multiplier(9) == pytest.approx(0.1)  # the last step's, as said


@pytest.mark.parametrize("name", ["cosine", "wsd"])
@pytest.mark.parametrize("steps", [100, 101])
def test_a_run_that_ends_as_warmup_ends_is_told_its_schedule_never_decays(name, steps):
    """One step past warmup is no decay either: that step, the decay's first, is at the peak."""
    multiplier, warned = _configured_schedule(steps, schedule=name, warmup_steps=100)
    assert warned == [
        f"the run ends at step {steps}, as its 100 warmup steps do or one after: the {name} schedule never decays "
        "from the peak LR; lower model.init_args.warmup_steps"
    ]
    assert multiplier(steps - 1) == 1.0


def test_a_run_that_reaches_its_schedule_or_trains_nothing_is_not_warned():
    """max_steps 0 prepares the data (experiments/gpt2_124m.yaml): the warning was noise there."""
    assert _configured_schedule(0, warmup_steps=700)[1] == []
    assert _configured_schedule(102, warmup_steps=100)[1] == []
    assert _configured_schedule(50, schedule="constant", warmup_steps=50)[1] == []


def test_an_explicit_decay_steps_within_warmup_is_told_the_lr_stays_at_its_minimum_after():
    multiplier, warned = _configured_schedule(1000, warmup_steps=100, decay_steps=50, min_lr_ratio=0.1)
    assert warned == [
        "the cosine schedule ends at step 50, within the 100 warmup steps: the LR warms up, then stays at "
        "min_lr_ratio x lr (set model.init_args.decay_steps or warmup_steps)"
    ]
    assert multiplier(99) == 1.0 and multiplier(100) == multiplier(999) == pytest.approx(0.1)
    # a run that ends inside warmup all the same is told so
    assert _configured_schedule(10, warmup_steps=100, decay_steps=50)[1][0].startswith("the run ends at step 10, ")


def test_loss_ignores_masked_positions_and_averages_over_supervised_tokens():
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 3], [IGNORE_INDEX, IGNORE_INDEX, 4, 5]])
    loss, n = next_token_loss(logits, labels)
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert n.item() == 5
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch_in_value_and_gradient(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 50, generator=g)).to(dtype)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[[0, 5, 36]] = IGNORE_INDEX
    mine = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    # 200 elements per chunk = 4 rows: ten chunks, the last one short
    loss = chunked_cross_entropy(mine, labels, chunk_elements=200)
    expected = torch.nn.functional.cross_entropy(ref.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    (2.5 * loss).backward()
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    assert mine.grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}
    torch.testing.assert_close(mine.grad, ref.grad, **tol)
    assert mine.grad[[0, 5, 36]].abs().sum() == 0  # ignored rows get no gradient
    with torch.no_grad():  # evaluation takes the same chunks without building a gradient
        torch.testing.assert_close(chunked_cross_entropy(logits, labels, chunk_elements=200), expected.detach())


def test_chunked_cross_entropy_leaves_the_logits_alone_and_ignores_masked_rows_whatever_they_hold():
    """fp32 logits were overwritten with gradients by the in-place softmax; a masked row's NaN logits made the loss
    NaN (NaN x 0); a label of -1 trained as token 0. Now: logits intact, masked rows ignored as torch ignores them,
    an out-of-range label an error."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g)
    labels = torch.tensor([1, IGNORE_INDEX, 3, 4, IGNORE_INDEX, 9])
    logits[1] = float("nan")
    logits[4, 2] = float("-inf")
    before = logits.clone()
    mine, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = chunked_cross_entropy(mine, labels, chunk_elements=20)
    expected = torch.nn.functional.cross_entropy(ref, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    supervised = labels != IGNORE_INDEX
    torch.testing.assert_close(mine.grad[supervised], ref.grad[supervised])
    assert mine.grad[~supervised].eq(0).all()  # torch's own backward gives the NaN row NaN gradients here
    torch.testing.assert_close(mine.detach(), before, equal_nan=True)
    with pytest.raises((RuntimeError, IndexError)):
        chunked_cross_entropy(logits.clone().requires_grad_(), torch.tensor([1, -1, 3, 4, 5, 9]))


@pytest.mark.slow  # torch.compile: ~10 s of CPU
def test_compiled_loss_equals_eager_loss():
    logits = torch.randn(2, 8, 64, requires_grad=True)
    labels = torch.randint(0, 64, (2, 8))
    labels[0, :3] = IGNORE_INDEX
    eager, n = next_token_loss(logits, labels)
    compiled, n_compiled = torch.compile(next_token_loss)(logits, labels)
    torch.testing.assert_close(compiled, eager)
    assert n.item() == n_compiled.item() == 13


@pytest.mark.parametrize("clip", [0.05, 1e3], ids=["norm_above_the_clip", "norm_under_the_clip"])
def test_clipping_uses_the_step_norm_like_clip_grad_norm(clip):
    """configure_gradient_clipping reuses the norm of on_before_optimizer_step; the result equals torch's rule. Under
    the clip the factor is 1: the gradients stay the token means, as clip_grad_norm_ leaves them, not scaled up."""
    import lightning as L

    module = LanguageModel(get_config("tiny"), lr=1e-3, decay_steps=10)
    module.configure_model()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    module.trainer = trainer
    module.log = lambda *args, **kwargs: None  # hooks called by hand, outside a fit loop
    ids = torch.randint(0, 64, (2, 16))
    loss = module.training_step({"input_ids": ids, "labels": ids}, 0)
    loss.backward()
    reference = [torch.zeros_like(p) for p in module.model.parameters()]
    for ref, p in zip(reference, module.model.parameters(), strict=True):
        ref.grad = p.grad / 32  # the step's 32 supervised tokens
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, clip)
    assert (expected_norm.item() > clip) == (clip < 1)  # each case is the side of the clip its id says
    optimizer = module.configure_optimizers()["optimizer"]
    module.on_before_optimizer_step(optimizer)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
    torch.testing.assert_close(module._grad_norm, expected_norm)
    for p, ref in zip(module.model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, ref.grad)
    assert optimizer.found_inf.item() == 0.0  # fused AdamW: a finite step is taken


def test_a_step_with_fewer_supervised_tokens_than_ranks_is_still_the_mean_over_them(monkeypatch):
    """Under DDP the step's token count was averaged over the ranks before the clamp that keeps a step with none from
    dividing by 0: 1 supervised token on one of 2 ranks averaged 0.5, was taken for 1, and the gradient, grad_norm and
    train/loss came out half the token's. Two ranks in one process: rank 1 holds no supervised token, so the
    all-reduce adds nothing to this rank's sums, and DDP's average halves this rank's gradients."""
    module = LanguageModel(get_config("tiny"), lr=1e-3, decay_steps=10)
    module.configure_model()
    module.trainer = L.Trainer(
        accelerator="cpu", log_every_n_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: float(value)})  # hooks called by hand
    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))
    monkeypatch.setattr("lm.module.sum_over_ranks", lambda tensor: tensor)  # plus rank 1's zeros
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -1] = 5  # the step's one supervised token
    expected_loss, _ = next_token_loss(module.model(ids), labels)
    module.training_step({"input_ids": ids, "labels": labels}, 0).backward()
    reference = [p.grad.clone() for p in module.model.parameters()]  # of one token: its sum is its mean
    for p in module.model.parameters():
        p.grad /= 2  # DDP's average with rank 1's zero gradients
    optimizer = module.configure_optimizers()["optimizer"]
    module.on_before_optimizer_step(optimizer)
    module.configure_gradient_clipping(optimizer)
    for p, ref in zip(module.model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, ref)
    assert logged["train/loss"] == pytest.approx(expected_loss.item(), rel=1e-6)
    expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in reference]))
    assert logged["train/grad_norm"] == pytest.approx(expected_norm.item(), rel=1e-5)


@needs_muon
def test_clipping_flags_a_non_finite_muon_step_for_the_optimizer_to_skip_without_a_host_read():
    import lightning as L

    module = LanguageModel(get_config("tiny"), lr=1e-3, decay_steps=10, optimizer="muon")
    module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    module.log = lambda *args, **kwargs: None  # hooks called by hand, outside a fit loop
    ids = torch.randint(0, 64, (2, 16))
    module.training_step({"input_ids": ids, "labels": ids}, 0).backward()
    next(module.model.parameters()).grad.fill_(float("inf"))
    optimizer = module.configure_optimizers()["optimizer"]
    module.on_before_optimizer_step(optimizer)
    with pytest.warns(UserWarning, match="non-finite loss or gradient at step 1"):  # counted at once on a CPU
        module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert optimizer.found_inf.item() == 1.0  # the flag for the step, where grads were dropped after a host read
    assert all(p.grad is not None for p in module.model.parameters())


def test_optimizer_groups_decay_only_matmul_weights():
    module = LanguageModel(get_config("tiny"), lr=1e-3, weight_decay=0.1, decay_steps=100)
    module.configure_model()
    opt = module.configure_optimizers()["optimizer"]
    by_id = {id(p): name for name, p in module.model.named_parameters()}
    decay = {by_id[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {by_id[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert {"embed_tokens.weight", "norm.weight", "layers.0.attn_norm.weight"} <= no_decay
    assert {"layers.0.attn.q_proj.weight", "layers.1.mlp.down_proj.weight", "lm_head.weight"} <= decay
    assert decay.isdisjoint(no_decay) and len(decay) + len(no_decay) == len(by_id)


def _fit_two_steps(
    batches, *, accumulate: int = 1, precision: str = "32-true", prepare=None, **module_kwargs
) -> LanguageModel:
    """The tiny model after two optimizer steps of the Trainer on `batches` (clip 1.0, constant LR after 1 step);
    prepare(module), if given, runs on the built module before the fit."""

    torch.manual_seed(0)
    module = LanguageModel(
        get_config("tiny"), lr=1e-2, warmup_steps=1, schedule="constant", decay_steps=10, **module_kwargs
    )
    if prepare is not None:
        prepare(module)
    _fit_tiny(
        module, batches, precision=precision, max_steps=2, accumulate_grad_batches=accumulate, gradient_clip_val=1.0
    )
    return module


def test_accumulation_equals_one_big_batch_with_uneven_masks():
    """4 micro-batches of B with different numbers of supervised tokens == one batch of 4B: the loss is the mean over
    all supervised tokens of the optimizer step, not a mean of per-micro-batch means."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (16, 16), generator=g)
    labels = torch.randint(0, 64, (16, 16), generator=g)
    for row in range(16):  # row r supervises only its last r + 1 positions
        labels[row, : 15 - row] = -100
    big = [{"input_ids": ids[i : i + 8], "labels": labels[i : i + 8]} for i in (0, 8)]
    small = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 16, 2)]
    a = _fit_two_steps(big).model.state_dict()
    b = _fit_two_steps(small, accumulate=4).model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradients_are_freed_after_each_step_not_held_through_the_next_forward():
    """Lightning's default frees the gradients inside the next step, after its forward, so two copies of memory the
    size of the gradients would be held there; lm frees them right after the optimizer step. A window's first
    micro-batch starts with no gradients, its second adds to the first's, and gradients left before the fit are
    dropped rather than added to the first step."""
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (4, 2, 16), generator=g)]

    def fit(accumulate, leftover=False):
        seen = []

        def prepare(module):
            module.configure_model()
            if leftover:
                for p in module.model.parameters():
                    p.grad = torch.full_like(p, 100.0)
            model_step = module.model_step

            def recording_model_step(batch):
                seen.append(sum(p.grad is not None for p in module.model.parameters()))
                return model_step(batch)

            module.model_step = recording_model_step

        return _fit_two_steps(batches, accumulate=accumulate, prepare=prepare), seen

    module, seen = fit(accumulate=1)
    n_params = len(list(module.model.parameters()))
    assert seen == [0, 0]
    assert all(p.grad is None for p in module.model.parameters())
    _, seen = fit(accumulate=2)
    assert seen == [0, n_params, 0, n_params]
    clean, _ = fit(accumulate=1)
    dirty, _ = fit(accumulate=1, leftover=True)
    for (name, a), b in zip(clean.model.state_dict().items(), dirty.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_a_nan_validation_batch_makes_val_loss_nan_and_the_mean_is_token_weighted():
    """torchmetrics' MeanMetric dropped a NaN batch from the mean (with a warning), so a model that fails on some
    batches showed a plausible val/loss."""
    module = LanguageModel(get_config("tiny"))
    batches = [(torch.tensor(1.0), torch.tensor(3)), (torch.tensor(5.0), torch.tensor(1)), (torch.tensor(0.0), 0)]
    module.on_validation_epoch_start()
    for loss, tokens in batches:
        module.model_step = lambda batch, loss=loss, tokens=tokens: (loss, torch.as_tensor(tokens))
        module.validation_step({}, 0)
    assert module._val_loss().item() == pytest.approx(2.0)  # (1 x 3 + 5 x 1) / 4
    for loss in (1.0, float("nan"), 3.0):
        module.model_step = lambda batch, loss=loss: (torch.tensor(loss), torch.tensor(8))
        module.validation_step({}, 0)
    assert module._val_loss().isnan()
    module.model_step = lambda batch: (torch.tensor(4.0), torch.tensor(2))
    module.validation_step({}, 0)
    assert module._val_loss().item() == 4.0  # reset after each validation


def test_val_loss_weights_each_batch_by_its_tokens_and_a_batch_without_any_changes_nothing():
    """A plain mean over batches would read 3.0 here, not 2.0: a short last batch would weigh as much as a full one.
    A batch with no supervised tokens (its loss is 0 / 1, see next_token_loss) must not pull the mean towards 0."""
    module = LanguageModel(get_config("tiny"))

    def val_loss(batches):
        module.on_validation_epoch_start()
        for loss, tokens in batches:
            module.model_step = lambda batch, loss=loss, tokens=tokens: (torch.tensor(loss), torch.tensor(tokens))
            module.validation_step({}, 0)
        return module._val_loss().item()

    assert val_loss([(1.0, 3), (5.0, 1)]) == pytest.approx(2.0)  # (1 x 3 + 5 x 1) / 4; unweighted (1 + 5) / 2 = 3
    assert val_loss([(1.0, 3), (0.0, 0), (5.0, 1)]) == pytest.approx(2.0)

    # a real batch without labels (a rank's padding windows) through the real loss changes nothing either
    torch.manual_seed(0)
    real = LanguageModel(get_config("tiny"))
    real.configure_model()
    ids = torch.randint(0, 64, (2, 16))
    real.on_validation_epoch_start()
    real.validation_step({"input_ids": ids, "labels": ids}, 0)
    alone = real._val_loss().item()
    real.on_validation_epoch_start()
    real.validation_step({"input_ids": ids, "labels": ids}, 0)
    real.validation_step({"input_ids": ids, "labels": torch.full_like(ids, -100)}, 1)
    assert alone == alone and real._val_loss().item() == pytest.approx(alone)  # alone == alone: not NaN


def test_log_every_n_steps_0_logs_nothing_and_does_not_crash():

    from lm.callbacks import Throughput

    logger = MemoryLogger()
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=10)
    ids = torch.randint(0, 64, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": t, "labels": t} for t in ids]
    trainer = _fit_tiny(module, batches, max_steps=3, log_every_n_steps=0, logger=logger, callbacks=[Throughput()])
    assert trainer.global_step == 3 and not any(k.startswith("train/") for m in logger.by_step().values() for k in m)


def test_under_accumulation_only_the_logging_steps_log():
    """accumulate 4, log every 2 steps: each self.log costs ~1 ms, and the micro-batches after a logging step (and
    the first three micro-batches of the run) used to log train/skipped_steps again."""

    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=10)
    calls = []
    log = module.log
    module.log = lambda name, *args, **kwargs: (calls.append((name, module.global_step)), log(name, *args, **kwargs))
    ids = torch.randint(0, 64, (16, 2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": t, "labels": t} for t in ids]
    _fit_tiny(module, batches, max_steps=4, accumulate_grad_batches=4, log_every_n_steps=2, logger=MemoryLogger())
    assert [step for name, step in calls if name == "train/skipped_steps"] == [2, 4]  # after steps 2 and 4
    assert [step for name, step in calls if name == "train/loss"] == [1, 3]  # before them


def test_a_second_fit_does_not_carry_the_first_fit_s_partial_window():
    module = LanguageModel(get_config("tiny"))
    import lightning as L

    module._step_tokens, module._step_loss_sum = torch.tensor(32), torch.tensor(5.0)
    module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    module.on_train_start()
    assert module._step_tokens is None and module._step_loss_sum is None


@needs_muon
def test_muon_option_trains_hidden_matrices_with_muon_and_the_rest_with_adamw(tmp_path):
    module = LanguageModel(get_config("tiny"), lr=3e-3, warmup_steps=1, decay_steps=20, optimizer="muon")
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in module.model.named_parameters() if p.dim() == 2 and n.startswith("layers.")}
    assert adamw == set(names.values()) - muon  # every parameter exactly once
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= adamw

    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 64, (4, 16), generator=g),
        "labels": torch.randint(0, 64, (4, 16), generator=g),
    }
    first = module.model_step(batch)[0].item()
    for _ in range(20):
        optimizer.zero_grad()
        module.model_step(batch)[0].backward()
        optimizer.step()
    assert module.model_step(batch)[0].item() < 0.6 * first  # memorising one batch: 4.17 -> 2.29
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    optimizer.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert optimizer.param_groups[0] is optimizer.muon.param_groups[0]  # the schedule still reaches Muon's groups


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no step: LRs only
@needs_muon
def test_muon_settings_reach_muon_and_the_schedule_scales_both_optimizers_alike():
    """Muon's LR, momentum, Nesterov and Newton-Schulz steps are model settings (YAML), not code."""
    module = LanguageModel(
        get_config("tiny"),
        lr=1e-3,
        warmup_steps=10,
        decay_steps=20,
        optimizer="muon",
        muon_lr=2e-2,
        muon_momentum=0.9,
        muon_nesterov=False,
        muon_ns_steps=3,
    )
    module.configure_model()
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    for group in optimizer.muon.param_groups:
        assert (group["momentum"], group["nesterov"], group["ns_steps"]) == (0.9, False, 3)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [2e-2] + [1e-3] * len(optimizer.adamw.param_groups)
    for _ in range(5):
        scheduler.step()
    muon_lr, adamw_lr = optimizer.muon.param_groups[0]["lr"], optimizer.adamw.param_groups[-1]["lr"]
    assert muon_lr == pytest.approx(20 * adamw_lr) and adamw_lr < 1e-3  # warming up, both alike
    assert optimizer.param_groups[-1] is optimizer.adamw.param_groups[-1]  # what train/lr reads

    defaults = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20, optimizer="muon")
    defaults.configure_model()
    (group,) = defaults.configure_optimizers()["optimizer"].muon.param_groups
    assert (group["initial_lr"], group["momentum"], group["nesterov"], group["ns_steps"]) == (1e-3, 0.95, True, 5)
    for bad in ({"muon_lr": 0.0}, {"muon_momentum": 1.0}, {"muon_ns_steps": 0}):
        with pytest.raises(LMError, match=f"model.init_args.{next(iter(bad))} must be"):
            LanguageModel(get_config("tiny"), optimizer="muon", **bad)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optimizer_groups_hold_when_fsdp_hands_over_flat_shards(optimizer):
    """FSDP (use_orig_params) gives configure_optimizers 1-D shards under wrapped names: the groups come from the
    shapes recorded before wrapping, not from the shards (every tensor went without weight decay), and Muon, which
    needs whole matrices, is refused in one line (it failed on an empty parameter list)."""
    from lm.model import GPT
    from lm.optim import build_optimizer

    model = GPT(get_config("tiny"))
    dims = {name: p.dim() for name, p in model.named_parameters()}
    wrapped = "_fsdp_wrapped_module."
    shards = [
        (wrapped + name.replace("layers.0.", f"layers.0.{wrapped}"), torch.nn.Parameter(p.detach().flatten()))
        for name, p in model.named_parameters()
    ]

    class Sharded(torch.nn.Module):
        def named_parameters(self, *args, **kwargs):
            return iter(shards)

    if optimizer == "muon":
        with pytest.raises(LMError, match="muon orthogonalises whole matrices.*FSDP"):
            build_optimizer(Sharded(), "muon", 1e-3, 0.1, (0.9, 0.95), dims)
        return
    adamw, _ = build_optimizer(Sharded(), "adamw", 1e-3, 0.1, (0.9, 0.95), dims)
    unwrapped, _ = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95))
    position = {id(shard): i for i, (_, shard) in enumerate(shards)}
    original = {id(p): i for i, p in enumerate(model.parameters())}
    for sharded_group, group in zip(adamw.param_groups, unwrapped.param_groups, strict=True):
        assert [position[id(p)] for p in sharded_group["params"]] == [original[id(p)] for p in group["params"]]
    assert adamw.param_groups[0]["weight_decay"] == 0.1 and len(adamw.param_groups[0]["params"]) > 0


@needs_muon
def test_muon_with_adamw_skips_a_flagged_step_and_takes_an_unflagged_one():
    """found_inf = 1 leaves every weight and both optimizers' state as they were; found_inf = 0 is an ordinary
    step."""
    import copy

    def module_after_one_step():
        torch.manual_seed(0)
        module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=20, optimizer="muon")
        module.configure_model()
        optimizer = module.configure_optimizers()["optimizer"]
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "labels": ids}
        module.model_step(batch)[0].backward()
        optimizer.step()  # the momentum buffers exist from here on
        module.model_step(batch)[0].backward()
        return module, optimizer

    module, optimizer = module_after_one_step()
    weights, state = copy.deepcopy(module.model.state_dict()), copy.deepcopy(optimizer.state_dict())
    next(module.model.layers[0].parameters()).grad.fill_(float("nan"))
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()  # Muon reads this CPU flag (tests/test_optim.py runs its GPU path); fused AdamW skips by itself
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for inner in ("muon", "adamw"):  # momentum buffers; AdamW's moments and step counts
        torch.testing.assert_close(optimizer.state_dict()[inner]["state"], state[inner]["state"], rtol=0, atol=0)
    assert optimizer.found_inf is None and optimizer.muon.found_inf is None  # used by that step only

    flagged, flagged_optimizer = module_after_one_step()
    flagged_optimizer.found_inf = torch.tensor(0.0)
    flagged_optimizer.step()
    plain, plain_optimizer = module_after_one_step()
    plain_optimizer.step()
    for name, value in plain.model.state_dict().items():
        assert not torch.equal(value, weights[name]) or "norm" in name, name  # the step moved the weights
        torch.testing.assert_close(flagged.model.state_dict()[name], value, rtol=0, atol=0)


def test_training_logs_only_at_logging_steps_and_reads_nothing_off_the_device_in_between():
    """No host sync and no Lightning logging overhead per step. Lightning turns every progress-bar value into a Python
    number after every batch and copies logged Python floats to the device; each `self.log` costs ~1 ms of Python.
    So training logs tensors, only on the steps whose metrics reach the logger (every 4th here), and the progress bar
    gets a CPU copy of the loss. The logger still receives every training metric at each of those steps."""
    import lightning as L

    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=10)
    logged = []
    log = module.log

    def recording_log(name, value, **kwargs):
        logged.append((module.global_step, name, value, kwargs.get("prog_bar", False)))
        log(name, value, **kwargs)

    module.log = recording_log
    ids = torch.randint(0, 64, (12, 2, 16))
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=12,
        log_every_n_steps=4,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batches = [{"input_ids": x, "labels": x} for x in ids]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert all(isinstance(value, torch.Tensor) for _, _, value, _ in logged)
    # the 4th, 8th and 12th optimizer steps (global_step counts them after the optimizer step)
    assert {step for step, name, _, _ in logged if name in ("train/loss", "train/grad_norm", "train/lr")} == {3, 7, 11}
    assert {step for step, name, _, _ in logged if name == "train/skipped_steps"} == {4, 8, 12}
    progress_bar = [(name, value) for _, name, value, prog_bar in logged if prog_bar]
    assert [name for name, _ in progress_bar] == ["loss"] * 3
    assert all(value.device.type == "cpu" for _, value in progress_bar)
    steps = [(step, metrics) for step, metrics in logger.calls if "train/loss" in metrics]
    assert [step for step, _ in steps] == [3, 7, 11]
    for _, metrics in steps:
        assert {"train/loss", "train/grad_norm", "train/lr", "train/skipped_steps"} <= set(metrics)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_on_cuda_no_step_reads_the_device_on_the_host_except_at_logging_steps(optimizer, monkeypatch):
    """The CUDA path of a training step, run on CPU with every host read of a tensor (.item(), bool(), float(),
    int(), .tolist()) made to fail between the start and end of each non-logging step: a read there waits for the
    GPU's queue to drain. A NaN loss at step 5, skipped on the device, is counted at the logging step after it."""
    import lightning as L

    from lm.optim import Muon

    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=10, optimizer=optimizer)
    module._host_may_read_device = module._is_logging_step  # as on CUDA
    monkeypatch.setattr(Muon, "_host_reads_flag", lambda self, found_inf: False)  # as on CUDA
    training_step = module.training_step

    def nan_at_step_5(batch, batch_idx):
        loss = training_step(batch, batch_idx)
        return loss * float("nan") if module.global_step == 5 else loss

    module.training_step = nan_at_step_5
    host_reads = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "__float__", "__int__", "tolist")}
    armed_at = []

    def refuse(name):
        def read(tensor, *args, **kwargs):
            if armed_at:
                raise AssertionError(f"Tensor.{name} at step {armed_at[0]}, which does not log")
            return host_reads[name](tensor, *args, **kwargs)

        return read

    class Arm(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not pl_module._is_logging_step():
                armed_at.append(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            armed_at.clear()

    ids = torch.randint(0, 64, (12, 2, 16))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=12,
        log_every_n_steps=4,
        logger=MemoryLogger(),
        callbacks=[Arm()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batches = [{"input_ids": x, "labels": x} for x in ids]
    for name in host_reads:
        setattr(torch.Tensor, name, refuse(name))
    try:
        with pytest.warns(UserWarning, match="non-finite loss or gradient in 1 of steps 5-8"):
            trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    finally:
        for name, method in host_reads.items():
            setattr(torch.Tensor, name, method)
    assert trainer.global_step == 12 and module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.model.parameters())  # the NaN step was skipped


@needs_cpu_fp8
@pytest.mark.filterwarnings("ignore:model.fp8 on CPU")
def test_fp8_trains_the_block_linears_in_float8_and_keeps_the_checkpoint_keys():
    """torchao's CPU path (torch's reference _scaled_mm) runs the same code as on a GPU, only slowly."""
    from torchao.float8.float8_linear import Float8Linear  # torchao comes with the dev extra (lm[fp8])

    from lm.model import GPT

    ids = torch.randint(0, 64, (2, 2, 16), generator=torch.Generator().manual_seed(0))  # 2 x 16 tokens: fp8-aligned
    batches = [{"input_ids": x, "labels": x} for x in ids]
    fp8 = _fit_two_steps(batches, precision="bf16-mixed", fp8=True)
    bf16 = _fit_two_steps(batches, precision="bf16-mixed")
    assert isinstance(fp8.model.layers[0].attn.q_proj, Float8Linear)
    assert isinstance(fp8.model.layers[1].mlp.down_proj, Float8Linear)
    assert type(fp8.model.lm_head) is torch.nn.Linear  # the head stays in bf16
    fp8_state, bf16_state = fp8.model.state_dict(), bf16.model.state_dict()
    assert {k: v.shape for k, v in fp8_state.items()} == {k: v.shape for k, v in bf16_state.items()}
    assert all(type(v) is torch.Tensor for v in fp8_state.values())  # plain tensors: generate/export read them as is
    GPT(get_config("tiny")).load_state_dict(fp8_state)  # strict
    torch.manual_seed(0)
    initial = GPT(get_config("tiny")).state_dict()  # what both runs started from
    assert not torch.equal(fp8_state["layers.0.attn.q_proj.weight"], initial["layers.0.attn.q_proj.weight"])
    # the same weights give nearly the same loss through float8 matmuls (Adam's sign-like steps make trained
    # weights a poor comparison: a tiny gradient that flips sign moves a weight by 2 x lr)
    fp8.model.load_state_dict(bf16_state)
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fp8.model_step(batch)[0], bf16.model_step(batch)[0], rtol=0.01, atol=0)


@pytest.mark.filterwarnings("ignore:model.fp8 on CPU")
def test_fp8_errors_are_one_line_and_say_what_to_do(monkeypatch):
    import sys

    from torch.torch_version import TorchVersion

    from lm.model import GPT
    from lm.module import convert_to_fp8

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.7.1"))  # torch._scaled_mm on CPU came in 2.8
    with pytest.raises(LMError, match=r"on CPU needs torch >= 2\.8 .*this is torch 2\.7\.1"):
        convert_to_fp8(GPT(get_config("tiny")), torch.device("cpu"))
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(LMError, match=r"compute capability >= 8.9.*A100.* is 8\.0: set model.fp8 false"):
        convert_to_fp8(GPT(get_config("tiny")), torch.device("cuda"))
    with pytest.raises(LMError, match=r"multiples of 16; layers\.0\.attn\.q_proj \(40 -> 40\)"):
        convert_to_fp8(GPT(get_config("tiny", n_embd=40, n_head=2)), torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if torchao were not installed
    with pytest.raises(LMError, match=r"needs torchao .*pip install 'lm\[fp8\]'"):
        convert_to_fp8(GPT(get_config("tiny")), torch.device("cpu"))


def test_fp8_refuses_a_batch_whose_token_count_is_not_a_multiple_of_16():
    """CUDA's float8 weight-gradient matmul contracts over the batch's tokens; torch's CPU kernel would not notice."""

    module = LanguageModel(get_config("tiny"), fp8=True)
    batch = {"input_ids": torch.zeros(3, 10, dtype=torch.long), "labels": torch.zeros(3, 10, dtype=torch.long)}
    with pytest.raises(LMError, match=r"batch of 3 x 10 tokens.*pad_to_multiple_of 16"):
        module.training_step(batch, 0)


def test_train_loss_is_the_token_weighted_mean_over_the_step_and_lr_is_the_one_the_step_used():
    """With gradient accumulation, train/loss covers every micro-batch of the optimizer step, weighted by supervised
    tokens (not the last micro-batch, nor a mean of means); train/lr is the LR the optimizer stepped with (Lightning
    steps the scheduler before on_train_batch_end, where the next step's LR would be read)."""
    import lightning as L

    class UsedLR(L.Callback):
        def __init__(self):
            self.lr: dict[int, float] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lr[trainer.global_step] = optimizer.param_groups[0]["lr"]

    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(6):  # 3 optimizer steps of 2 micro-batches; the second of each step supervises 2 tokens only
        ids = torch.randint(0, 64, (2, 16), generator=g)
        labels = ids.clone()
        if i % 2:
            labels[:, :15] = IGNORE_INDEX
        batches.append({"input_ids": ids, "labels": labels})
    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=3e-3, warmup_steps=3, decay_steps=10)  # a new LR at every step
    micro = []  # (loss, tokens) of each training micro-batch, in order
    model_step = module.model_step

    def recording_model_step(batch):
        loss, n_tokens = model_step(batch)
        if module.training:
            micro.append((loss.item(), n_tokens.item()))
        return loss, n_tokens

    module.model_step = recording_model_step
    used, logger = UsedLR(), MemoryLogger()
    _fit_tiny(
        module, batches, max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1, logger=logger, callbacks=[used]
    )
    received = logger.by_step()
    assert len(micro) == 6 and sorted(received) == [0, 1, 2]
    for step in range(3):
        (loss_a, n_a), (loss_b, n_b) = micro[2 * step : 2 * step + 2]
        expected = (loss_a * n_a + loss_b * n_b) / (n_a + n_b)
        metrics = received[step]
        assert metrics["train/loss"] == pytest.approx(expected, rel=1e-5), step
        assert metrics["train/lr"] == pytest.approx(used.lr[step]), step
    assert [used.lr[s] for s in range(3)] == pytest.approx([1e-3, 2e-3, 3e-3])  # warmup


def test_activation_checkpointing_trains_the_same_weights():
    """model.activation_checkpointing reaches the GPT, and two Trainer steps with it give the same weights."""
    ids = torch.randint(0, 64, (2, 2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": x, "labels": x.roll(-1, 1)} for x in ids]
    plain = _fit_two_steps(batches)
    recomputed = _fit_two_steps(batches, activation_checkpointing=True)
    assert recomputed.model.checkpoint_layers and not plain.model.checkpoint_layers
    for (name, a), b in zip(plain.model.state_dict().items(), recomputed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_resume_with_more_steps_takes_its_first_step_at_the_new_schedule_s_lr(tmp_path, optimizer):
    """The optimizer's saved LR is the old schedule's, and LambdaLR recomputes only after a step: resuming a 4-step
    run's checkpoint with max_steps 8 took step 4 at the 4-step cosine's floor, not at the 8-step cosine's LR."""
    import lightning as L

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=g)} for _ in range(8)]
    batches = [{**b, "labels": b["input_ids"]} for b in batches]

    def fit(max_steps: int, ckpt_path=None) -> dict[int, float]:
        torch.manual_seed(0)
        module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, optimizer=optimizer)
        lrs = {}

        class Record(L.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, opt):
                lrs[trainer.global_step] = [group["lr"] for group in opt.param_groups]

        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=False,
            default_root_dir=tmp_path,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[Record()],
        )
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(tmp_path / f"{max_steps}.ckpt")
        return lrs

    short, longer = fit(4), fit(8)
    resumed = fit(8, ckpt_path=tmp_path / "4.ckpt")
    assert short[3] != longer[3]  # the schedules differ by then
    assert resumed.keys() == {4, 5, 6, 7}
    for step, lrs in resumed.items():
        assert lrs == pytest.approx(longer[step]), step


def test_the_attributes_set_every_step_skip_nn_module_s_registry_and_stay_plain(monkeypatch):
    """Lightning sets `_current_fx_name` around every hook and lm keeps its step sums on the module: ~60 sets a step,
    which went through nn.Module.__setattr__'s registry checks. They bypass it now, stay plain attributes (no
    parameter, buffer or submodule), and everything else still registers as before."""
    calls = []
    module_setattr = torch.nn.Module.__setattr__

    def counting_setattr(self, name, value):
        calls.append(name)
        module_setattr(self, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", counting_setattr)
    batches = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (2, 2, 16))]
    module = _fit_two_steps(batches)
    assert not set(calls) & LanguageModel._PLAIN_STEP_ATTRIBUTES
    assert module._current_fx_name is None and module._step_values is None
    registered = set(dict(module.named_parameters(recurse=False))) | set(dict(module.named_buffers(recurse=False)))
    assert not (registered | set(module._modules)) & LanguageModel._PLAIN_STEP_ATTRIBUTES
    module.extra_weight = torch.nn.Parameter(torch.zeros(2))
    module.extra_layer = torch.nn.Linear(2, 2)
    assert "extra_weight" in module._parameters and "extra_layer" in module._modules
