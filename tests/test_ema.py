"""lm.callbacks.EMA: the average is the EMA of the live weights, validation and checkpoints read it, resume keeps it."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

from lm.callbacks import EMA
from lm.checkpoint import gpt_state_dict, read_checkpoint
from lm.config import get_config
from lm.errors import LMError
from lm.module import LanguageModel
from lm.reliability import Checkpoint

DECAY, START = 0.5, 1  # a short horizon, so six steps move the average far from the live weights


class Record(L.Callback):
    """The live weights after every optimizer step, and the weights validation ran with."""

    def __init__(self, fail_in_validation_at: int | None = None):
        self.fail_in_validation_at = fail_in_validation_at  # raise in the middle of the validation at this step
        self.before_step: list[dict[str, torch.Tensor]] = []
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.validated: dict[str, torch.Tensor] | None = None
        self.validation_epoch_end: dict[str, torch.Tensor] | None = None  # what samples and evaluations see

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before_step.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.validated = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        if trainer.global_step == self.fail_in_validation_at:
            raise RuntimeError("crash during validation")

    def on_validation_epoch_end(self, trainer, pl_module):
        self.validation_epoch_end = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def fit(
    root,
    max_steps,
    ckpt_path=None,
    start=START,
    checkpoint=None,
    record=None,
    precision="32-true",
    extra=(),
    evals_first=False,
):
    """Train the tiny model on one repeated batch with EMA; `checkpoint` defaults to saving last.ckpt every step."""
    g = torch.Generator().manual_seed(0)
    # One batch repeated: a run resumed mid-epoch sees exactly the batches the uninterrupted run saw.
    batch = {
        "input_ids": torch.randint(0, 64, (4, 16), generator=g),
        "labels": torch.randint(0, 64, (4, 16), generator=g),
    }
    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, schedule="constant", decay_steps=10)
    record = record or Record()
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=max_steps,
        val_check_interval=3,
        num_sanity_val_steps=0,
        callbacks=[*extra, EMA(decay=DECAY, update_starting_at_step=start), record]
        if evals_first
        else [EMA(decay=DECAY, update_starting_at_step=start), record, *extra],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    every_step = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer.callbacks.append(checkpoint or every_step)
    loader = torch.utils.data.DataLoader([batch] * 8, batch_size=None)
    trainer.fit(
        module,
        train_dataloaders=loader,
        val_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None),
        ckpt_path=ckpt_path,
    )
    return module, record


def test_average_is_the_ema_of_the_live_weights_and_every_consumer_reads_it(tmp_path):
    module, record = fit(tmp_path, max_steps=6)
    steps = record.after_step
    expected = dict(steps[START])  # the first update copies the weights; before it the average waits
    for live in steps[START + 1 :]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * live[k] for k in expected}
    assert not torch.allclose(expected["lm_head.weight"], steps[-1]["lm_head.weight"])  # the test can tell them apart

    # validation after step 3 swapped the live weights back before step 4 (the average differed from them then)
    assert not torch.allclose(
        steps[2]["lm_head.weight"], DECAY * steps[1]["lm_head.weight"] + (1 - DECAY) * steps[2]["lm_head.weight"]
    )
    for k, live in steps[2].items():
        assert torch.equal(record.before_step[3][k], live), k
    for k, v in expected.items():
        torch.testing.assert_close(record.validated[k], v, msg=f"validation ran on {k} that is not the average")
        torch.testing.assert_close(record.validation_epoch_end[k], v, msg=f"samples/evals would see a live {k}")
        torch.testing.assert_close(module.model.state_dict()[k], v, msg=f"after fit, {k} is not the average")

    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 6
    inference = gpt_state_dict(ckpt)  # what lm generate / export / init_from load
    for k, v in expected.items():
        torch.testing.assert_close(inference[k], v, msg=k)
        assert torch.equal(ckpt["current_model_state"][f"model.{k}"], steps[-1][k]), k  # the live weights, to resume


def test_resume_continues_both_the_live_weights_and_the_average_exactly(tmp_path):
    uninterrupted, _ = fit(tmp_path / "a", max_steps=6)
    fit(tmp_path / "b", max_steps=4)
    resumed, _ = fit(tmp_path / "b", max_steps=6, ckpt_path=tmp_path / "b" / "last.ckpt")
    a, b = read_checkpoint(tmp_path / "a" / "last.ckpt"), read_checkpoint(tmp_path / "b" / "last.ckpt")
    assert a["averaging_state"]["n_averaged"] == b["averaging_state"]["n_averaged"] == 6 - START
    for key in ("state_dict", "current_model_state"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), f"{key}: {name}"


def test_before_the_first_update_validation_and_checkpoints_use_the_live_weights(tmp_path):
    """Lightning's callback would validate and save the weights from before step 0 until its first update."""
    _, record = fit(tmp_path, max_steps=3, start=10)
    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert "current_model_state" not in ckpt
    for k, v in record.after_step[-1].items():
        assert torch.equal(record.validated[k], v), k
        assert torch.equal(gpt_state_dict(ckpt)[k], v), k
    # resuming from it works, and the average then starts from the live weights at its first update
    module, record = fit(tmp_path, max_steps=6, ckpt_path=tmp_path / "last.ckpt", start=4)
    expected = dict(record.after_step[4 - 3])  # after_step[0] is step 3 (0-based) of the resumed run
    expected = {k: DECAY * expected[k] + (1 - DECAY) * record.after_step[-1][k] for k in expected}
    for k, v in expected.items():
        torch.testing.assert_close(module.model.state_dict()[k], v, msg=k)


def ema_of(steps: list[dict[str, torch.Tensor]], start: int = START) -> dict[str, torch.Tensor]:
    average = dict(steps[start])
    for live in steps[start + 1 :]:
        average = {k: DECAY * average[k] + (1 - DECAY) * live[k] for k in average}
    return average


def test_the_checkpoint_written_at_train_end_keeps_the_live_weights_to_resume_from(tmp_path):
    """lm's Checkpoint writes last.ckpt in on_train_end when the last step was not saved yet (max_steps between
    validations, max_time, too many skipped steps): the average must not have replaced the live weights by then."""
    module, record = fit(tmp_path, max_steps=5, checkpoint=Checkpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 5
    live, average = record.after_step[-1], ema_of(record.after_step)
    assert not torch.allclose(live["lm_head.weight"], average["lm_head.weight"])
    for k, v in live.items():
        assert torch.equal(ckpt["current_model_state"][f"model.{k}"], v), k
        torch.testing.assert_close(ckpt["state_dict"][f"model.{k}"], average[k], msg=k)
        torch.testing.assert_close(module.model.state_dict()[k], average[k], msg=k)  # after fit: the average


def test_a_crash_during_validation_saves_the_live_weights_as_the_state_to_resume_from(tmp_path):
    """SIGTERM/SIGUSR1 or an error between validation batches, while the model holds the average."""
    record = Record(fail_in_validation_at=6)
    checkpoint = Checkpoint(dirpath=tmp_path, save_last=True, save_top_k=0, save_on_exception=True)
    with pytest.raises(RuntimeError, match="crash during validation"):
        fit(tmp_path, max_steps=8, checkpoint=checkpoint, record=record)
    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 6
    live, average = record.after_step[-1], ema_of(record.after_step)
    for k, v in live.items():
        assert torch.equal(ckpt["current_model_state"][f"model.{k}"], v), k
        torch.testing.assert_close(ckpt["state_dict"][f"model.{k}"], average[k], msg=k)


@pytest.mark.parametrize("torch_version", [None, "2.11.0"])
def test_bf16_true_keeps_an_fp32_average_of_the_bf16_weights(tmp_path, monkeypatch, torch_version):
    """Lightning casts the model to bf16 after the average was copied in fp32: the second update's lerp of fp32 and
    bf16 tensors used to fail ("expected dtype float for 'end'"). Before torch 2.12 the EMA averages tensor by tensor
    (torch's foreach grouping refused the two dtypes: a crash at the second update); 2.11.0 runs that path here."""
    if torch_version:
        from torch.torch_version import TorchVersion

        monkeypatch.setattr(torch, "__version__", TorchVersion(torch_version))
    module, record = fit(tmp_path, 6, precision="bf16-true")
    live = record.after_step[-1]
    assert all(w.dtype == torch.bfloat16 for w in live.values())
    ema = next(cb for cb in module.trainer.callbacks if isinstance(cb, EMA))
    average = dict(ema._average_model.module.model.named_parameters())
    assert all(a.dtype == torch.float32 and torch.isfinite(a).all() for a in average.values())
    expected = {k: w.float() for k, w in record.after_step[START].items()}  # the first update copies
    for step in range(START + 1, 6):  # then avg = decay * avg + (1 - decay) * live
        expected = {k: DECAY * e + (1 - DECAY) * record.after_step[step][k].float() for k, e in expected.items()}
    for name, a in average.items():
        torch.testing.assert_close(a, expected[name], rtol=1e-5, atol=1e-6)


def test_updates_come_every_n_steps_from_the_starting_step():
    ema = EMA(update_every_n_steps=10, update_starting_at_step=5)  # the first update came at step 10
    assert [step for step in range(40) if ema.should_update(step_idx=step)] == [5, 15, 25, 35]
    assert [step for step in range(4) if EMA().should_update(step_idx=step)] == [0, 1, 2, 3]
    assert not EMA().should_update(epoch_idx=1)  # never at epoch ends


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(LMError, match="decay must be in"):
        EMA(decay=1.5)
    with pytest.raises(LMError, match="update_every_n_steps must be >= 1"):
        EMA(update_every_n_steps=0)
    with pytest.raises(LMError, match="update_starting_at_step must be >= 0"):
        EMA(update_every_n_steps=10, update_starting_at_step=-5)  # updated at steps 5, 15, ...


def test_fsdp_is_refused_with_a_one_line_reason():
    with pytest.raises(LMError, match="does not work with FSDP"):
        EMA().setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")


def test_the_average_follows_the_model_to_its_device():
    """Lightning builds the average in setup, before the strategy moves the model to the GPU, so it stayed on the
    CPU and every update copied the weights across. "meta" stands in for the GPU here."""
    module = LanguageModel(get_config("tiny"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    ema = EMA()
    ema.setup(trainer, module, "fit")
    assert {p.device.type for p in ema._average_model.parameters()} == {"cpu"}
    module.to("meta")  # what strategy.setup does before on_fit_start
    ema.on_fit_start(trainer, module)
    assert {p.device.type for p in ema._average_model.parameters()} == {"meta"}
    pinned = EMA()
    pinned._device = "cpu"  # a device chosen for the average stays
    pinned.setup(trainer, LanguageModel(get_config("tiny")), "fit")
    pinned.on_fit_start(trainer, module)
    assert {p.device.type for p in pinned._average_model.parameters()} == {"cpu"}


def test_each_update_moves_the_average_by_one_minus_decay_towards_the_live_weights():
    """With decay 0.5 the two weights of the lerp are equal, so the tests above cannot tell decay from 1 - decay."""
    update = EMA(decay=0.9)._kwargs["multi_avg_fn"]
    average, live = [torch.tensor([0.0, 10.0])], [torch.tensor([10.0, 0.0])]
    update(average, live, 1)
    torch.testing.assert_close(average[0], torch.tensor([1.0, 9.0]))  # 0.9 * avg + 0.1 * live
    update(average, live, 2)
    torch.testing.assert_close(average[0], torch.tensor([1.9, 8.1]))


@pytest.mark.parametrize("evals_first", [False, True])
def test_evaluations_between_steps_see_the_average_as_those_at_validation_do(tmp_path, monkeypatch, evals_first):
    """EvalCallback(every_n_steps) ran on the live weights and logged them under the keys its validation-time runs
    log the average's under: one curve switching between two models. Placed before EMA in the callbacks, it must
    still see the average with this step's update in it."""
    from lm.eval import EvalCallback

    evaluated = {}
    evals = EvalCallback([{"task": "lm", "data": "unread.txt"}], every_n_validations=None, every_n_steps=2)
    monkeypatch.setattr(evals, "_prepare", lambda pl_module: None)

    def run(trainer, pl_module):
        evaluated[trainer.global_step] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    monkeypatch.setattr(evals, "run", run)
    module, record = fit(tmp_path, max_steps=6, extra=[evals], evals_first=evals_first)
    assert evaluated.keys() == {2, 4, 6}
    for step, weights in evaluated.items():
        average, live = ema_of(record.after_step[:step]), record.after_step[step - 1]
        if step > START + 1:  # the first update (after step START + 1) copies the weights; then they part
            assert not torch.allclose(average["lm_head.weight"], live["lm_head.weight"])
        for k, v in average.items():
            torch.testing.assert_close(weights[k], v, msg=f"step {step}: {k} is not the average")
    for k, v in record.after_step[3].items():  # the live weights came back for step 5 (0-based 4)
        assert torch.equal(record.before_step[4][k], v), k


class SaveAroundValidation(L.Callback):
    """Saves a checkpoint as a validation starts (before EMA puts the average in) and another at its epoch end (with
    the average in the model), as a user's callback may."""

    def __init__(self, root):
        self.root = root

    def on_validation_start(self, trainer, pl_module):
        trainer.save_checkpoint(self.root / f"before-{trainer.global_step}.ckpt")

    def on_validation_epoch_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.root / f"during-{trainer.global_step}.ckpt")


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_a_save_in_the_middle_of_validation_leaves_the_average_in_and_saves_what_any_save_does(tmp_path, precision):
    """trainer.save_checkpoint in on_validation_epoch_end swapped the live weights back for the save, and they stayed
    in for the rest of that validation: the callbacks after the saving one (samples, evaluations) ran on them."""
    after = Record()
    _, record = fit(tmp_path, max_steps=6, precision=precision, extra=[SaveAroundValidation(tmp_path), after])
    average = ema_of([{k: v.float() for k, v in step.items()} for step in record.after_step])
    assert not torch.allclose(average["lm_head.weight"], record.after_step[-1]["lm_head.weight"].float())
    for k, v in average.items():
        seen = after.validation_epoch_end[k]  # the average in the model's dtype
        torch.testing.assert_close(seen, v.to(seen.dtype), msg=f"the callback after the save saw a live {k}")
    before, during = read_checkpoint(tmp_path / "before-6.ckpt"), read_checkpoint(tmp_path / "during-6.ckpt")
    for key in ("state_dict", "current_model_state", "averaging_state"):  # the average, the live weights
        assert before[key].keys() == during[key].keys(), key
        for name, value in before[key].items():
            assert value.dtype == during[key][name].dtype and torch.equal(value, during[key][name]), f"{key}: {name}"
