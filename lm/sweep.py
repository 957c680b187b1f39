"""lm sweep: run a W&B-format sweep file on the W&B server, or locally with Optuna and no server at all.

    lm sweep sweeps/debug.yaml                                    # creates the sweep on W&B and runs an agent here
    lm sweep sweeps/debug.yaml --local                            # grid: every point; random/bayes need --count
    lm sweep sweeps/width_depth.yaml --local --count 9 --workers 2
    lm sweep sweeps/debug.yaml --local -- --trainer.max_steps 10  # args after `--` go to every trial's `lm fit`

The sweep file is W&B's format (https://docs.wandb.ai/guides/sweeps/define-sweep-configuration): `method`
(grid/random/bayes), `metric: {name: val/loss, goal: minimize}`, `parameters` named by their `lm fit` keys
(`model.init_args.lr`, `data.init_args.batch_size`, ...) and a `command` such as `[lm, fit, --config, X, ${args}]`.

Locally, grid/random/bayes become Optuna's GridSampler/RandomSampler/TPESampler over one study kept in SQLite
(`<out>/optuna.db`, or `--storage` for any RDB URL). Several workers share it: `--workers K` threads here, or the same
command started elsewhere with the same `--storage` (e.g. a SLURM job array). A killed sweep resumes where it stopped
when started again: `--count` is the study's total. Each trial is a subprocess `lm fit` with its own
`trainer.default_root_dir` under `<out>/trial-NNNN` (W&B offline unless WANDB_MODE says otherwise); its objective is
the best `metric` value that the run's ModelCheckpoint recorded in `last.ckpt`. A trial that exits non-zero is
recorded as failed and the sweep goes on. At the end: a table of params -> best metric, also in `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lm.errors import LMError

METHODS = ("grid", "random", "bayes")
# W&B parameter distributions that have an Optuna equivalent (https://docs.wandb.ai/guides/sweeps/sweep-config-keys)
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform_values",
    "log_uniform",
    "q_log_uniform_values",
)


class TrialFailed(Exception):
    """A trial's `lm fit` exited non-zero or left no metric: Optuna records the trial as FAIL and goes on."""


# ---- the sweep file ------------------------------------------------------------------------------------------------


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a W&B sweep file; LMError names the file and the key when something is off."""
    path = Path(path)
    if not path.is_file():
        raise LMError(f"{path}: sweep file not found")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LMError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise LMError(f"{path}: a sweep file is a mapping with method, metric, parameters and command")
    if config.get("method") not in METHODS:
        raise LMError(f"{path}: method must be one of {', '.join(METHODS)}, got {config.get('method')!r}")
    metric = config.get("metric")
    if (
        not isinstance(metric, dict)
        or not metric.get("name")
        or metric.get("goal", "minimize")
        not in (
            "minimize",
            "maximize",
        )
    ):
        raise LMError(f"{path}: metric must be {{name: val/loss, goal: minimize|maximize}}, got {metric!r}")
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise LMError(f"{path}: parameters must map lm fit keys to W&B parameter specs")
    for name, spec in parameters.items():
        _check_parameter(path, name, spec)
    command = config.get("command")
    if command is not None and (not isinstance(command, list) or not all(isinstance(c, str) for c in command)):
        raise LMError(f"{path}: command must be a list of strings, e.g. [lm, fit, --config, X, '${{args}}']")
    if command is not None and not {"${args}", "${args_no_hyphens}"} & set(command):
        raise LMError(f"{path}: command never passes the sampled parameters: add '${{args}}' to it")
    return config


def _check_parameter(path: Path, name: str, spec: Any) -> None:
    where = f"{path}: parameters.{name}"
    if not isinstance(spec, dict):
        raise LMError(f"{where}: expected a mapping such as {{values: [...]}} or {{min: 1, max: 8}}, got {spec!r}")
    if "parameters" in spec:
        raise LMError(f"{where}: nested parameters are not supported; name the full key (e.g. model.init_args.lr)")
    if "probabilities" in spec:
        raise LMError(f"{where}: 'probabilities' has no Optuna equivalent; list values, repeating for weight")
    kind = _distribution(spec)
    if kind not in DISTRIBUTIONS:
        raise LMError(f"{where}: distribution {kind!r} is not supported (supported: {', '.join(DISTRIBUTIONS)})")
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise LMError(f"{where}: values must be a non-empty list")
        if not all(v is None or isinstance(v, bool | int | float | str) for v in values):
            raise LMError(f"{where}: values must be numbers, strings, booleans or null, got {values!r}")
    elif kind != "constant":
        if "min" not in spec or "max" not in spec or not spec["min"] < spec["max"]:
            raise LMError(f"{where}: {kind} needs min < max, got {spec!r}")
        if kind.startswith("q_") and not spec.get("q", 1) > 0:
            raise LMError(f"{where}: q must be positive")
        if kind in ("log_uniform_values", "q_log_uniform_values") and spec["min"] <= 0:
            raise LMError(f"{where}: {kind} needs min > 0")


def _distribution(spec: dict[str, Any]) -> str:
    """W&B's inference when `distribution` is left out: value -> constant, values -> categorical, int min/max ->
    int_uniform, float min/max -> uniform."""
    if "distribution" in spec:
        return spec["distribution"]
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
        return "int_uniform"
    return "uniform"


def grid_space(parameters: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """The grid of a grid sweep: every parameter as its list of values (int_uniform is expanded, like W&B does)."""
    space = {}
    for name, spec in parameters.items():
        kind = _distribution(spec)
        if kind == "constant":
            space[name] = [spec["value"]]
        elif kind == "categorical":
            space[name] = list(spec["values"])
        elif kind == "int_uniform":
            space[name] = list(range(spec["min"], spec["max"] + 1))
        elif kind == "q_uniform":
            q = spec.get("q", 1)
            space[name] = [spec["min"] + i * q for i in range(int(round((spec["max"] - spec["min"]) / q)) + 1)]
        else:
            raise LMError(f"parameters.{name}: a grid sweep needs discrete values; {kind} is continuous")
    return space


def suggest(trial: Any, parameters: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Draw one value per W&B parameter from an Optuna trial (the W&B -> Optuna translation)."""
    params = {}
    for name, spec in parameters.items():
        kind = _distribution(spec)
        lo, hi = spec.get("min"), spec.get("max")
        if kind == "constant":
            value = spec["value"]
        elif kind == "categorical":
            value = trial.suggest_categorical(name, spec["values"])
        elif kind == "int_uniform":
            value = trial.suggest_int(name, int(lo), int(hi))
        elif kind == "uniform":
            value = trial.suggest_float(name, float(lo), float(hi))
        elif kind == "q_uniform":
            q = spec.get("q", 1)
            # Optuna's step grid starts at min; W&B rounds to multiples of q (the same when min is a multiple of q)
            value = trial.suggest_float(name, float(lo), float(hi), step=float(q))
            value = int(value) if isinstance(q, int) and float(value).is_integer() else value
        elif kind == "log_uniform_values":
            value = trial.suggest_float(name, float(lo), float(hi), log=True)
        elif kind == "log_uniform":  # W&B's min/max are natural logs of the bounds here
            value = trial.suggest_float(name, math.exp(lo), math.exp(hi), log=True)
        elif kind == "q_log_uniform_values":
            # Optuna has no log scale with a step: sample on the log scale, then round to q like W&B
            q = spec.get("q", 1)
            raw = trial.suggest_float(name, float(lo), float(hi), log=True)
            value = max(q, round(raw / q) * q)
            value = int(value) if isinstance(q, int) else value
        else:  # load_sweep has checked already; this guards direct callers
            raise LMError(f"parameters.{name}: distribution {kind!r} is not supported")
        params[name] = value
    return params


def trial_command(config: dict[str, Any], params: dict[str, Any], extra: list[str]) -> list[str]:
    """Expand W&B's command macros for one trial; a leading `lm` runs this Python's lm, whatever PATH says."""
    template = config.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's default
    args = [f"--{k}={_cli_value(v)}" for k, v in params.items()]
    argv: list[str] = []
    for part in template:
        if part == "${env}":
            continue  # W&B inserts /usr/bin/env; we run the next word with the same environment directly
        elif part == "${interpreter}":
            argv.append(sys.executable)
        elif part == "${program}":
            if not config.get("program"):
                raise LMError("the sweep's command uses ${program} but the file sets no program")
            argv.append(str(config["program"]))
        elif part == "${args}":
            argv.extend(args)
        elif part == "${args_no_hyphens}":
            argv.extend(a[2:] for a in args)
        elif part in ("${args_json}", "${args_json_file}"):
            raise LMError(f"{part} is not supported by lm sweep; use ${{args}}")
        else:
            argv.append(part)
    if argv[:1] == ["lm"]:
        argv[:1] = [sys.executable, "-m", "lm"]
    return argv + extra


def _cli_value(value: Any) -> str:
    # YAML-ish spelling that jsonargparse reads back into the same value (None -> null, True -> true)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---- one trial -----------------------------------------------------------------------------------------------------


def best_metric(root: Path, metric: str) -> float:
    """The best `metric` that ModelCheckpoint recorded in the trial's last.ckpt (read without running pickled code)."""
    import torch

    candidates = sorted(root.glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise TrialFailed(f"no last.ckpt under {root}: did validation run?")
    # mmap: only the few bytes of callback state are read, not the weights
    ckpt = torch.load(candidates[-1], map_location="cpu", weights_only=True, mmap=True)
    for state in (ckpt.get("callbacks") or {}).values():
        # any ModelCheckpoint (or subclass: the state key is its class name) that monitored the sweep's metric
        if isinstance(state, dict) and "best_model_score" in state and state.get("monitor") == metric:
            score = state.get("best_model_score")
            if score is not None and math.isfinite(float(score)):
                return float(score)
    raise TrialFailed(f"{candidates[-1]}: no finite best {metric} recorded by a ModelCheckpoint")


def run_trial(argv: list[str], root: Path, metric: str, goal: str) -> float:
    """Run one trial's command with its own output root and W&B offline; return its best `metric`."""
    root.mkdir(parents=True, exist_ok=True)
    # the trial monitors the sweep's metric, so last.ckpt records the best value of exactly that metric
    argv = [
        *argv,
        f"--trainer.default_root_dir={root}",
        f"--checkpoint.monitor={metric}",
        f"--checkpoint.mode={'min' if goal == 'minimize' else 'max'}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_MODE", "offline")  # the user's WANDB_MODE (online, disabled) wins
    (root / "command.json").write_text(json.dumps(argv, indent=1) + "\n")
    with open(root / "trial.log", "w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        lines = (root / "trial.log").read_text(errors="replace").strip().splitlines()
        raise TrialFailed(f"exit code {code}: {lines[-1] if lines else 'no output'} (log: {root / 'trial.log'})")
    return best_metric(root, metric)


# ---- local sweep with Optuna ---------------------------------------------------------------------------------------


def make_sampler(config: dict[str, Any], seed: int | None) -> Any:
    import optuna

    method = config["method"]
    if method == "grid":
        return optuna.samplers.GridSampler(grid_space(config["parameters"]), seed=seed)
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)  # bayes: W&B uses a Gaussian process; TPE is Optuna's default


def _storage(url: str) -> Any:
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # Heartbeats let a restarted sweep see that a killed worker's RUNNING trial is dead: it is marked FAIL and
    # retried once with the same params, instead of holding that grid point forever. (Experimental in Optuna 5.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(
            url,
            heartbeat_interval=30,
            grace_period=90,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            # SQLite: several workers write the same file; wait for the lock rather than fail at once
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        )


def run_local(
    config: dict[str, Any],
    *,
    name: str,
    out: Path,
    count: int | None,
    workers: int,
    storage: str | None,
    seed: int | None,
    extra: list[str],
    run: Callable[[list[str], Path, str, str], float] = run_trial,
) -> dict[str, Any]:
    """Run (or resume) the sweep until the study holds `count` trials; returns the summary written to summary.json."""
    import optuna
    from optuna.trial import TrialState

    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    if config["method"] == "grid":
        size = math.prod(len(v) for v in grid_space(config["parameters"]).values())
        count = size if count is None else min(count, size)
    elif count is None:
        count = config.get("run_cap")
        if count is None:
            raise LMError(f"a {config['method']} sweep never ends by itself: pass --count N (or set run_cap)")
    for key in ("early_terminate",):
        if key in config:
            print(f"lm sweep: {key} is ignored by local sweeps")

    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=_storage(storage or f"sqlite:///{(out / 'optuna.db').resolve()}"),
        sampler=make_sampler(config, seed),
        direction=goal,
        load_if_exists=True,  # a second worker, or a restarted sweep, joins the same study
    )
    counted = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.RUNNING)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, config["parameters"])
        root = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("root", str(root))
        print(f"lm sweep: trial {trial.number} {params} -> {root}", flush=True)
        try:
            value = run(trial_command(config, params, extra), root, metric, goal)
        except TrialFailed as e:
            trial.set_user_attr("error", str(e))
            print(f"lm sweep: trial {trial.number} failed: {e}", flush=True)
            raise
        print(f"lm sweep: trial {trial.number} best {metric} = {value:.4f}", flush=True)
        return value

    def work() -> None:
        while len(study.get_trials(deepcopy=False, states=counted)) < count:
            # catch: a failed trial is recorded as FAIL and this worker goes on to the next one
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))
            if config["method"] == "grid" and _grid_done(study, count):
                break

    threads = [threading.Thread(target=work, name=f"sweep-worker-{i}") for i in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(study, config, out)


def _grid_done(study: Any, size: int) -> bool:
    from optuna.trial import TrialState

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
    return len({t.system_attrs.get("grid_id") for t in finished}) >= size


def summarize(study: Any, config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Print params -> best metric for every trial (best first) and write it to <out>/summary.json."""
    from optuna.trial import TrialState

    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    names = list(config["parameters"])
    rows = []
    for t in study.get_trials(deepcopy=False):
        params = {n: t.params.get(n, config["parameters"][n].get("value")) for n in names}
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "params": params,
                metric: t.value if t.state == TrialState.COMPLETE else None,
                "root": t.user_attrs.get("root"),
                "error": t.user_attrs.get("error"),
            }
        )
    sign = 1 if goal == "minimize" else -1
    rows.sort(key=lambda r: (r[metric] is None, sign * (r[metric] or 0.0), r["trial"]))
    best = rows[0] if rows and rows[0][metric] is not None else None
    summary = {"study": study.study_name, "metric": metric, "goal": goal, "best": best, "trials": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    short = [n.split(".")[-1] for n in names]  # model.init_args.lr -> lr
    widths = [max(len(s), 10) for s in short]
    print(f"\nlm sweep {study.study_name}: {len(rows)} trials, best {metric} first")
    print("  ".join(["trial", "state   ", *(s.rjust(w) for s, w in zip(short, widths, strict=True)), metric]))
    for r in rows:
        value = f"{r[metric]:.4f}" if r[metric] is not None else (r["error"] or "")[:60]
        cells = [str(r["params"][n]).rjust(w) for n, w in zip(names, widths, strict=True)]
        print("  ".join([f"{r['trial']:>5}", f"{r['state']:<8}", *cells, value]))
    if best is not None:
        print(f"best: trial {best['trial']} {best['params']} {metric}={best[metric]:.4f} ({best['root']})")
    print(f"summary: {out / 'summary.json'}")
    return summary


# ---- W&B server --------------------------------------------------------------------------------------------------


def run_wandb(config: dict[str, Any], *, count: int | None, project: str | None, entity: str | None) -> None:
    """Create the sweep on the W&B server and run one agent here (more agents: `wandb agent ENTITY/PROJECT/ID`)."""
    from lm.__main__ import _wandb_logged_in

    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        raise LMError(f"W&B sweeps need the W&B server but WANDB_MODE={mode}; run it with --local instead")
    if not _wandb_logged_in():
        raise LMError("W&B sweeps need a W&B account: no API key found (run `wandb login`), or use --local")
    import wandb

    config = {k: v for k, v in config.items() if k not in ("project", "entity")} | {"name": config.get("name")}
    project = project or config.get("project") or "lm-sweeps"
    try:
        sweep_id = wandb.sweep(sweep=config, project=project, entity=entity)
    except Exception as e:  # network or auth problems: one line, not a traceback
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LMError(f"could not create the W&B sweep: {reason}") from None
    print(
        f"lm sweep: W&B sweep {sweep_id}; more agents: wandb agent {entity + '/' if entity else ''}{project}/{sweep_id}"
    )
    wandb.agent(sweep_id, project=project, entity=entity, count=count)


# ---- the command ---------------------------------------------------------------------------------------------------


def sweep_command(argv: list[str]) -> None:
    """lm sweep: run a W&B sweep file on W&B (default) or locally with Optuna (--local)."""
    extra: list[str] = []
    if "--" in argv:  # everything after `--` is appended to every trial's command
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="lm sweep",
        description="Run a W&B-format sweep file: on the W&B server, or locally with Optuna (--local).",
        epilog="Arguments after `--` are appended to every trial's command, e.g. -- --trainer.max_steps 10",
    )
    p.add_argument("file", help="sweep YAML in W&B's format (sweeps/*.yaml)")
    p.add_argument("--local", action="store_true", help="no W&B server: Optuna study in SQLite, W&B runs offline")
    p.add_argument("--count", type=int, default=None, help="trials in total (local: the study's total, resumable)")
    p.add_argument("--workers", type=int, default=1, help="local: trials run at the same time by this process")
    p.add_argument("--storage", default=None, help="local: Optuna storage URL (default sqlite:///<out>/optuna.db)")
    p.add_argument("--name", default=None, help="local: study name (default: the file's `name` or its stem)")
    p.add_argument("--out", default=None, help="local: sweep directory (default runs/sweeps/<name>)")
    p.add_argument("--seed", type=int, default=None, help="local: sampler seed")
    p.add_argument("--project", default=None, help="W&B project (default: the file's `project` or lm-sweeps)")
    p.add_argument("--entity", default=None, help="W&B entity (default: your default entity)")
    args = p.parse_args(argv)

    config = load_sweep(args.file)
    if args.count is not None and args.count < 1:
        raise LMError(f"--count must be at least 1, got {args.count}")
    if not args.local:
        if extra:
            raise LMError("arguments after `--` only apply to --local sweeps; put them in the file's command")
        run_wandb(config, count=args.count, project=args.project, entity=args.entity)
        return
    name = args.name or config.get("name") or Path(args.file).stem
    if not re.fullmatch(r"[\w.-]+", name):
        raise LMError(f"sweep name {name!r}: use letters, digits, '.', '_' or '-'")
    summary = run_local(
        config,
        name=name,
        out=Path(args.out or Path("runs") / "sweeps" / name),
        count=args.count,
        workers=args.workers,
        storage=args.storage,
        seed=args.seed,
        extra=extra,
    )
    if summary["best"] is None:
        raise LMError(f"no trial of sweep {name} finished: see the trial.log files under {args.out or 'runs/sweeps'}")
