"""lm sweep: the W&B -> Optuna translation, failed trials, and a real 4-trial local grid sweep of the debug experiment.

pytest tests/test_sweep.py        # the real sweep is marked slow (~40 s on 2 cores)
"""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lm.__main__ import main
from lm.errors import LMError
from lm.sweep import grid_space, load_sweep, suggest, trial_command
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


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"distribution": "normal", "mu": 0, "sigma": 1}, "not supported"),
        ({"values": [1, 2], "probabilities": [0.5, 0.5]}, "probabilities"),
        ({"min": 3, "max": 1}, "min < max"),
        ({"parameters": {"x": {"value": 1}}}, "nested"),
        ({"values": [[1, 2]]}, "numbers, strings"),
    ],
)
def test_bad_parameters_are_one_line_errors(tmp_path, spec, message):
    path = _write(tmp_path, {"method": "random", "metric": {"name": "val/loss"}, "parameters": {"x": spec}})
    with pytest.raises(LMError, match=message) as e:
        load_sweep(path)
    assert str(e.value).startswith(f"{path}: parameters.x")


def test_command_macros_expand_like_wandb():
    config = {"program": "train.py", "command": ["${env}", "${interpreter}", "${program}", "--x", "${args}"]}
    argv = trial_command(config, {"model.init_args.lr": 0.001, "flag": True, "none": None}, ["--extra", "1"])
    assert argv == [
        sys.executable,
        "train.py",
        "--x",
        "--model.init_args.lr=0.001",
        "--flag=true",
        "--none=null",
        "--extra",
        "1",
    ]
    lm_argv = trial_command({"command": ["lm", "fit", "${args_no_hyphens}"]}, {"a": 1}, [])
    assert lm_argv == [sys.executable, "-m", "lm", "fit", "a=1"]


FAKE_FIT = textwrap.dedent(
    """
    # Stands in for `lm fit`: crashes for x=crash, else records x as the best val/loss the way ModelCheckpoint does.
    import sys
    from pathlib import Path
    import torch
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    if args["x"] == "crash":
        sys.exit("RuntimeError: boom")
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
    assert by_x["crash"]["state"] == "FAIL" and "boom" in by_x["crash"]["error"]
    assert by_x["2.5"]["state"] == by_x["1.5"]["state"] == "COMPLETE"
    assert summary["best"]["params"] == {"x": "1.5"} and summary["best"]["val/loss"] == 1.5
    assert "best: trial" in capsys.readouterr().out

    # every trial failing is a one-line user error (exit code 2 through the CLI), after the summary
    config["parameters"]["x"]["values"] = ["crash"]
    with pytest.raises(LMError, match="no trial of sweep .* finished"):
        main(["sweep", str(_write(tmp_path, config)), "--local", "--out", str(tmp_path / "all-fail"), "--debug"])


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
