"""What the throughput callback logs: train/tokens_per_sec measures training steps, not validation or checkpoints;
and what the text samples leave in samples.txt."""

import datetime
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lm.callbacks
from lm.callbacks import ProgressLines, SampleText, Throughput, inside_accumulation_window
from lm.config import get_config
from lm.model import GPT
from lm.module import LanguageModel
from lm.reliability import Checkpoint
from lm.tokenizer import CharTokenizer
from tests.conftest import MemoryLogger, nan_loss_from_step

STEP, PAUSE = 0.01, 0.5  # seconds on the test's clock: a training step, and a validation or a checkpoint save


class Clock:
    """The clock Throughput reads (lm.callbacks.time.perf_counter), advanced only by what the test says each part of
    the loop takes: the rates it logs are then exact, whatever else runs on the machine."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:  # the "seconds since launch" lines keep the real clock
        return time.time()

    def taking(self, seconds: float, fn):
        """fn, each call of which takes `seconds` on this clock."""

        def timed(*args, **kwargs):
            self.now += seconds
            return fn(*args, **kwargs)

        return timed


def trainer_stepping_every_batch(world_size: int = 1) -> SimpleNamespace:
    """The parts of a Trainer that Throughput reads, for a fit where every batch is an optimizer step and every step
    a logging step; the test sets global_step as it goes."""
    return SimpleNamespace(
        world_size=world_size,
        precision="32-true",
        log_every_n_steps=1,
        global_step=0,
        accumulate_grad_batches=1,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_should_accumulate=lambda: False)),
    )


def trainer_validating_a_fit(root) -> SimpleNamespace:
    """The parts of a Trainer that SampleText reads, at the end of a fit's validation; the test sets global_step."""
    return SimpleNamespace(
        sanity_checking=False, strategy=None, state=SimpleNamespace(fn="fit"), default_root_dir=root, loggers=[]
    )


class SlowSave(L.Callback):
    """Makes every checkpoint save take PAUSE seconds longer, as writing a large one would."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.clock.now += PAUSE


def test_tokens_per_sec_leaves_out_validation_and_checkpoint_saving(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr("lm.callbacks.time", clock)
    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20)
    module.training_step = clock.taking(STEP, module.training_step)
    module.validation_step = clock.taking(PAUSE, module.validation_step)
    ids = torch.randint(0, 64, (12, 4, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": x, "labels": x} for x in ids]
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=12,
        log_every_n_steps=2,
        val_check_interval=4,  # validation after steps 4 and 8
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[
            Throughput(),
            SlowSave(clock),
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1),  # saves after steps 6 and 12
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    rates = {step: m["train/tokens_per_sec"] for step, m in logger.by_step().items() if "train/tokens_per_sec" in m}
    # A window every 2 steps (the first, with warm-up, is not logged), at logger steps 3, 5, ..., 11 (0-based): those
    # ending at 5 and 9 held a validation, the one ending at 7 a checkpoint save, each PAUSE long (50 steps' time).
    # Every window counts training steps only: 64 tokens per STEP. Before the fix the three were 128 / 0.52 s = 246.
    assert sorted(rates) == [3, 5, 7, 9, 11]
    for step, rate in rates.items():
        assert rate == pytest.approx(64 / STEP), (step, rates)


def test_mfu_counts_each_batch_at_its_own_length(monkeypatch):
    """Chat and preference batches pad to their own longest row: the window's MFU took the last batch's length for all
    of its tokens (10-14% off at the 124M shape with lengths 64 and 1024; the attention term grows with the length)."""
    clock, peak = Clock(), 1e12
    monkeypatch.setattr("lm.callbacks.time", clock)
    monkeypatch.setattr("lm.callbacks.peak_flops", lambda device, dtype: peak)
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20)
    module.training_step = clock.taking(STEP, module.training_step)
    lengths = [16, 16, 16, 2] * 3  # each window of 2 steps: 16 and 16, or 16 and 2
    batches = [{"input_ids": torch.zeros(4, t, dtype=torch.long), "labels": torch.zeros(4, t, dtype=torch.long)}
               for t in lengths]  # fmt: skip
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=len(lengths), log_every_n_steps=2, logger=logger, callbacks=[Throughput()],
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    logged = [m["train/mfu"] for _, m in sorted(logger.by_step().items()) if "train/mfu" in m]

    def mfu(window):
        return sum(4 * t * module.train_flops_per_token(t) for t in window) / (2 * STEP) / peak

    windows = [lengths[i : i + 2] for i in range(2, len(lengths), 2)]  # the first window (warm-up) is not logged
    assert logged == pytest.approx([mfu(w) for w in windows])
    assert module.train_flops_per_token(16) != module.train_flops_per_token(2)  # so the lengths matter


def test_tokens_trained_count_every_micro_batch_and_go_on_after_a_resume(tmp_path):
    """train/tokens, the x-axis on which runs of different batch sizes compare: each optimizer step of 2 micro-batches
    of 4 x 16 positions trains 128 tokens, and a run resumed at step 4 goes on from 512, not from 0."""

    def fit(max_steps, ckpt_path=None):
        torch.manual_seed(0)
        module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20)
        ids = torch.randint(0, 64, (16, 4, 16), generator=torch.Generator().manual_seed(0))
        logger = MemoryLogger()
        trainer = L.Trainer(
            accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, log_every_n_steps=2, logger=logger,
            callbacks=[Throughput(), ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)],
            limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
        return {step: m["train/tokens"] for step, m in logger.by_step().items() if "train/tokens" in m}

    assert fit(6) == {1: 256, 3: 512, 5: 768}  # logger steps are 0-based: optimizer steps 2, 4, 6
    (checkpoint,) = tmp_path.glob("*step=4.ckpt")
    assert fit(6, ckpt_path=checkpoint) == {5: 768}


def test_start_up_and_first_step_are_reported_once_in_seconds_since_launch(tmp_path, caplog):
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20)
    ids = torch.randint(0, 64, (6, 2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": x, "labels": x} for x in ids]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        val_check_interval=2,  # validations between steps must not report a "first step" again
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        callbacks=[Throughput()],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with caplog.at_level("INFO"):
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    messages = [r.getMessage() for r in caplog.records]
    lines = [m for m in messages if "s since launch" in m and not m.startswith("step ")]  # not the validations'
    assert [line.split(":")[0] for line in lines] == ["training starts", "first step done"], messages
    seconds = [float(line.split(": ")[1].split(" s ")[0]) for line in lines]
    assert 0 < seconds[0] <= seconds[1], seconds
    # and what a step is, which a recipe's LR is tuned for and the device count multiplies
    assert [m for m in messages if m.startswith("tokens per optimizer step")] == [
        "tokens per optimizer step: 32 = 2 x 16 (this batch) x 1 device(s) x 1 micro-batch(es)"
    ]


def test_a_run_stopped_by_max_skipped_steps_logs_that_step_s_values_not_the_last_logging_step_s():
    """Lightning writes the logs of the step that stops a run whatever log_every_n_steps says: it repeated the last
    logging step's finite loss and 0 skipped steps exactly where the run died of NaNs."""
    import math

    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=10, max_skipped_steps=1)
    nan_loss_from_step(module, 6)
    ids = torch.randint(0, 64, (20, 2, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None)
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=20, log_every_n_steps=5, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    steps = logger.by_step()
    assert module.skipped_steps == 2 and sorted(steps) == [4, 7]  # a logging step, then the stop
    assert math.isfinite(steps[4]["train/loss"]) and steps[4]["train/skipped_steps"] == 0
    last = steps[7]
    assert math.isnan(last["train/loss"]) and last["train/skipped_steps"] == 2
    assert last["train/lr"] != steps[4]["train/lr"]  # this step's LR (the schedule moved on)


@pytest.mark.parametrize(("accumulate", "epoch_batches"), [(4, 40), (1, 5)])
def test_tokens_per_sec_windows_end_at_optimizer_steps_across_accumulation_and_epochs(
    monkeypatch, accumulate, epoch_batches
):
    """Windows were counted in micro-batches of the epoch (batch_idx): under accumulation they held too few optimizer
    steps (the rate read half the true one here), and with epochs of 5 batches some logged steps had no rate and
    others a stale one."""
    clock = Clock()
    monkeypatch.setattr("lm.callbacks.time", clock)
    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20)
    module.training_step = clock.taking(STEP, module.training_step)
    module.optimizer_step = clock.taking(2 * STEP, module.optimizer_step)
    ids = torch.randint(0, 64, (epoch_batches, 4, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None)
    logger = MemoryLogger()
    log_every = 1 if accumulate > 1 else 2
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6 if accumulate > 1 else 12, log_every_n_steps=log_every,
        accumulate_grad_batches=accumulate, limit_val_batches=0, num_sanity_val_steps=0, logger=logger,
        callbacks=[Throughput()], enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    steps = logger.by_step()
    true_rate = accumulate * 64 / (accumulate * STEP + 2 * STEP)
    logged = sorted(s for s, m in steps.items() if "train/loss" in m)
    rates = {s: steps[s].get("train/tokens_per_sec") for s in logged}
    assert rates[logged[0]] is None  # the first window (warm-up, compilation) is not logged
    assert all(rate == pytest.approx(true_rate) for rate in list(rates.values())[1:]), rates


@pytest.mark.parametrize("world_size", [1, 2])
def test_tokens_per_sec_counts_every_rank_s_tokens(monkeypatch, world_size):
    """Each rank counts only its own batches: train/tokens_per_sec is the run's rate, world_size x one rank's, and
    train/tokens the run's count."""
    clock = Clock()
    monkeypatch.setattr("lm.callbacks.time", clock)
    trainer = trainer_stepping_every_batch(world_size)
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda name, value, **kwargs: logged.update({name: value}))
    callback = Throughput()
    batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long)}  # 64 tokens on this rank
    for step in range(3):  # the first window (warm-up) is not logged
        trainer.global_step = step
        clock.now += STEP
        callback.on_train_batch_end(trainer, module, None, batch, step)
    assert logged == {"train/tokens_per_sec": pytest.approx(world_size * 64 / STEP), "train/tokens": world_size * 192}


@pytest.mark.parametrize("saved", [{"tokens_all_ranks": 1000}, {"tokens_trained": 500}], ids=["total", "older-lm"])
def test_train_tokens_go_on_from_the_checkpoint_s_total_on_another_number_of_devices(monkeypatch, saved):
    """A checkpoint held one rank's count, which the resumed run multiplied by its own world size: resumed on 2
    devices, a 1-device run's 1,000 tokens became 2,000. It now holds the run's total. (A checkpoint of an older lm
    holds one rank's count, taken as of a run on as many devices as the resumed one.)"""
    clock = Clock()
    monkeypatch.setattr("lm.callbacks.time", clock)
    trainer = trainer_stepping_every_batch(world_size=2)
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda name, value, **kwargs: logged.update({name: value}))
    callback = Throughput()
    callback.load_state_dict(saved)
    for step in range(3):  # 64 tokens a step on each of the 2 ranks
        trainer.global_step = step
        clock.now += STEP
        callback.on_train_batch_end(trainer, module, None, {"input_ids": torch.zeros(4, 16, dtype=torch.long)}, step)
    assert logged["train/tokens"] == 1000 + 3 * 2 * 64
    assert callback.state_dict() == {"tokens_all_ranks": 1000 + 3 * 2 * 64}  # and a resume on 1 device goes on from it


def test_a_resume_with_a_callback_that_already_trained_goes_on_from_the_checkpoint_s_total():
    """A Throughput reused for a second fit (in one process) that resumes a checkpoint: its count is the checkpoint's
    total, not that plus what the callback counted in the first fit."""
    callback = Throughput()
    callback.tokens_trained = 500  # counted in a first fit
    callback.load_state_dict({"tokens_all_ranks": 1000})
    assert callback.tokens_all_ranks() == 1000


def test_samples_txt_keeps_the_samples_of_every_validation(tmp_path):
    """Each validation appends its samples: the file is the run's history of them, not the last validation's."""
    from tests.test_chat_replies import scripted_model

    tokenizer = CharTokenizer.train(["abc"])
    module = SimpleNamespace(
        model=scripted_model(tokenizer, {"a": "b", "b": "c", "c": "a"}), tokenizer=tokenizer, device=torch.device("cpu")
    )
    trainer = trainer_validating_a_fit(tmp_path)
    samples = SampleText(prompts=["a"], max_new_tokens=4)
    for step in (2, 4):
        trainer.global_step = step
        samples.on_validation_epoch_end(trainer, module)
    assert (tmp_path / "samples.txt").read_text() == (
        "--- sample at step 2 ---\nabcab\n--- sample at step 4 ---\nabcab\n"
    )


@pytest.mark.parametrize("training", [False, True])
def test_samples_are_seeded_by_the_step_and_leave_the_model_in_the_mode_they_found(tmp_path, monkeypatch, training):
    """A validation's samples are reproducible (seeded by the step of the weights), differ from one step to the next,
    are drawn in eval mode (no dropout), and the model goes back to the mode it was in: the callbacks after this one
    validate in eval mode."""
    modes = []  # the model's mode at each sample
    generate_text = lm.callbacks.generate_text

    def recording_mode(model, *args, **kwargs):
        modes.append(model.training)
        return generate_text(model, *args, **kwargs)

    monkeypatch.setattr(lm.callbacks, "generate_text", recording_mode)
    torch.manual_seed(0)
    tokenizer = CharTokenizer.train(["abcdefgh"])
    module = SimpleNamespace(
        model=GPT(get_config("tiny", vocab_size=64)).train(training), tokenizer=tokenizer, device=torch.device("cpu")
    )
    trainer = trainer_validating_a_fit(tmp_path)
    samples = SampleText(prompts=["a"], max_new_tokens=12, temperature=1.0, top_k=None)
    for step in (2, 2, 3):
        trainer.global_step = step
        samples.on_validation_epoch_end(trainer, module)
        assert all(m.training == training for m in module.model.modules())
    assert modes == [False, False, False]
    texts = (tmp_path / "samples.txt").read_text().split("--- sample at step ")[1:]
    assert texts[0] == texts[1]  # step 2 twice: the same sample
    assert texts[1].partition("\n")[2] != texts[2].partition("\n")[2]  # step 3: another draw


def test_a_second_fit_with_the_same_throughput_callback_skips_its_own_warm_up_window(monkeypatch):
    """The first window of every fit holds its warm-up; a callback reused for a second fit logged that fit's first
    window, timed from the end of the previous fit."""
    clock = Clock()
    monkeypatch.setattr("lm.callbacks.time", clock)
    trainer = trainer_stepping_every_batch()
    logged = []

    def log(name, value, **kwargs):
        if name != "train/tokens":  # logged at every logging step: a count, not a rate of the window
            logged.append(name)

    module = SimpleNamespace(device=torch.device("cpu"), log=log)
    callback = Throughput()
    batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long)}
    for fit in range(2):
        callback.on_train_start(trainer, module)
        logged.clear()
        for step in range(3):
            trainer.global_step = step
            clock.now += STEP if step else 100 * STEP  # a second fit starts long after the first ended
            callback.on_train_batch_end(trainer, module, None, batch, step)
            if step == 0:
                assert logged == [], f"fit {fit}: its first window was logged"
        assert logged == ["train/tokens_per_sec", "train/tokens_per_sec"]


def test_a_second_fit_with_the_same_throughput_callback_counts_the_flops_of_its_own_model(monkeypatch):
    """The FLOPs per token were kept by sequence length across fits: a second fit of a larger model with the same
    callback was measured with the first model's count."""
    clock, peak = Clock(), 1e12
    monkeypatch.setattr("lm.callbacks.time", clock)
    monkeypatch.setattr("lm.callbacks.peak_flops", lambda device, dtype: peak)
    trainer = trainer_stepping_every_batch()
    callback = Throughput()
    batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long)}
    for flops_per_token in (1e6, 3e6):  # the second fit's model: three times the FLOPs
        mfu = []
        module = SimpleNamespace(
            device=torch.device("cpu"),
            log=lambda name, value, mfu=mfu, **kwargs: mfu.append(value) if name == "train/mfu" else None,
            train_flops_per_token=lambda seq_len, f=flops_per_token: f,
        )
        callback.on_train_start(trainer, module)
        for step in range(2):  # the first window is the warm-up, not logged
            trainer.global_step = step
            clock.now += STEP
            callback.on_train_batch_end(trainer, module, None, batch, step)
        assert mfu == [pytest.approx(4 * 16 * flops_per_token / STEP / peak)]


@pytest.mark.parametrize("throughput_first", [False, True])
def test_tokens_per_sec_leaves_out_evaluations_run_between_steps(monkeypatch, throughput_first):
    """EvalCallback(every_n_steps=N) evaluates between steps, outside validation: its time fell into the window, and
    the windows holding one logged 246 tokens/s for 6400 (a 26x dip in train/tokens_per_sec and train/mfu)."""
    from lm.eval import EvalCallback

    clock = Clock()
    monkeypatch.setattr("lm.callbacks.time", clock)
    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20)
    module.training_step = clock.taking(STEP, module.training_step)
    evals = EvalCallback(tasks=[], every_n_validations=None, every_n_steps=4)  # evaluates after steps 4 and 8
    monkeypatch.setattr(evals, "run", lambda trainer, pl_module: setattr(clock, "now", clock.now + PAUSE))
    ids = torch.randint(0, 64, (12, 4, 16), generator=torch.Generator().manual_seed(0))
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=12, log_every_n_steps=2, limit_val_batches=0, logger=logger,
        callbacks=[Throughput(), evals] if throughput_first else [evals, Throughput()],  # the CLI's order: evals first
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None))
    rates = {s: m["train/tokens_per_sec"] for s, m in logger.by_step().items() if "train/tokens_per_sec" in m}
    assert sorted(rates) == [3, 5, 7, 9, 11]
    assert all(rate == pytest.approx(64 / STEP) for rate in rates.values()), rates


@pytest.mark.parametrize("lines_first", [False, True])
def test_progress_lines_leave_out_evaluations_run_between_steps(monkeypatch, capsys, lines_first):
    """The plain progress lines counted EvalCallback(every_n_steps=N)'s evaluations as training time, which
    train/tokens_per_sec leaves out: the line after each read 11 tokens/s for 64, and 6x the time left."""
    from lm.eval import EvalCallback

    clock = Clock()
    monkeypatch.setattr("lm.callbacks.time", clock)
    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20)
    module.training_step = clock.taking(1.0, module.training_step)  # 64 tokens a second
    evals = EvalCallback(tasks=[], every_n_validations=None, every_n_steps=4)  # evaluates after steps 4 and 8
    monkeypatch.setattr(evals, "run", lambda trainer, pl_module: setattr(clock, "now", clock.now + 10.0))
    ids = torch.randint(0, 64, (8, 4, 16), generator=torch.Generator().manual_seed(0))
    lines = ProgressLines(every=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, limit_val_batches=0, logger=False,
        callbacks=[lines, evals] if lines_first else [evals, lines],  # the CLI's order: the bar after the user's
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ") and "/8:" in line]
    assert len(printed) == 4
    for step, line in zip((2, 4, 6, 8), printed, strict=True):
        assert line == f"step {step}/8: 64 tokens/s, 1 steps/s, {datetime.timedelta(seconds=8 - step)} left"


def test_lm_fit_counts_a_step_s_tokens_before_a_snapshot_of_that_step_is_saved(tmp_path, monkeypatch):
    """lm fit appended Throughput after Lightning had put the checkpoint callbacks last: a snapshot saved at a step's
    end held the token count without that step's batch (each resume from one lost a batch per device), and its write
    fell inside the throughput window (a dip in train/tokens_per_sec at every snapshot)."""
    from lm.__main__ import main
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.logger", "false", "--trainer.max_steps", "10", "--samples.max_new_tokens", "0"]
    main([*args, "--snapshots.every_n_train_steps", "10", "--trainer.val_check_interval", "10"])
    snapshot, last = (
        torch.load(tmp_path / "checkpoints" / name, weights_only=True)["callbacks"]["Throughput"]
        for name in ("snapshot-step=10.ckpt", "last.ckpt")
    )
    assert snapshot == last and last  # both at step 10: 10 steps of 8 x 64 tokens


@pytest.mark.parametrize("checkpoints", [False, True], ids=["no-checkpoints", "checkpoints"])
def test_progress_lines_after_a_validation_inside_an_accumulation_window_time_the_rest_of_its_step(
    tmp_path, monkeypatch, capsys, checkpoints
):
    """val_check_interval counts micro-batches: a validation after 2 of a step's 4 left half the step to run, and the
    next line counted the whole step in the time of that half (twice the speed, half the time left). And lm's
    Checkpoint writes such a validation's checkpoints at the end of the step: their time was the training's."""
    clock = Clock()
    monkeypatch.setattr("lm.callbacks.time", clock)
    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20)
    module.training_step = clock.taking(1.0, module.training_step)  # 4 micro-batches of 64 tokens: 4 s a step
    module.validation_step = clock.taking(PAUSE, module.validation_step)
    ids = torch.randint(0, 64, (32, 4, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None)
    saving = [SlowSave(clock), Checkpoint(dirpath=tmp_path, monitor="val/loss", save_last=True)] if checkpoints else []
    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, accumulate_grad_batches=4, val_check_interval=6, limit_val_batches=1,
        num_sanity_val_steps=0, log_every_n_steps=1, logger=False, callbacks=[ProgressLines(every=1), *saving],
        enable_model_summary=False, enable_checkpointing=checkpoints,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)  # validations inside steps 2, 5 and 8
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ") and "/8:" in line]
    assert [line.split(": ")[0] for line in lines] == [f"step {step}/8" for step in range(1, 9)]
    for step, line in enumerate(lines, start=1):
        left = datetime.timedelta(seconds=4 * (8 - step))
        assert line.endswith(f", 64 tokens/s, 0.25 steps/s, {left} left"), line


def test_progress_lines_go_on_when_a_callback_saves_at_the_end_of_a_step_a_validation_fell_inside(tmp_path, capsys):
    """A save by a callback that runs before ProgressLines, in the batch that ends such a step."""

    class SaveAtStepEnds(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not inside_accumulation_window(trainer):
                trainer.save_checkpoint(tmp_path / "mine.ckpt")

    module = LanguageModel(get_config("tiny"), lr=1e-3, warmup_steps=1, decay_steps=20)
    ids = torch.randint(0, 64, (16, 4, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, accumulate_grad_batches=4, val_check_interval=6, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, callbacks=[SaveAtStepEnds(), ProgressLines(every=1)],
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)  # a validation inside step 2
    lines = [line.split(": ")[0] for line in capsys.readouterr().out.splitlines() if "/4: " in line]
    assert lines == [f"step {step}/4" for step in range(1, 5)]
