"""lm sweep: the W&B -> Optuna translation, failed trials, and a real 4-trial local grid sweep of the debug experiment.

pytest tests/test_sweep.py        # the real sweep is marked slow (~40 s on 2 cores)
"""

import contextlib
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

import lm.sweep
from lm.__main__ import main
from lm.errors import LMError
from lm.sweep import _host, _storage, grid_space, load_sweep, run_local, suggest, trial_command, worker_devices
from tests.conftest import REPO, cli_env

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_are_valid(path):
    config = load_sweep(path)
    assert config["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert config["command"][1:3] == ["lm", "fit"] and "${args}" in config["command"]
    for key in config["parameters"]:
        assert key.split(".")[0] in ("model", "data", "trainer"), key  # lm fit keys, as ${args} passes them


def test_wandb_distributions_translate_to_optuna():
    parameters = {
        "model.init_args.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "model.init_args.lr_ln": {"distribution": "log_uniform", "min": math.log(1e-4), "max": math.log(1e-2)},
        "model.init_args.weight_decay": {"min": 0.0, "max": 0.2},  # floats -> uniform
        "model.init_args.arch.n_layer": {"min": 2, "max": 6},  # ints -> int_uniform
        "data.init_args.batch_size": {"values": [8, 16, 32]},
        "model.init_args.warmup_steps": {"distribution": "q_uniform", "min": 0, "max": 100, "q": 10},
        "model.init_args.arch.n_embd": {"distribution": "q_log_uniform_values", "min": 32, "max": 512, "q": 32},
        "trainer.max_steps": {"value": 40},
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        p = suggest(trial, parameters)
        assert 1e-4 <= p["model.init_args.lr"] <= 1e-2
        assert 1e-4 * (1 - 1e-9) <= p["model.init_args.lr_ln"] <= 1e-2 * (1 + 1e-9)
        assert 0.0 <= p["model.init_args.weight_decay"] <= 0.2
        assert isinstance(p["model.init_args.arch.n_layer"], int) and 2 <= p["model.init_args.arch.n_layer"] <= 6
        assert p["data.init_args.batch_size"] in (8, 16, 32)
        assert p["model.init_args.warmup_steps"] % 10 == 0
        assert p["model.init_args.arch.n_embd"] % 32 == 0 and isinstance(p["model.init_args.arch.n_embd"], int)
        assert p["trainer.max_steps"] == 40
        study.tell(trial, 0.0)
    d = study.trials[0].distributions
    assert d["model.init_args.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert d["model.init_args.weight_decay"] == FloatDistribution(0.0, 0.2)
    assert d["model.init_args.arch.n_layer"] == IntDistribution(2, 6)
    assert d["data.init_args.batch_size"] == CategoricalDistribution([8, 16, 32])
    assert d["model.init_args.warmup_steps"] == FloatDistribution(0.0, 100.0, step=10.0)
    assert "trainer.max_steps" not in d  # a constant is passed through, not searched

    assert grid_space({"a": {"values": [1, 2]}, "b": {"min": 1, "max": 3}, "c": {"value": "x"}}) == {
        "a": [1, 2],
        "b": [1, 2, 3],
        "c": ["x"],
    }
    with pytest.raises(LMError, match="continuous"):
        grid_space({"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}})


def test_a_sweep_file_that_is_not_yaml_is_one_line(tmp_path, capsys):
    """A YAML syntax error printed yaml's four-line report (the text, a caret under the spot) inside the error, and a
    file that is not UTF-8 text (a checkpoint) was a UnicodeDecodeError traceback."""
    (tmp_path / "bad.yaml").write_text("method: grid\nparameters:\n  lr: 1\n   values: [1]\n")
    torch.save({"state_dict": {}}, tmp_path / "last.ckpt")
    expected = {
        "bad.yaml": "not valid YAML (mapping values are not allowed here, line 4, column 10)",
        "last.ckpt": "not UTF-8 text (invalid start byte at byte ",
    }
    for name, message in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", str(tmp_path / name), "--local"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {tmp_path / name}: {message}"), err


def test_bounds_yaml_reads_as_strings_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 (no decimal point) as a string: it was compared as text ("needs min < max" for
    1e-4 < 1e-2) or raised a TypeError against a float."""
    lr = {"distribution": "log_uniform_values", "min": "1e-4", "max": "1e-2"}
    config = {
        "method": "random",
        "metric": {"name": "val/loss"},
        "parameters": {"lr": lr},
        "command": ["lm", "${args}"],
    }
    path = _write(tmp_path, config)
    spec = load_sweep(path)["parameters"]["lr"]
    assert (spec["min"], spec["max"]) == (1e-4, 1e-2)


def test_a_q_uniform_grid_stays_within_its_bounds_and_rounds_its_steps():
    assert grid_space({"x": {"distribution": "q_uniform", "min": 0, "max": 7, "q": 2}})["x"] == [0, 2, 4, 6]  # not 8
    assert grid_space({"x": {"distribution": "q_uniform", "min": 0.1, "max": 0.3, "q": 0.1}})["x"] == [0.1, 0.2, 0.3]


def test_grid_points_tell_true_from_1_but_not_10_from_10_0():
    key = lm.sweep._grid_key
    assert key({"x": True}) != key({"x": 1}) and key({"x": False}) != key({"x": 0})  # a grid ran 2 of 4 points
    assert key({"x": 10}) == key({"x": 10.0})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"distribution": "normal", "mu": 0, "sigma": 1}, "not supported"),
        ({"values": [1, 2], "probabilities": [0.5, 0.5]}, "probabilities"),
        ({"min": 3, "max": 1}, "min < max"),
        ({"parameters": {"x": {"value": 1}}}, "nested"),
        ({"values": [datetime.date(2026, 1, 1)]}, "numbers, strings"),  # YAML's dates: not a JSON value (lists are)
        ({"distribution": "q_uniform", "min": 0, "max": 4, "q": "a"}, "q must be a number"),  # was a TypeError
        ({"distribution": "int_uniform", "min": 0.5, "max": 3.5}, "whole-number bounds"),  # crashed the grid later
        ({"min": True, "max": 3}, "min must be a number"),
        ({"distribution": "constant", "values": [3]}, "constant needs a value"),  # a KeyError when a trial began
    ],
)
def test_bad_parameters_are_one_line_errors(tmp_path, spec, message):
    path = _write(tmp_path, {"method": "random", "metric": {"name": "val/loss"}, "parameters": {"x": spec}})
    with pytest.raises(LMError, match=message) as e:
        load_sweep(path)
    assert str(e.value).startswith(f"{path}: parameters.x")


@pytest.mark.parametrize("run_cap", ["two", 2.5, 0, -1, True])
def test_a_run_cap_that_is_not_a_positive_whole_number_is_a_one_line_error(tmp_path, run_cap):
    """run_cap "two" was a TypeError traceback when the sweep began; 0 capped nothing in a grid and, in a random
    sweep, ran no trial before saying that none finished."""
    path = _write(tmp_path, _grid("1", "2") | {"run_cap": run_cap})
    with pytest.raises(LMError, match=f"{path}: run_cap must be a whole number of trials, at least 1, got "):
        load_sweep(path)


def test_a_sweep_name_that_yaml_reads_as_a_number_is_a_one_line_error(tmp_path, capsys):
    """`name: 2024` reached re.fullmatch as an int: a TypeError traceback."""
    path = _write(tmp_path, _grid("1") | {"name": 2024})
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path), "--local", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}: name must be a string, got 2024 (quote it: name: '2024')"), err


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_a_one_line_error(tmp_path, capsys, seed):
    """Optuna's sampler passed it to numpy: a ValueError traceback (Seed must be between 0 and 2**32 - 1)."""
    path = _write(tmp_path, _grid("1"))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path), "--local", "--out", str(tmp_path / "o"), "--seed", seed])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --seed must be in [0, 4294967295] (numpy's seeds), got {seed}"), err


def test_command_macros_expand_like_wandb():
    config = {"program": "train.py", "command": ["${env}", "${interpreter}", "${program}", "--x", "${args}"]}
    argv = trial_command(config, {"model.init_args.lr": 0.001, "flag": True, "none": None}, ["--config", "o.yaml"])
    # what came after `--` goes before the swept values, which win: an overlay setting lr ran its own lr in every trial
    assert argv == [
        sys.executable,
        "train.py",
        "--x",
        "--config",
        "o.yaml",
        "--model.init_args.lr=0.001",
        "--flag=true",
        "--none=null",
    ]
    lm_argv = trial_command({"command": ["lm", "fit", "${args_no_hyphens}"]}, {"a": 1}, ["--b", "2"])
    assert lm_argv == [sys.executable, "-m", "lm", "fit", "--b", "2", "a=1"]
    assert trial_command({"command": ["lm", "fit"]}, {"a": 1}, ["--b", "2"]) == [
        sys.executable,
        "-m",
        "lm",
        "fit",
        "--b",
        "2",
    ]


FAKE_FIT = textwrap.dedent(
    """
    # Stands in for `lm fit`: crashes for x=crash, else records x as the best val/loss the way ModelCheckpoint does.
    import sys
    from pathlib import Path
    import torch
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    if args["x"] == "crash":  # the error, then wandb's closing hints in colour, as a real lm fit prints them
        print("RuntimeError: boom", file=sys.stderr, flush=True)
        sys.exit("\\x1b[1;34mwandb\\x1b[0m: \\x1b[1mwandb sync /tmp/offline-run\\x1b[0m")
    if args.get("checkpoint.save_last") == "false":  # trained and validated, but wrote no last.ckpt
        sys.exit(0)
    last = Path(args["trainer.default_root_dir"]) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    state = {"monitor": args["checkpoint.monitor"], "best_model_score": torch.tensor(float(args["x"]))}
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": state}}, last)
    """
)


def test_crashing_trial_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path, capsys):
    (tmp_path / "fake_fit.py").write_text(FAKE_FIT)
    config = {
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"x": {"values": ["2.5", "crash", "1.5"]}},
        "program": str(tmp_path / "fake_fit.py"),
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
    }
    out = tmp_path / "sweep"
    main(["sweep", str(_write(tmp_path, config)), "--local", "--out", str(out), "--workers", "2"])

    summary = json.loads((out / "summary.json").read_text())
    by_x = {t["params"]["x"]: t for t in summary["trials"]}
    assert by_x["crash"]["state"] == "FAIL" and "RuntimeError: boom" in by_x["crash"]["error"]
    assert "\x1b" not in by_x["crash"]["error"]
    assert by_x["2.5"]["state"] == by_x["1.5"]["state"] == "COMPLETE"
    assert summary["best"]["params"] == {"x": "1.5"} and summary["best"]["val/loss"] == 1.5
    assert "best: trial" in capsys.readouterr().out

    # every trial failing is a one-line user error (exit code 2 through the CLI), after the summary
    config["parameters"]["x"]["values"] = ["crash"]
    with pytest.raises(LMError, match="no trial of sweep .* finished"):
        main(["sweep", str(_write(tmp_path, config)), "--local", "--out", str(tmp_path / "all-fail"), "--debug"])


def test_a_trial_writes_the_last_ckpt_its_score_is_read_from_whatever_its_config_says(tmp_path):
    """With checkpoint.save_last false (a config saving disk) every trial trained and validated, then failed with
    "no last.ckpt under ...: did validation run?", and the sweep stopped after three of them."""
    (tmp_path / "fake_fit.py").write_text(FAKE_FIT)
    config = _grid("2.5", "1.5") | {"program": str(tmp_path / "fake_fit.py")}
    config["command"] = ["${env}", "${interpreter}", "${program}", "${args}"]
    out = tmp_path / "sweep"
    main(["sweep", str(_write(tmp_path, config)), "--local", "--out", str(out), "--", "--checkpoint.save_last=false"])
    trials = json.loads((out / "summary.json").read_text())["trials"]
    assert [(t["state"], t["val/loss"]) for t in trials] == [("COMPLETE", 1.5), ("COMPLETE", 2.5)]


def _grid(*values: str) -> dict:
    parameters = {"x": {"values": list(values)}}
    return {"method": "grid", "metric": {"name": "val/loss"}, "parameters": parameters, "command": ["lm", "${args}"]}


def _x(argv: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--x="))


COPY_FIT = textwrap.dedent(
    """
    # Stands in for `lm fit` without importing torch: its last.ckpt is the one the test saved beside it for its x.
    import shutil, sys
    from pathlib import Path
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    last = Path(args["trainer.default_root_dir"]) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    shutil.copy(Path(__file__).parent / f"{args['x']}.ckpt", last)
    """
)


def test_a_maximize_sweep_ranks_the_highest_value_first_and_its_trials_keep_their_highest(tmp_path):
    """goal: maximize (an accuracy) must reach the trials' ModelCheckpoint as mode max, else each trial's best would
    be its lowest accuracy, and the summary must rank the highest first."""
    import torch

    (tmp_path / "copy_fit.py").write_text(COPY_FIT)
    for x in ("0.25", "0.75", "0.5"):
        state = {"monitor": "eval/acc", "best_model_score": torch.tensor(float(x))}
        torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'eval/acc'}": state}}, tmp_path / f"{x}.ckpt")
    config = _grid("0.25", "0.75", "0.5") | {
        "metric": {"name": "eval/acc", "goal": "maximize"},
        "program": str(tmp_path / "copy_fit.py"),
        "command": ["${interpreter}", "${program}", "${args}"],
    }
    out = tmp_path / "sweep"
    summary = run_local(config, name="acc", out=out, count=None, workers=1, storage=None, seed=0, extra=[])
    assert [t["eval/acc"] for t in summary["trials"]] == [0.75, 0.5, 0.25]
    assert summary["best"]["params"] == {"x": "0.75"} and summary["best"]["eval/acc"] == 0.75
    for trial in summary["trials"]:
        command = json.loads((Path(trial["root"]) / "command.json").read_text())
        assert "--checkpoint.mode=max" in command and "--checkpoint.monitor=eval/acc" in command


@pytest.mark.slow  # waits out the 5 s grace on purpose
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_restart_runs_again_the_points_of_dead_workers_not_of_live_ones(tmp_path, monkeypatch):
    """A killed sweep left trials RUNNING: on this machine its pid says it is dead (rerun at once); on another
    machine only a stale heartbeat does (rerun once it is GRACE_S old, not before)."""
    monkeypatch.setattr(lm.sweep, "HEARTBEAT_S", 1)
    # "at once" is a quarter of a second here, but took 1.3 s on a loaded 2-core CI box: the grace is 5 s, so the two
    # cases stay apart by seconds either way
    grace = 5
    monkeypatch.setattr(lm.sweep, "GRACE_S", grace)
    out = tmp_path / "sweep"
    out.mkdir()
    storage = _storage(f"sqlite:///{out / 'optuna.db'}", "--out")
    study = optuna.create_study(study_name="s", storage=storage)
    for x, worker in (("1", None), ("2", f"{_host()}|{os.getpid()}|not-my-start-time"), ("3", "elsewhere|ns|1|1")):
        trial = study.ask()
        trial.set_user_attr("params", {"x": x})
        if worker is None:
            study.tell(trial, 1.0)
            continue
        trial.set_user_attr("worker", worker)
        storage.record_heartbeat(trial._trial_id)

    def fake(argv, root, metric, goal):
        states = {t.number: t.state.name for t in study.get_trials()}
        ran.append((_x(argv), states, time.monotonic() - start))
        return float(_x(argv))

    ran, start = [], time.monotonic()
    summary = run_local(_grid("1", "2", "3"), name="s", out=out, count=None, workers=1, storage=None, seed=0,
                        extra=[], run=fake)  # fmt: skip
    assert [x for x, _, _ in ran] == ["2", "3"]  # the grid's point 1 had completed
    _, states, when = ran[0]
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "RUNNING", 3: "RUNNING"}  # 2 (live) is kept
    assert when < grace / 2  # point 2 at once, without waiting for a stale heartbeat
    assert ran[1][2] >= grace  # point 3 only after its heartbeat went stale
    by_trial = {t["trial"]: t for t in summary["trials"]}
    assert by_trial[1]["state"] == by_trial[2]["state"] == "FAIL" and "worker died" in by_trial[1]["error"]
    assert sorted(t["params"]["x"] for t in summary["trials"] if t["state"] == "COMPLETE") == ["1", "2", "3"]


def test_a_cut_off_grid_point_resumes_from_its_trials_checkpoint(tmp_path):
    """A killed sweep's trial got SIGTERM and saved last.ckpt: the restart resumes that point from it (it used to train
    it again from step 0). A point whose trial failed by itself starts anew, and so does one cut off before saving."""
    out = tmp_path / "sweep"
    out.mkdir()
    storage = _storage(f"sqlite:///{out / 'optuna.db'}", "--out")
    study = optuna.create_study(study_name="s", storage=storage)
    saved = {}
    for x in ("1", "2", "3"):
        trial = study.ask()
        root = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("params", {"x": x})
        trial.set_user_attr("root", str(root))
        if x != "3":  # 3 was cut off before its first checkpoint
            (root / "checkpoints").mkdir(parents=True)
            saved[x] = root / "checkpoints" / "last.ckpt"
            saved[x].write_bytes(b"")
        if x == "2":  # failed by itself: an error of its own, no interruption
            trial.set_user_attr("error", "exit code 1: boom")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:  # its worker died: this process's pid with another start time (see the test above)
            trial.set_user_attr("worker", f"{_host()}|{os.getpid()}|not-my-start-time")
            storage.record_heartbeat(trial._trial_id)

    def fake(argv, root, metric, goal):
        resumed[_x(argv)] = [a.removeprefix("--ckpt_path=") for a in argv if a.startswith("--ckpt_path=")]
        roots[_x(argv)] = root.name
        return 1.0

    resumed, roots = {}, {}
    summary = run_local(_grid("1", "2", "3"), name="s", out=out, count=None, workers=1, storage=None, seed=0,
                        extra=[], run=fake)  # fmt: skip
    assert resumed == {"1": [str(saved["1"])], "2": [], "3": []}
    # in the cut-off trial's folder, where its ModelCheckpoint's best score of the validations before the cut holds
    assert roots["1"] == "trial-0000" and roots["2"] != "trial-0001" and roots["3"] != "trial-0002"
    assert sorted(t["params"]["x"] for t in summary["trials"] if t["state"] == "COMPLETE") == ["1", "2", "3"]


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_a_cut_off_random_or_bayes_trial_resumes_with_its_draw(tmp_path, method):
    """A random/bayes trial cut off after a checkpoint is run again with the same values from that checkpoint, in its
    folder, before any new draw; a trial that failed by itself is not (a new draw replaces it), and a resumed trial
    is not resumed twice."""
    config = _grid() | {"method": method, "parameters": {"x": {"min": 0.0, "max": 1.0}, "c": {"value": 3}}}
    out = tmp_path / "sweep"
    out.mkdir()
    storage = _storage(f"sqlite:///{out / 'optuna.db'}", "--out")
    study = optuna.create_study(study_name="r", storage=storage)
    drawn = {}
    for name in ("cut", "failed"):
        trial = study.ask()
        drawn[name] = suggest(trial, config["parameters"])
        root = out / f"trial-{trial.number:04d}"
        (root / "checkpoints").mkdir(parents=True)
        (root / "checkpoints" / "last.ckpt").write_bytes(b"")
        trial.set_user_attr("params", drawn[name])
        trial.set_user_attr("root", str(root))
        if name == "failed":
            trial.set_user_attr("error", "exit code 1: boom")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:  # its worker died (this process's pid with another start time)
            trial.set_user_attr("worker", f"{_host()}|{os.getpid()}|not-my-start-time")
            storage.record_heartbeat(trial._trial_id)
    runs = []

    def fake(argv, root, metric, goal):
        resume = [a.removeprefix("--ckpt_path=") for a in argv if a.startswith("--ckpt_path=")]
        runs.append((float(_x(argv)), root.name, resume))
        return 1.0

    kwargs = {"name": "r", "out": out, "workers": 1, "storage": None, "seed": 0, "extra": [], "run": fake}
    summary = run_local(config, count=2, **kwargs)
    assert runs[0] == (drawn["cut"]["x"], "trial-0000", [str(out / "trial-0000" / "checkpoints" / "last.ckpt")])
    assert len(runs) == 2 and runs[1][1] not in ("trial-0000", "trial-0001") and not runs[1][2]  # a new draw
    assert runs[1][0] != drawn["failed"]["x"]
    assert [t["state"] for t in summary["trials"]].count("COMPLETE") == 2
    run_local(config, count=3, **kwargs)  # one more trial: a new draw, not the cut-off one again
    assert len(runs) == 3 and not runs[2][2] and runs[2][1] not in {r[1] for r in runs[:2]}


@pytest.fixture
def signal_the_sweep(monkeypatch):
    """SIGTERM to the sweep, returning once its handler has run. A real trial's run returns only after the sweep's
    SIGTERM reached its lm fit; a fake that raised at once raced the handler (which runs in the main thread, the
    trial in a worker's), and under load its trial was not marked as cut off, so it was not resumed."""
    stops = []

    class Recorded(lm.sweep.Stop):
        def __init__(self):
            super().__init__()
            stops.append(self)

    monkeypatch.setattr(lm.sweep, "Stop", Recorded)

    def send():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops[-1].requested.wait(30)

    return send


def test_a_grid_point_stopped_by_a_signal_resumes_on_restart(tmp_path, signal_the_sweep):
    """SIGTERM to the sweep stops the running trial (whose lm fit saves last.ckpt): started again, the sweep resumes
    that point from the checkpoint; the points that had not started run from scratch."""
    calls = []

    def stopped(argv, root, metric, goal):
        calls.append(argv)
        (root / "checkpoints").mkdir(parents=True)
        (root / "checkpoints" / "last.ckpt").write_bytes(b"")  # what lm fit writes on SIGTERM
        signal_the_sweep()  # the sweep's handler asks every trial to stop
        raise lm.sweep.TrialFailed("stopped by SIGTERM (exit code 0)")

    kwargs = {"name": "g", "out": tmp_path, "count": None, "workers": 1, "storage": None, "seed": 0, "extra": []}
    with pytest.raises(LMError, match="stopped by SIGTERM"):
        run_local(_grid("1", "2"), run=stopped, **kwargs)
    first = _x(calls[0])
    checkpoint = tmp_path / "trial-0000" / "checkpoints" / "last.ckpt"

    def finish(argv, root, metric, goal):
        resumed[_x(argv)] = [a for a in argv if a.startswith("--ckpt_path=")]
        if resumed[_x(argv)]:
            assert root == checkpoint.parent.parent
        return 1.0

    resumed = {}
    run_local(_grid("1", "2"), run=finish, **kwargs)
    assert resumed == {first: [f"--ckpt_path={checkpoint}"], {"1": "2", "2": "1"}[first]: []}


def test_count_holds_for_random_sweeps_and_a_failed_trial_is_replaced_on_restart(tmp_path, capsys):
    config = _grid() | {"method": "random", "parameters": {"x": {"min": 0.0, "max": 1.0}}}
    calls = []

    def fake(argv, root, metric, goal):
        calls.append(root.name)
        if len(calls) == 2:
            raise lm.sweep.TrialFailed("boom")
        time.sleep(0.2)  # the other workers look for work meanwhile
        return 1.0

    kwargs = {"name": "r", "out": tmp_path, "storage": None, "seed": 0, "extra": []}
    summary = run_local(config, count=3, workers=4, run=fake, **kwargs)
    assert len(calls) == 3 and [t["state"] for t in summary["trials"]].count("FAIL") == 1  # not replaced in this run
    # ... which the sweep says, rather than end short without a word
    short = "lm sweep: 2 of 3 trials completed; 1 failed in this run (their logs are above): start the same command"
    assert short in capsys.readouterr().out
    summary = run_local(config, count=3, workers=4, run=fake, **kwargs)
    assert len(calls) == 4  # ... but when started again: 3 completed, as --count says
    assert [t["state"] for t in summary["trials"]].count("COMPLETE") == 3
    assert "trials completed;" not in capsys.readouterr().out


def test_workers_run_each_grid_point_once(tmp_path):
    ran = []

    def fake(argv, root, metric, goal):
        ran.append(_x(argv))
        time.sleep(0.2)
        return 1.0

    run_local(_grid("a", "b", "c"), name="g", out=tmp_path, count=None, workers=5, storage=None, seed=0, extra=[],
              run=fake)  # fmt: skip
    assert sorted(ran) == ["a", "b", "c"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_sweeps_sharing_a_storage_run_each_grid_point_once(tmp_path, monkeypatch):
    """Two sweeps started at once on one study (two machines, a SLURM array): no point twice, none left out."""
    monkeypatch.setattr(lm.sweep, "HEARTBEAT_S", 1)  # one waits for the other's last trial: check every second
    ran = []

    def fake(argv, root, metric, goal):
        ran.append(_x(argv))
        time.sleep(0.1)
        return 1.0

    config, storage = _grid("a", "b", "c", "d"), f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(study_name="g", storage=storage)  # as the first of them would

    def sweep(i):
        run_local(config, name="g", out=tmp_path / str(i), count=None, workers=2, storage=storage, seed=0, extra=[],
                  run=fake)  # fmt: skip

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == ["a", "b", "c", "d"]
    summary = lm.sweep.summarize(optuna.load_study(study_name="g", storage=storage), config, tmp_path)
    assert sorted(t["params"]["x"] for t in summary["trials"]) == ["a", "b", "c", "d"]  # lost claims not shown


def test_summary_shows_the_values_the_trial_ran_with(tmp_path):
    """q_log_uniform_values rounds Optuna's draw to q: the table shows the rounded value lm fit got."""
    x = {"distribution": "q_log_uniform_values", "min": 8, "max": 128, "q": 8}
    config = _grid() | {"method": "random", "parameters": {"x": x}}
    ran = {}

    def fake(argv, root, metric, goal):
        ran[str(root)] = int(_x(argv))
        return 1.0

    summary = run_local(config, name="q", out=tmp_path, count=3, workers=1, storage=None, seed=0, extra=[], run=fake)
    assert {t["root"]: t["params"]["x"] for t in summary["trials"]} == ran
    assert json.loads((tmp_path / "summary.json").read_text())["trials"][0]["params"]["x"] % 8 == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--storage", "foo://bar"], "--storage: cannot open the Optuna storage foo://bar"),
        (["--storage", "sqlite:////nonexistent/dir/x.db"], "--storage: cannot open .*/nonexistent/dir/x.db"),
        (["--storage", "postgresql://me:secret@127.0.0.1:1/db"], r"postgresql://me:\*\*\*@"),  # no password shown
        (["--out", "{file}/sweep"], "cannot write .*/file/sweep: Not a directory"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),  # it ran one worker
        (["--count", "0"], "--count must be at least 1, got 0"),
    ],
)
def test_bad_storage_or_out_is_a_one_line_error(tmp_path, flags, message):
    (tmp_path / "file").write_text("")
    flags = [f.format(file=tmp_path / "file") for f in flags]
    path = _write(tmp_path, _grid("1"))
    with pytest.raises(LMError, match=message):
        main(["sweep", str(path), "--local", "--out", str(tmp_path / "out"), *flags, "--debug"])


SLOW_FIT = textwrap.dedent(
    """
    # Stands in for a long `lm fit`: says it started, notes a SIGTERM (lm fit saves a checkpoint then) and exits.
    import signal, sys, time
    from pathlib import Path
    root = Path(next(a for a in sys.argv if a.startswith("--trainer.default_root_dir=")).split("=", 1)[1])
    signal.signal(signal.SIGTERM, lambda *_: (root.joinpath("sigterm").write_text(""), sys.exit(143)))
    root.joinpath("pid").write_text(str(__import__("os").getpid()))
    time.sleep(60)
    """
)


# `lm sweep` as lm.__main__ runs it, without the 7 s (on 2 cores) of importing Lightning that `python -m lm` costs
SWEEP_MAIN = """
import sys
from lm.errors import LMError
from lm.sweep import sweep_command
try:
    sweep_command(sys.argv[1:])
except LMError as e:
    sys.exit(f"error: {e}")
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_running_trial_and_the_sweep_with_one_line(tmp_path, sig):
    (tmp_path / "slow_fit.py").write_text(SLOW_FIT)
    config = _grid("1", "2") | {
        "program": str(tmp_path / "slow_fit.py"),
        "command": ["${interpreter}", "${program}", "${args}"],
    }
    out = tmp_path / "sweep"
    sweep = subprocess.Popen(
        [sys.executable, "-c", SWEEP_MAIN, str(_write(tmp_path, config)), "--local", "--out", str(out)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_file = out / "trial-0000" / "pid"
    try:
        for _ in range(300):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.1)
        sweep.send_signal(sig)
        stdout, stderr = sweep.communicate(timeout=30)
    finally:
        sweep.kill()
        if pid_file.is_file():
            with pytest.raises(ProcessLookupError):  # the trial's process is gone: no orphan
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert sweep.returncode == 1, stderr  # sys.exit(message); lm.__main__ exits 2 on an LMError
    assert stderr.strip() == f"error: sweep sweep stopped by {sig.name}: start the same command again to finish it"
    assert (out / "trial-0000" / "sigterm").is_file()  # lm fit got SIGTERM, so it saved a checkpoint
    trials = json.loads((out / "summary.json").read_text())["trials"]
    assert [(t["state"], t["error"].split(" (")[0]) for t in trials] == [("FAIL", f"stopped by {sig.name}")]


def test_wandb_sweep_without_api_key_is_a_one_line_error(tmp_path):
    env = cli_env(HOME=str(tmp_path), WANDB_API_KEY="", NETRC=str(tmp_path / "none"))
    env.pop("WANDB_MODE")
    env.pop("WANDB_API_KEY")
    result = subprocess.run(
        [sys.executable, "-m", "lm", "sweep", str(REPO / "sweeps" / "debug.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: W&B sweeps need a W&B account: no API key found")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_wandb_sweep_is_named_like_a_local_one(tmp_path, monkeypatch):
    """W&B got `name: null` for a file without a name; it is now the file's stem, or --name, as for --local."""
    import wandb

    sent = []
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr("lm.__main__._wandb_logged_in", lambda: True)
    monkeypatch.setattr(wandb, "sweep", lambda sweep, project, entity: sent.append((sweep, project)) or "abc")
    monkeypatch.setattr(wandb, "agent", lambda *args, **kwargs: None)
    config = yaml.safe_load((REPO / "sweeps" / "debug.yaml").read_text())
    config.pop("name", None)
    path = tmp_path / "lr_grid.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["sweep", str(path)])
    main(["sweep", str(path), "--name", "mine", "--project", "p"])
    assert [(sweep["name"], project) for sweep, project in sent] == [("lr_grid", "lm-debug"), ("mine", "p")]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "4"], "--workers only applies to --local sweeps"),  # it ran one agent
        (["--out", "o"], "--out only applies to --local sweeps"),
        (["--seed", "1"], "--seed only applies to --local sweeps"),
        (["--max_initial_failures", "0"], "--max_initial_failures only applies to --local sweeps"),
        (["--local", "--project", "p"], "--project only applies to W&B sweeps"),  # trials logged to the experiment's
        (["--local", "--entity", "e"], "--entity only applies to W&B sweeps"),
    ],
)
def test_a_flag_of_the_other_mode_is_refused_not_ignored(tmp_path, monkeypatch, capsys, flags, message):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr("lm.__main__._wandb_logged_in", lambda: True)
    monkeypatch.setattr(wandb, "sweep", lambda *args, **kwargs: pytest.fail("a W&B sweep was created"))
    monkeypatch.setattr(lm.sweep, "run_local", lambda *args, **kwargs: pytest.fail("a local sweep ran"))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(_write(tmp_path, _grid("1"))), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), err


@pytest.mark.slow
def test_local_grid_sweep_of_the_debug_experiment(tmp_path, monkeypatch, capsys):
    """sweeps/debug.yaml as shipped (2 lr x 2 batch sizes), cut to 10 steps; stopped after 2 trials and resumed."""
    monkeypatch.chdir(REPO)  # the sweep's command names experiments/debug.yaml relative to the checkout, like W&B's
    out = tmp_path / "sweep"
    short = ["--", "--trainer.max_steps", "10", "--trainer.val_check_interval", "10", "--data.init_args.val_windows"]
    short += ["16", "--samples.max_new_tokens", "0", "--seed_everything", "0"]
    sweep = ["sweep", str(REPO / "sweeps" / "debug.yaml"), "--local", "--out", str(out), "--workers", "2"]

    main([*sweep, "--count", "2", *short])  # a sweep stopped half way ...
    assert len(json.loads((out / "summary.json").read_text())["trials"]) == 2
    main([*sweep, *short])  # ... resumes the same study and finishes the grid
    printed = capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    trials = summary["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 4, [t.get("error") for t in trials]
    grid = {(t["params"]["model.init_args.lr"], t["params"]["data.init_args.batch_size"]) for t in trials}
    assert grid == {(1e-3, 4), (1e-3, 8), (3e-3, 4), (3e-3, 8)}
    best = min(trials, key=lambda t: t["val/loss"])
    assert summary["best"] == best and best["val/loss"] < 4.2  # the char vocab's uniform loss is ~4.4
    assert f"best: trial {best['trial']}" in printed
    assert sorted(p.name for p in out.glob("trial-*")) == [f"trial-{i:04d}" for i in range(4)]
    assert list(Path(best["root"]).glob("wandb/offline-run-*"))  # each trial logs to W&B offline


def test_a_sweep_command_that_is_not_found_is_one_line(tmp_path):
    with pytest.raises(LMError, match="the sweep's command 'lm-no-such-command' is not found"):
        lm.sweep.run_trial(["lm-no-such-command", "fit"], tmp_path / "trial-0000", "val/loss", "minimize")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("command", ["lm", "launcher"])
def test_a_trial_gets_sigterm_when_the_sweep_is_killed(tmp_path, command):
    """SIGKILL cannot be caught and forwarded: the trial's process asks the kernel for SIGTERM on the sweep's death
    instead (lm fit then saves a checkpoint and exits, as on a preemption), rather than run on as an orphan. lm used to
    ask for it itself, so a launcher's trial (torchrun, srun) trained on beside the restarted sweep's resume of the
    same folder; the request now comes before the command starts, whatever it is: here a Python trial, and a bash one
    standing for a launcher."""
    marker = tmp_path / "trial got SIGTERM"
    if command == "lm":
        code = (
            "import os, signal, sys, time\n"
            f"signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, 'w').close(), sys.exit(0)))\n"
            "print(os.getpid(), flush=True)\n"
            "time.sleep(60)\n"
        )
        trial = [sys.executable, "-c", code]
    else:
        trial = [
            "bash",
            "-c",
            f'trap "touch {shlex.quote(str(marker))}; exit 0" TERM; echo $$; while :; do sleep 0.1; done',
        ]
    sweep = (  # starts the trial as run_trial does, from a thread that waits for it
        "import subprocess, sys, threading\n"
        "from lm.sweep import start_trial\n"
        "def run():\n"
        f"    child = start_trial({trial!r}, stdout=subprocess.PIPE, text=True, start_new_session=True)\n"
        "    print(child.stdout.readline().strip(), flush=True)\n"
        "    child.wait()\n"
        "threading.Thread(target=run).start()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", sweep], stdout=subprocess.PIPE, text=True, cwd=REPO)
    trial_pid = int(parent.stdout.readline())
    try:
        time.sleep(0.5)
        assert not marker.exists()  # a living sweep sends nothing
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(trial_pid, signal.SIGKILL)  # no orphan left by a failure either


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_sweep_edited_to_another_metric_or_goal_does_not_join_the_old_study(tmp_path):
    """Optuna ignores `direction` when it loads a study: the edited sweep counted and ranked the old trials' val/loss
    values as eval/acc, and went on minimising."""
    out = tmp_path / "sweep"
    kwargs = {"name": "s", "out": out, "count": None, "workers": 1, "storage": None, "seed": 0, "extra": []}
    run_local(_grid("1", "2"), run=lambda argv, root, metric, goal: float(_x(argv)), **kwargs)
    for metric, goal in (("eval/acc", "maximize"), ("eval/acc", "minimize"), ("val/loss", "maximize")):
        config = _grid("1", "2") | {"metric": {"name": metric, "goal": goal}}
        with pytest.raises(LMError, match=r"study 's' was run for val/loss \(minimize\), this sweep asks for"):
            run_local(config, run=lambda argv, root, metric, goal: 0.0, **kwargs)
    summary = run_local(_grid("1", "2"), run=lambda argv, root, metric, goal: 0.0, **kwargs)  # the same: it joins
    assert summary["best"]["params"] == {"x": "1"}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_cut_off_bayes_trial_resumes_with_its_draw_also_once_tpe_samples_jointly(tmp_path):
    """After 10 completed trials TPE samples all parameters jointly (sample_relative), past the replay of
    sample_independent: the resumed trial ran in the old folder, from the old checkpoint, with a new draw."""
    params = {"x": {"min": 0.0, "max": 1.0}, "b": {"values": [16, 32, 64]}}
    config = _grid() | {"method": "bayes", "parameters": params}
    out = tmp_path / "sweep"
    out.mkdir()
    storage = _storage(f"sqlite:///{out / 'optuna.db'}", "--out")
    # seed 1, not run_local's 0: with the same seed and history TPE would draw the cut trial's values again by chance
    study = optuna.create_study(study_name="b", storage=storage, sampler=lm.sweep.make_sampler(config, 1))
    for _ in range(10):
        trial = study.ask()
        trial.set_user_attr("params", suggest(trial, params))
        study.tell(trial, trial.params["x"])
    trial = study.ask()
    cut = suggest(trial, params)
    root = out / f"trial-{trial.number:04d}"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(b"")
    trial.set_user_attr("params", cut)
    trial.set_user_attr("root", str(root))
    trial.set_user_attr("worker", f"{_host()}|{os.getpid()}|not-my-start-time")  # its worker died
    storage.record_heartbeat(trial._trial_id)
    runs = []

    def fake(argv, root, metric, goal):
        values = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--") and "=" in a}
        runs.append((values, root.name))
        return 1.0

    run_local(config, name="b", out=out, count=11, workers=1, storage=None, seed=0, extra=[], run=fake)
    (values, folder), *_ = runs
    assert folder == root.name and values["--ckpt_path"] == str(root / "checkpoints" / "last.ckpt")
    assert (float(values["--x"]), int(values["--b"])) == (cut["x"], cut["b"])


def test_a_second_study_in_the_same_out_is_refused(tmp_path):
    """Trial folders are numbered per study: another --name in the same --out wrote into the first study's folders,
    and could resume from its checkpoints."""
    kwargs = {"out": tmp_path, "count": None, "workers": 1, "storage": None, "seed": 0, "extra": []}
    run_local(_grid("1"), name="a", run=lambda argv, root, metric, goal: 1.0, **kwargs)
    with pytest.raises(LMError, match="holds the trials of study 'a'; give study 'b' another --out"):
        run_local(_grid("1"), name="b", run=lambda argv, root, metric, goal: 1.0, **kwargs)
    run_local(_grid("1", "2"), name="a", run=lambda argv, root, metric, goal: 1.0, **kwargs)  # the same study joins


def test_a_grid_extended_since_the_study_began_runs_its_new_points(tmp_path):
    ran = []
    kwargs = {"name": "g", "out": tmp_path, "count": None, "workers": 1, "storage": None, "seed": 0, "extra": []}
    run_local(_grid("1", "2"), run=lambda argv, root, metric, goal: ran.append(_x(argv)) or 1.0, **kwargs)
    summary = run_local(
        _grid("1", "2", "3"), run=lambda argv, root, metric, goal: ran.append(_x(argv)) or 1.0, **kwargs
    )
    assert sorted(ran[:2]) == ["1", "2"] and ran[2:] == ["3"]  # it was Optuna's "dynamic value space" traceback
    assert sorted(t["params"]["x"] for t in summary["trials"] if t["state"] == "COMPLETE") == ["1", "2", "3"]


def test_a_grid_value_replaced_since_the_study_began_runs_its_new_points(tmp_path):
    """The points already run that the grid no longer holds took the new points' places in the count: the sweep said
    done without running them."""
    ran = []
    kwargs = {"name": "g", "out": tmp_path, "count": None, "workers": 1, "storage": None, "seed": 0, "extra": []}
    record = lambda argv, root, metric, goal: ran.append(_x(argv)) or 1.0  # noqa: E731
    run_local(_grid("1", "2"), run=record, **kwargs)
    run_local(_grid("1", "3"), run=record, **kwargs)
    summary = run_local(_grid("1", "3", "4"), run=record, **kwargs)
    assert sorted(ran[:2]) == ["1", "2"] and ran[2:] == ["3", "4"]
    assert sorted(t["params"]["x"] for t in summary["trials"]) == ["1", "2", "3", "4"]  # 2 ran, and is kept


def test_a_grid_sweep_stops_at_its_run_cap(tmp_path):
    ran = []
    kwargs = {"name": "g", "out": tmp_path, "count": None, "workers": 1, "storage": None, "seed": 0, "extra": []}
    run_local(_grid("1", "2", "3") | {"run_cap": 2}, run=lambda argv, *_: ran.append(_x(argv)) or 1.0, **kwargs)
    assert len(ran) == 2


def test_a_trial_does_not_inherit_the_caller_s_wandb_run(tmp_path, monkeypatch):
    """slurm/train.sbatch exports WANDB_RUN_ID: a sweep started from such a job had every trial log to that run."""
    monkeypatch.setenv("WANDB_RUN_ID", "lm-1234")
    monkeypatch.setenv("WANDB_RESUME", "allow")
    monkeypatch.setenv("WANDB_PROJECT", "kept")
    script = "import json, os; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('WANDB_')}))"
    with pytest.raises(lm.sweep.TrialFailed):  # the script writes no checkpoint: the trial fails, its log stays
        lm.sweep.run_trial([sys.executable, "-c", script], tmp_path, "val/loss", "minimize")
    env = json.loads((tmp_path / "trial.log").read_text().splitlines()[0])
    assert "WANDB_RUN_ID" not in env and "WANDB_RESUME" not in env and env["WANDB_PROJECT"] == "kept"


def test_a_command_that_cannot_run_is_refused_when_the_file_is_read(tmp_path):
    """A ${program} with no program was found when the first trial started, which it left RUNNING in the study."""
    config = _grid("1") | {"command": ["${interpreter}", "${program}", "${args}"]}
    with pytest.raises(LMError, match=r"sweep.yaml: the sweep's command uses \$\{program\} but the file sets no"):
        load_sweep(_write(tmp_path, config))
    with pytest.raises(LMError, match=r"\$\{args_json\} is not supported"):
        load_sweep(_write(tmp_path, config | {"command": ["lm", "fit", "${args}", "${args_json}"]}))
    del config["command"]  # W&B's default command runs ${program}
    with pytest.raises(LMError, match="sets no program"):
        load_sweep(_write(tmp_path, config))


def test_lm_sweep_local_without_optuna_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna then raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(_write(tmp_path, _grid("1"))), "--local", "--out", str(tmp_path / "s")])
    assert e.value.code == 2
    assert capsys.readouterr().err == 'error: lm sweep --local needs optuna: pip install "lm[sweep]"\n'


def test_random_bounds_changed_since_the_study_began_are_a_one_line_error_and_leave_no_trial_running(tmp_path):
    config = _grid() | {"method": "random", "parameters": {"x": {"values": [1, 2]}}}
    kwargs = {"name": "r", "out": tmp_path, "count": 1, "workers": 1, "storage": None, "seed": 0, "extra": []}
    run_local(config, run=lambda argv, root, metric, goal: 1.0, **kwargs)
    config["parameters"]["x"]["values"] = [1, 2, 3]
    with pytest.raises(LMError, match="drew its parameters from other values or bounds.*another --out"):
        run_local(config, run=lambda argv, root, metric, goal: 1.0, **kwargs | {"count": 2})
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL"]


def test_a_resumed_grid_point_that_then_fails_by_itself_starts_anew(tmp_path, signal_the_sweep):
    """Cut off, resumed, then crashed (writing its crash checkpoint into the same folder): every restart resumed the
    point from that crash checkpoint instead of training it anew."""
    kwargs = {"name": "g", "out": tmp_path, "count": None, "workers": 1, "storage": None, "seed": 0, "extra": []}
    checkpoint = tmp_path / "trial-0000" / "checkpoints" / "last.ckpt"
    resumes = []

    def cut_off(argv, root, metric, goal):
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"")
        signal_the_sweep()
        raise lm.sweep.TrialFailed("stopped by SIGTERM (exit code 0)")

    def crash(argv, root, metric, goal):
        resumes.append([a for a in argv if a.startswith("--ckpt_path=")])
        raise lm.sweep.TrialFailed("exit code 3: non-finite loss")  # its last.ckpt, saved on the exception, stays

    def finish(argv, root, metric, goal):
        resumes.append([a for a in argv if a.startswith("--ckpt_path=")])
        return 1.0

    with pytest.raises(LMError, match="stopped by SIGTERM"):
        run_local(_grid("1"), run=cut_off, **kwargs)
    assert run_local(_grid("1"), run=crash, **kwargs)["best"] is None
    run_local(_grid("1"), run=finish, **kwargs)
    assert resumes == [[f"--ckpt_path={checkpoint}"], []]


def test_wandb_sweep_takes_project_and_entity_from_the_file(tmp_path, monkeypatch):
    import wandb

    import lm.__main__

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(lm.__main__, "_wandb_logged_in", lambda: True)
    calls = {}
    monkeypatch.setattr(
        wandb, "sweep", lambda sweep, project=None, entity=None: calls.update(sweep=(project, entity)) or "id1"
    )
    monkeypatch.setattr(
        wandb, "agent", lambda sweep_id, project=None, entity=None, count=None: calls.update(agent=(project, entity))
    )
    config = _grid("1") | {"project": "my-proj", "entity": "my-team", "command": ["lm", "fit", "${args}"]}
    main(["sweep", str(_write(tmp_path, config))])
    assert calls == {"sweep": ("my-proj", "my-team"), "agent": ("my-proj", "my-team")}  # it was lm-sweeps, no entity
    main(["sweep", str(_write(tmp_path, config)), "--project", "other"])
    assert calls["sweep"] == ("other", "my-team")  # the flag wins


def test_a_sweep_whose_first_trials_all_fail_stops_instead_of_failing_every_point(tmp_path):
    """A typo or a missing data file fails every trial alike: the sweep had started all 9 points of a grid, each an
    `lm fit` start-up, before saying that none finished. It stops after the first 3 failures when none completed."""
    ran = []

    def failing(argv, root, metric, goal):
        ran.append(_x(argv))
        raise lm.sweep.TrialFailed("exit code 2: error: data source 'data/x.txt': no such file")

    kwargs = {"count": None, "workers": 1, "storage": None, "seed": 0, "extra": []}
    with pytest.raises(LMError, match=r"first 3 trials to end failed, the last with exit code 2: error: data source"):
        run_local(_grid(*"abcdefgh"), name="a", out=tmp_path / "a", run=failing, **kwargs)
    assert len(ran) == 3
    assert [t["state"] for t in json.loads((tmp_path / "a" / "summary.json").read_text())["trials"]] == ["FAIL"] * 3
    # 0 goes on through every point
    summary = run_local(_grid(*"abcdefgh"), name="b", out=tmp_path / "b", run=failing, max_initial_failures=0, **kwargs)
    assert len(ran) == 3 + 8 and summary["best"] is None

    # once a trial has completed, later failures are the points' own: the sweep goes on
    completed = []

    def first_completes(argv, root, metric, goal):
        if not completed:
            completed.append(_x(argv))
            return 1.0
        failing(argv, root, metric, goal)

    summary = run_local(_grid(*"abcdefgh"), name="c", out=tmp_path / "c", run=first_completes, **kwargs)
    assert [t["state"] for t in summary["trials"]].count("FAIL") == 7

    # a trial still running when the third failure ends is let finish (not cut off), and counts in the summary
    started = []

    def first_is_slow(argv, root, metric, goal):
        with lock:
            first = not started
            started.append(_x(argv))
        if first:
            time.sleep(1.0)  # the other worker's three failures end meanwhile
            return 1.0
        failing(argv, root, metric, goal)

    lock = threading.Lock()
    with pytest.raises(LMError, match="no new trial was started"):
        run_local(_grid(*"abcdefgh"), name="d", out=tmp_path / "d", run=first_is_slow, **{**kwargs, "workers": 2})
    trials = json.loads((tmp_path / "d" / "summary.json").read_text())["trials"]
    assert sorted(t["state"] for t in trials) == ["COMPLETE", "FAIL", "FAIL", "FAIL"] and len(started) == 4


def test_q_log_uniform_values_rounds_a_draw_below_half_q_up_to_q_never_to_0():
    """With min below q/2, a draw near min rounds to 0 multiples of q: lm fit would get n_embd=0 (or lr=0.0) instead
    of the smallest step, q."""
    n = {"distribution": "q_log_uniform_values", "min": 1, "max": 512, "q": 32}
    lr = {"distribution": "q_log_uniform_values", "min": 0.01, "max": 1.0, "q": 0.5}
    p = suggest(optuna.trial.FixedTrial({"n": 3.0, "lr": 0.02}), {"n": n, "lr": lr})
    assert p == {"n": 32, "lr": 0.5} and isinstance(p["n"], int)
    assert suggest(optuna.trial.FixedTrial({"n": 40.0, "lr": 0.8}), {"n": n, "lr": lr}) == {"n": 32, "lr": 1.0}


def test_min_max_without_a_distribution_is_int_uniform_only_when_both_bounds_are_ints():
    """W&B infers int_uniform when min and max are both ints, else uniform: {min: 1, max: 2.5} drew only 1 or 2."""
    infer = lm.sweep._distribution
    assert [infer({"min": 1, "max": 3}), infer({"min": 1, "max": 2.5}), infer({"min": 1.5, "max": 3})] == [
        "int_uniform",
        "uniform",
        "uniform",
    ]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    p = suggest(trial, {"f": {"min": 1, "max": 2.5}, "i": {"min": 1, "max": 3}})
    assert trial.distributions == {"f": FloatDistribution(1.0, 2.5), "i": IntDistribution(1, 3)}
    assert isinstance(p["f"], float) and isinstance(p["i"], int) and p["i"] in (1, 2, 3)


def test_a_restarted_random_sweep_starts_at_most_count_minus_its_completed_trials(tmp_path):
    """Failed trials do not count, so a trial that always crashes would be started again and again: a run starts at
    most --count minus the trials completed before it (2 done of 5: 3 starts, not 5)."""
    config = _grid() | {"method": "random", "parameters": {"x": {"min": 0.0, "max": 1.0}}}
    kwargs = {"name": "r", "out": tmp_path, "workers": 1, "storage": None, "seed": 0, "extra": []}
    run_local(config, count=2, run=lambda argv, root, metric, goal: 1.0, **kwargs)
    crashed = []

    def crash(argv, root, metric, goal):
        crashed.append(root.name)
        raise lm.sweep.TrialFailed("exit code 1: boom")

    summary = run_local(config, count=5, run=crash, max_initial_failures=0, **kwargs)
    assert crashed == ["trial-0002", "trial-0003", "trial-0004"]
    assert sorted(t["state"] for t in summary["trials"]) == ["COMPLETE"] * 2 + ["FAIL"] * 3


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_cut_off_trial_named_by_a_trial_dropped_for_a_lost_claim_still_resumes(tmp_path):
    """A worker that lost its claim drops its trial, which may already name the cut-off trial it was to resume: that
    trial never ran, so the cut-off one is still resumed, not given up for a new draw."""
    config = _grid() | {"method": "random", "parameters": {"x": {"min": 0.0, "max": 1.0}}}
    out = tmp_path / "sweep"
    out.mkdir()
    storage = _storage(f"sqlite:///{out / 'optuna.db'}", "--out")
    study = optuna.create_study(study_name="r", storage=storage)
    trial = study.ask()
    cut = suggest(trial, config["parameters"])
    last = out / "trial-0000" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    trial.set_user_attr("params", cut)
    trial.set_user_attr("root", str(last.parent.parent))
    trial.set_user_attr("worker", f"{_host()}|{os.getpid()}|not-my-start-time")  # its worker died
    storage.record_heartbeat(trial._trial_id)
    lost = study.ask()  # another worker's resume of trial 0, dropped: a lower-numbered trial took the last place
    lost.set_user_attr("params", suggest(lost, config["parameters"]))
    lost.set_user_attr("resumes_trial", 0)
    lost.set_user_attr("dropped", "another worker took this point or the last place in --count")
    study.tell(lost, state=optuna.trial.TrialState.FAIL)
    runs = []

    def fake(argv, root, metric, goal):
        runs.append((float(_x(argv)), root.name, [a for a in argv if a.startswith("--ckpt_path=")]))
        return 1.0

    run_local(config, name="r", out=out, count=1, workers=1, storage=None, seed=0, extra=[], run=fake)
    assert runs == [(cut["x"], "trial-0000", [f"--ckpt_path={last}"])]


@pytest.mark.parametrize("method", ["grid", "random", "bayes"])
def test_a_list_value_as_betas_takes_runs_in_every_method(tmp_path, method):
    """A grid with a list value (`betas: {value: [0.9, 0.95]}`) crashed on an unhashable list, and a list among
    `values` was refused, where W&B takes any JSON value and betas is a list argument of lm's."""
    config = {
        "method": method,
        "metric": {"name": "val/loss"},
        "parameters": {
            "x": {"values": ["1", "2"]},
            "betas": {"values": [[0.9, 0.95], [0.9, 0.99]]},
            "fixed": {"value": [1, 2]},
        },
        "command": ["lm", "${args}"],
    }
    load_sweep(_write(tmp_path, config))  # accepted
    ran = []
    kwargs = {"name": "l", "out": tmp_path / "out", "workers": 1, "storage": None, "seed": 0, "extra": []}
    summary = run_local(config, count=4, run=lambda argv, *_: ran.append(argv) or 1.0, **kwargs)
    betas = [next(a for a in argv if a.startswith("--betas=")) for argv in ran]
    assert len(ran) == 4 and set(betas) <= {"--betas=[0.9, 0.95]", "--betas=[0.9, 0.99]"}
    assert all("--fixed=[1, 2]" in argv for argv in ran)
    assert all(t["params"]["betas"] in ([0.9, 0.95], [0.9, 0.99]) for t in summary["trials"])
    if method == "grid":  # every point once
        assert len({(_x(argv), b) for argv, b in zip(ran, betas, strict=True)}) == 4


def test_an_argument_after_the_separator_that_is_a_swept_parameter_is_refused(tmp_path, capsys):
    """It came after the swept values, so every trial ran it while the summary reported the swept ones."""
    path = _write(tmp_path, _grid("1", "2") | {"parameters": {"model.init_args.lr": {"values": [1e-3, 3e-3]}}})
    for extra in (["--model.init_args.lr", "0.05"], ["--model.init_args.lr=0.05"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", str(path), "--local", "--out", str(tmp_path / "o"), "--", *extra])
        assert exit_info.value.code == 2
        assert "--model.init_args.lr after `--` is a parameter of the sweep" in capsys.readouterr().err


def test_run_cap_bounds_a_random_sweep_whatever_its_count_and_target_is_said_to_be_ignored(tmp_path, capsys):
    config = _grid() | {"method": "random", "run_cap": 2, "parameters": {"x": {"min": 0.0, "max": 1.0}}}
    config["metric"] = {"name": "val/loss", "target": 0.5}
    ran = []
    kwargs = {"name": "c", "out": tmp_path, "workers": 1, "storage": None, "seed": 0, "extra": []}
    run_local(config, count=5, run=lambda argv, *_: ran.append(argv) or 1.0, **kwargs)
    assert len(ran) == 2
    assert "lm sweep: metric.target is ignored by local sweeps" in capsys.readouterr().out


def test_each_trial_s_wandb_run_is_named_after_the_trial_and_an_agent_s_after_nothing(tmp_path, monkeypatch):
    """Every trial's W&B run carried the experiment's name (debug.yaml's `debug`): indistinguishable after a sync,
    and on the W&B server every agent run named alike."""
    import lm.__main__ as cli

    class Built(cli.LMCLI):
        def _run_subcommand(self, subcommand):
            pass

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    fit = ["fit", "--config", str(REPO / "experiments" / "debug.yaml")]
    assert Built(args=fit).trainer.logger._wandb_init["name"] == "debug"  # the experiment's, outside a sweep
    monkeypatch.setenv(lm.sweep.SWEEP_TRIAL, "lr-trial-0003")
    assert Built(args=fit).trainer.logger._wandb_init["name"] == "lr-trial-0003"
    monkeypatch.delenv(lm.sweep.SWEEP_TRIAL)
    monkeypatch.setenv("WANDB_SWEEP_ID", "s1")
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    assert Built(args=fit).trainer.logger._wandb_init.get("name") is None  # W&B names the agent's run


# ---- seeds, parameter sets, concurrent storage creation, launcher variables, W&B agent stops ------------------------


def _recorded_x(argv: list[str], root: Path, metric: str, goal: str) -> float:
    return float(_x(argv))


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_a_seeded_sweep_started_again_draws_new_values_not_the_same_ones_again(tmp_path, method):
    """--seed seeded one sampler per process: a restarted sweep (or a second process on the same study, same command)
    drew the first run's values again, so trials 2 and 3 repeated trials 0 and 1."""
    config = _grid() | {"method": method, "parameters": {"x": {"min": 0.0, "max": 1.0}}}
    kwargs = {"name": "s", "out": tmp_path, "workers": 1, "storage": None, "seed": 0, "extra": [], "run": _recorded_x}
    run_local(config, count=2, **kwargs)
    summary = run_local(config, count=4, **kwargs)
    xs = [t["params"]["x"] for t in sorted(summary["trials"], key=lambda t: t["trial"])]
    assert len(xs) == 4 and len(set(xs)) == 4, xs
    # still reproducible: the same seed gives the same values trial for trial in a new study
    again = run_local(config, count=4, **(kwargs | {"out": tmp_path / "again"}))
    assert [t["params"]["x"] for t in sorted(again["trials"], key=lambda t: t["trial"])] == xs


def test_a_sweep_with_other_parameters_does_not_join_the_old_study(tmp_path):
    """A copied sweep file that kept `name:` (same study, same --out) but sweeps another parameter ran no trial (the
    old ones filled --count) and reported the old sweep's best as its own, with its parameter as None."""
    old = _grid() | {"method": "random", "parameters": {"x": {"min": 0.0, "max": 1.0}}}
    kwargs = {"name": "exp", "out": tmp_path, "count": 2, "workers": 1, "storage": None, "seed": 0, "extra": []}
    run_local(old, run=_recorded_x, **kwargs)
    new = old | {"parameters": {"y": {"min": 5.0, "max": 6.0}}}
    with pytest.raises(LMError, match=r"parameters .*'x'.*'y'|parameters .*x.*y"):
        run_local(new, run=lambda *a: pytest.fail("a trial of the new sweep ran in the old study"), **kwargs)


def _open_storage_at(url: str, start: float, results) -> None:
    time.sleep(max(0.0, start - time.time()))
    try:
        _storage(url, "--out x")
        results.put("ok")
    except LMError as e:
        results.put(str(e))


def test_workers_started_together_on_a_new_sqlite_study_all_open_it(tmp_path):
    """A job array starts its workers at the same moment: all but one failed with `cannot open the Optuna storage
    (UNIQUE constraint failed: alembic_version.version_num)` while the first one created the schema."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'optuna-{round_}.db'}"
        results = ctx.Queue()
        start = time.time() + 1.5
        procs = [ctx.Process(target=_open_storage_at, args=(url, start, results)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        failures += [r for r in (results.get(timeout=5) for _ in procs) if r != "ok"]
    assert not failures, failures[0]


ENV_FIT = textwrap.dedent(
    """
    # Stands in for `lm fit`: records the launcher variables it was started with, and a val/loss of 1.
    import json, os, sys, time
    from pathlib import Path
    import torch
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    root = Path(args["trainer.default_root_dir"])
    names = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "RANK", "WORLD_SIZE", "MASTER_PORT")
    names += ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")
    time.sleep(float(os.environ.get("ENV_FIT_SLEEP", "0")))  # lets the other workers claim their trials meanwhile
    root.joinpath("env.json").write_text(json.dumps({n: os.environ[n] for n in names if n in os.environ}))
    last = root / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    state = {"monitor": args["checkpoint.monitor"], "best_model_score": torch.tensor(1.0)}
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": state}}, last)
    """
)


def test_a_trial_is_not_taken_for_a_rank_of_the_job_that_started_the_sweep(tmp_path, monkeypatch):
    """`lm sweep --local` inside `sbatch --ntasks-per-node=2` (or under torchrun): each trial inherited SLURM_NTASKS
    and SLURM_PROCID, Lightning took it for rank 0 of 2 srun tasks, and a DDP trial waited for ever for a rank 1
    (`--ntasks=2`: every trial failed). The job's id stays, for a command that starts srun itself."""
    for name, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "0", "RANK": "0",
                        "WORLD_SIZE": "2", "MASTER_PORT": "29500", "SLURM_JOB_ID": "77"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    (tmp_path / "env_fit.py").write_text(ENV_FIT)
    command = ["${interpreter}", "${program}", "${args}"]
    config = _grid("1") | {"program": str(tmp_path / "env_fit.py"), "command": command}
    summary = run_local(config, name="e", out=tmp_path / "out", count=None, workers=1, storage=None, seed=0, extra=[])
    seen = json.loads((Path(summary["trials"][0]["root"]) / "env.json").read_text())
    assert seen == {"SLURM_JOB_ID": "77"}


@pytest.mark.parametrize(
    ("visible", "workers", "expected"),
    [
        ("0,1,2,3", 2, ["0,1", "2,3"]),
        ("0,1,2", 2, ["0", "1"]),  # equal slices: the odd GPU stays idle
        ("3", 2, ["3", "3"]),  # fewer GPUs than workers: shared
        ("GPU-a,GPU-b", 2, ["GPU-a", "GPU-b"]),  # UUIDs as given
        ("0,-1,2", 2, ["0", "0"]),  # CUDA ignores the devices after an invalid one
        ("", 2, [None, None]),  # no GPU: nothing to split
        ("0,1", 1, [None]),  # one worker sees what the sweep sees
        (None, 2, [None, None]),  # this CPU machine: torch counts no GPU
    ],
)
def test_each_local_worker_gets_its_own_gpus(monkeypatch, visible, workers, expected):
    """Every worker's `devices: 1` trial ran on GPU 0 (and `devices: -1` trials all on every GPU)."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert worker_devices(workers) == expected


def test_a_trial_runs_on_its_worker_s_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setenv("ENV_FIT_SLEEP", "2")  # both workers hold a trial at once
    (tmp_path / "env_fit.py").write_text(ENV_FIT)
    command = ["${interpreter}", "${program}", "${args}"]
    config = _grid("1", "2") | {"program": str(tmp_path / "env_fit.py"), "command": command}
    summary = run_local(config, name="g", out=tmp_path / "out", count=None, workers=2, storage=None, seed=0, extra=[])
    seen = [json.loads((Path(t["root"]) / "env.json").read_text()) for t in summary["trials"]]
    assert sorted(s["CUDA_VISIBLE_DEVICES"] for s in seen) == ["4,5", "6,7"]


def test_a_command_that_passes_a_config_after_the_swept_arguments_is_refused(tmp_path):
    """`[lm, fit, ${args}, --config, X]`: X is read after the swept values and sets its own lr in every trial, while
    the summary reports the swept ones."""
    config = _grid("1") | {"command": ["lm", "fit", "${args}", "--config", "experiments/debug.yaml"]}
    with pytest.raises(LMError, match=r"--config .*after .*\$\{args\}"):
        load_sweep(_write(tmp_path, config))
    config = _grid("1") | {"command": ["lm", "fit", "${args}", "--x=2"]}  # a swept key set again after ${args}
    with pytest.raises(LMError, match=r"--x .*after .*\$\{args\}"):
        load_sweep(_write(tmp_path, config))
    load_sweep(_write(tmp_path, _grid("1") | {"command": ["lm", "fit", "--config", "e.yaml", "${args}", "--y=3"]}))


def test_a_command_with_a_flag_before_a_config_that_sets_it_is_refused(tmp_path):
    """lm fit refuses `--trainer.max_steps 5 --config debug.yaml` (the file's 40 steps would win): the sweep started,
    and every trial failed on it."""
    debug = str(REPO / "experiments/debug.yaml")
    command = ["lm", "fit", "--trainer.max_steps", "5", "--config", debug, "${args}"]
    with pytest.raises(LMError, match=r"command: --trainer.max_steps 5 comes before --config .*put it after"):
        load_sweep(_write(tmp_path, _grid("1") | {"command": command}))
    # a flag the file leaves alone stays where it is
    load_sweep(
        _write(
            tmp_path, _grid("1") | {"command": ["lm", "fit", "--seed_everything", "3", "--config", debug, "${args}"]}
        )
    )


def test_a_list_or_mapping_value_holding_null_reaches_lm_fit_as_null():
    from lm.sweep import _cli_value

    for value in ([0.9, None], {"a": None, "b": True, "c": "x y"}):
        assert yaml.safe_load(_cli_value(value)) == value


@pytest.mark.slow
def test_lm_fit_stopped_by_a_wandb_agent_does_not_exit_as_a_failed_run(tmp_path):
    """W&B's early_terminate stops a run with SIGTERM from its agent, and the agent counts an exit code > 0 as a
    failed run: after 5 (or 3 in its first minute) it shut itself down. lm fit saved and exited 143 for each."""
    root = tmp_path / "root"
    env = cli_env(WANDB_SWEEP_ID="sweep1", WANDB_RUN_ID="run1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "lm", "fit", "--config", "experiments/debug.yaml", "--trainer.max_steps", "100000",
               "--samples.max_new_tokens", "0", "--trainer.default_root_dir", str(root)]  # fmt: skip
    with open(tmp_path / "out.log", "w+") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        # Lightning's model summary: training starts
        while "Trainable params" not in (tmp_path / "out.log").read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "out.log").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert "stopped by a signal after saving a checkpoint" in (tmp_path / "out.log").read_text()
    assert (root / "sweep-sweep1" / "run1" / "checkpoints" / "last.ckpt").is_file()
    assert proc.returncode <= 0, f"exit code {proc.returncode}: wandb's agent counts it as a failed run"


@pytest.mark.parametrize("method", ["bayes", "random"])
def test_a_trial_still_running_moves_the_next_bayes_draw_away_and_leaves_random_alone(method, monkeypatch):
    """Parallel workers: without Optuna's constant liar (off by default before Optuna 5) TPE ignored the trials
    being run, so a second worker drew right beside the first one's point. Two studies differ only in trial 12,
    running in one and failed in the other (a failed trial counts for nothing); trial 13's draw, seeded by its
    number, differs only where TPE sees it. Run against Optuna 4.x's default, whichever Optuna is installed."""

    class Optuna4TPE(optuna.samplers.TPESampler):
        def __init__(self, *args, constant_liar: bool = False, **kwargs):
            super().__init__(*args, constant_liar=constant_liar, **kwargs)

    monkeypatch.setattr(optuna.samplers, "TPESampler", Optuna4TPE)
    params = {"x": {"min": 0.0, "max": 1.0}}
    config = _grid() | {"method": method, "parameters": params}
    draws = []
    for last in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL):
        study = optuna.create_study(sampler=lm.sweep.make_sampler(config, 3))
        for i in range(12):
            trial = study.ask()
            study.tell(trial, (suggest(trial, params)["x"] - 0.3) ** 2 + 0.01 * i)
        trial = study.ask()
        suggest(trial, params)
        if last == optuna.trial.TrialState.FAIL:
            study.tell(trial, state=last)
        trial = study.ask()
        draws.append(suggest(trial, params)["x"])
    running, failed = draws
    assert (running != failed) == (method == "bayes")


def test_summary_table_columns_line_up_under_their_headers_with_long_values(tmp_path, capsys):
    """A log-uniform draw prints as ~20 characters: its column widens to it, so every later header stays above its
    values (sized by the header alone, the lr column pushed the rest right of their headers)."""
    lr = {"distribution": "log_uniform_values", "min": 1e-4, "max": 3e-3}
    config = _grid() | {"method": "random", "parameters": {"lr": lr, "n": {"values": [1]}}}
    run_local(config, name="t", out=tmp_path, count=2, workers=1, storage=None, seed=0, extra=[],
              run=lambda argv, root, metric, goal: 1.0)  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trial  state"))
    table = lines[header : header + 3]
    for column in ("lr", "n"):  # right-aligned: a header and its values end at the same place
        end = table[0].index(column) + len(column)
        for row in table[1:]:
            assert row[end - 1] != " " and row[end] == " ", (column, table)
    for row in table[1:]:  # the metric, left-aligned, starts under its header
        assert row[table[0].index("val/loss") :].startswith("1.0000"), table
