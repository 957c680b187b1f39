"""lm sweep: run a W&B-format sweep file on the W&B server, or locally with Optuna and no server at all.

    lm sweep sweeps/debug.yaml                                    # creates the sweep on W&B and runs an agent here
    lm sweep sweeps/debug.yaml --local                            # grid: every point; random/bayes: --count or run_cap
    lm sweep sweeps/width_depth.yaml --local --count 9 --workers 2
    lm sweep sweeps/debug.yaml --local -- --trainer.max_steps 10 --trainer.val_check_interval 10  # to every trial

The sweep file is W&B's format (https://docs.wandb.ai/guides/sweeps/define-sweep-configuration): `method`
(grid/random/bayes), `metric: {name: val/loss, goal: minimize}`, `parameters` named by their `lm fit` keys
(`model.init_args.lr`, `data.init_args.batch_size`, ...) and a `command` such as `[lm, fit, --config, X, ${args}]`.

Locally, one Optuna study kept in SQLite (`<out>/optuna.db`, or `--storage` for any RDB URL): a grid runs every point
once (in a shuffled order), random/bayes draw with Optuna's RandomSampler/TPESampler. Several workers share it:
`--workers K` threads here (each with its own slice of the visible GPUs), or the same command started elsewhere with
the same `--storage` (e.g. a SLURM job array); no grid point runs twice and never more than `--count` trials are
completed or running. `--count` is the study's total of
completed trials: a killed sweep resumes when started again, and runs anew the trials that failed or were cut off (a
RUNNING trial whose worker is dead: on the same machine its pid says so, elsewhere a heartbeat older than 90 s). A trial
cut off by the sweep (the sweep stopped or died; its `lm fit` got SIGTERM and saved a checkpoint) resumes from its
`last.ckpt` (`--ckpt_path`), in its folder, instead of starting again from step 0: a grid point when the grid comes to
it, a random or bayes draw (the same values again) before any new draw. Each trial is a subprocess `lm fit` with
its own `trainer.default_root_dir` under `<out>/trial-NNNN` (W&B offline unless WANDB_MODE says otherwise); its
objective is the best `metric` value that the run's ModelCheckpoint recorded in `last.ckpt`. A trial that exits non-zero
is recorded as failed and the sweep goes on. Ctrl-C or SIGTERM stops the running trials with SIGTERM (their `lm fit`
saves a checkpoint) and then the sweep. At the end: a table of params (as passed to `lm fit`) -> best metric, also in
`<out>/summary.json`.

On the W&B server, `wandb agent` runs the file's one command for every trial; `lm fit` reads the agent's
WANDB_SWEEP_ID and WANDB_RUN_ID and gives each trial its own root, `<the command's root>/sweep-<id>/<run id>`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lm.errors import ArgumentParser, LMError, cannot_write

METHODS = ("grid", "random", "bayes")
SWEEP_TRIAL = "LM_SWEEP_TRIAL"  # and the trial's name (<sweep folder>-trial-NNNN), which lm fit gives its W&B run
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


# What a launcher sets for the process it starts as one rank (srun, torchrun); kept for a command that is a launcher
RANK_VARIABLES = (
    *("SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"),
    *("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
    *("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS"),
)
LAUNCHERS = ("srun", "torchrun", "mpirun", "mpiexec")

MAX_INITIAL_FAILURES = 3  # W&B's agent stops too: after 3 failed runs in its first minute, or 5 before as many finish


class TrialFailed(Exception):
    """A trial's `lm fit` exited non-zero or left no metric: Optuna records the trial as FAIL and goes on."""


# ---- the sweep file ------------------------------------------------------------------------------------------------


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a W&B sweep file; LMError names the file and the key when something is off."""
    path = Path(path)
    if not path.is_file():
        raise LMError(f"{path}: sweep file not found")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:  # a checkpoint or another binary file given as the sweep file
        raise LMError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a sweep file is YAML") from None
    except yaml.YAMLError as e:
        # yaml's own message takes several lines (the text and a caret under the spot): its problem and place in one
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise LMError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or e}{where})") from None
    if not isinstance(config, dict):
        raise LMError(f"{path}: a sweep file is a mapping with method, metric, parameters and command")
    # The study's name and its folder's: `name: 2024` (YAML reads an int) was a TypeError traceback
    if config.get("name") is not None and not isinstance(config["name"], str):
        raise LMError(f"{path}: name must be a string, got {config['name']!r} (quote it: name: '{config['name']}')")
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
    # Read later as a number: a string or a fraction was a TypeError traceback when the sweep began, and 0 or below
    # ran no trial and then said that none finished
    run_cap = config.get("run_cap")
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise LMError(f"{path}: run_cap must be a whole number of trials, at least 1, got {run_cap!r}")
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
    if command is not None:
        # Later arguments win: a --config (or a swept key) after the swept values sets its own value in every trial
        first = min(command.index(m) for m in ("${args}", "${args_no_hyphens}") if m in command)
        for part in command[first + 1 :]:
            key = part.split("=", 1)[0]
            if key in ("--config", "-c") or key[2:] in parameters:
                raise LMError(
                    f"{path}: command passes {key} after ${{args}}, where it overrides the swept values; "
                    "put ${args} after it"
                )
        # lm fit refuses a flag given before a --config that sets its key: every trial would have failed on it
        from lm.cli_errors import flag_a_later_config_overrides  # here: it imports lightning, which lm sweep need not

        if (overridden := flag_a_later_config_overrides(command)) is not None:
            raise LMError(f"{path}: command: {overridden}")
    try:  # its macros (a ${program} with no program, say) now rather than when a trial starts
        trial_command(config, {}, [])
    except LMError as e:
        raise LMError(f"{path}: {e}") from None
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
        if not all(v is None or isinstance(v, bool | int | float | str | list | dict) for v in values):
            raise LMError(
                f"{where}: values must be numbers, strings, booleans, null, lists or mappings, got {values!r}"
            )
    elif kind == "constant":
        if "value" not in spec:
            raise LMError(f"{where}: distribution constant needs a value, e.g. {{value: 3}}")
    else:
        for key in ("min", "max", "q"):
            if key in spec:  # in place: the samplers and the grid read the numbers
                spec[key] = _number(where, key, spec[key], integer=kind == "int_uniform" and key != "q")
        if "min" not in spec or "max" not in spec or not spec["min"] < spec["max"]:
            raise LMError(f"{where}: {kind} needs min < max, got {spec!r}")
        if kind.startswith("q_") and not spec.get("q", 1) > 0:
            raise LMError(f"{where}: q must be positive")
        if kind in ("log_uniform_values", "q_log_uniform_values") and spec["min"] <= 0:
            raise LMError(f"{where}: {kind} needs min > 0")


def _number(where: str, key: str, value: Any, *, integer: bool) -> int | float:
    """A bound or step as a number. YAML reads 1e-4 (no decimal point) as a string: it is converted, not compared as
    text. int_uniform's bounds must be whole numbers."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LMError(f"{where}: {key} must be a number")
    if integer:
        if not float(value).is_integer():
            raise LMError(f"{where}: int_uniform needs whole-number bounds, got {key} {value}")
        return int(value)
    return value


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
            steps = math.floor((spec["max"] - spec["min"]) / q + 1e-9)  # never past max (round() went one over)
            space[name] = [round(spec["min"] + i * q, 12) for i in range(steps + 1)]  # 0.3, not 0.30000000000000004
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
            values = spec["values"]
            if any(isinstance(v, list | dict) for v in values):  # Optuna draws scalars only: it draws the index
                value = values[trial.suggest_categorical(name, list(range(len(values))))]
            else:
                value = trial.suggest_categorical(name, values)
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
    """Expand W&B's command macros for one trial; a leading `lm` runs this Python's lm, whatever PATH says.

    `extra` (what came after `--`) goes just before the swept arguments: later arguments win, and a `--config`
    overlay setting a swept key, placed after them, ran its own value in every trial while the summary reported the
    swept ones."""
    template = config.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's default
    args = [f"--{k}={_cli_value(v)}" for k, v in params.items()]
    argv: list[str] = []
    for part in template:
        if part in ("${args}", "${args_no_hyphens}"):
            argv.extend(extra)
            extra = []  # once, before the first of them; with no swept arguments in the command, it goes last
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
    if isinstance(value, list | dict):  # JSON, which YAML reads: str() wrote None and 'a\\b' that YAML misreads
        return json.dumps(value)
    return str(value)


# ---- one trial -----------------------------------------------------------------------------------------------------


def newest_last_checkpoint(root: Path) -> Path | None:
    """The trial's newest last*.ckpt, wherever under its root the run's ModelCheckpoint put it."""
    candidates = sorted(root.glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def best_metric(root: Path, metric: str) -> float:
    """The best `metric` that ModelCheckpoint recorded in the trial's last.ckpt (read without running pickled code)."""
    import torch

    last = newest_last_checkpoint(root)
    if last is None:
        raise TrialFailed(f"no last.ckpt under {root}: did validation run?")
    # mmap: only the few bytes of callback state are read, not the weights
    ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    for state in (ckpt.get("callbacks") or {}).values():
        # any ModelCheckpoint (or subclass: the state key is its class name) that monitored the sweep's metric
        if isinstance(state, dict) and "best_model_score" in state and state.get("monitor") == metric:
            score = state.get("best_model_score")
            if score is not None and math.isfinite(float(score)):
                return float(score)
    raise TrialFailed(f"{last}: no finite best {metric} recorded by a ModelCheckpoint")


def worker_devices(workers: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each of `workers` local workers: the GPUs this process sees, split into
    contiguous equal slices (8 GPUs, 4 workers: "0,1", "2,3", ...); fewer GPUs than workers share them round-robin.
    None each (the trials see what the sweep sees) for one worker or no GPU: without it, every worker's
    `devices: 1` trial ran on GPU 0."""
    if workers == 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
        gpus = gpus[: next((i for i, g in enumerate(gpus) if g.startswith("-")), len(gpus))]  # CUDA stops at -1
    else:
        import torch  # counts through NVML where it can, without starting CUDA in the sweep's process

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        return [None] * workers
    if len(gpus) < workers:
        print(f"lm sweep: {workers} workers share {len(gpus)} GPUs: some trials run on the same GPU", flush=True)
        return [gpus[i % len(gpus)] for i in range(workers)]
    share = len(gpus) // workers  # the remainder stays idle: equal slices keep the trials comparable
    return [",".join(gpus[i * share : (i + 1) * share]) for i in range(workers)]


def run_trial(
    argv: list[str], root: Path, metric: str, goal: str, stop: Stop | None = None, devices: str | None = None
) -> float:
    """Run one trial's command with its own output root and W&B offline; return its best `metric`. `devices`, when
    given, is the trial's CUDA_VISIBLE_DEVICES (its worker's GPUs).

    When `stop` is requested (the sweep got SIGINT/SIGTERM) the trial's `lm fit` gets SIGTERM, saves a checkpoint
    and exits; a second signal kills it."""
    root.mkdir(parents=True, exist_ok=True)
    # the trial monitors the sweep's metric, so last.ckpt records the best value of exactly that metric; and writes
    # last.ckpt, where best_metric reads it (with a config's save_last false every trial failed after training)
    argv = [
        *argv,
        f"--trainer.default_root_dir={root}",
        f"--checkpoint.monitor={metric}",
        f"--checkpoint.mode={'min' if goal == 'minimize' else 'max'}",
        "--checkpoint.save_last=true",
    ]
    # Not the caller's W&B run: a sweep started from a job that set one (slurm/train.sbatch exports WANDB_RUN_ID) would
    # have every trial log to, and resume, that one run. A resumed trial gets its own id back from its checkpoint.
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_SWEEP_ID")}
    if Path(argv[0]).name not in LAUNCHERS:
        # The trial is a process of its own, not a rank of the job or torchrun that started the sweep: Lightning took
        # these for its own cluster (a DDP trial in `sbatch --ntasks-per-node=2` waited for ever for a rank 1)
        env = {k: v for k, v in env.items() if k not in RANK_VARIABLES}
    env |= {"PYTHONUNBUFFERED": "1", SWEEP_TRIAL: f"{root.parent.name}-{root.name}"}
    env.setdefault("WANDB_MODE", "offline")  # the user's WANDB_MODE (online, disabled) wins
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    (root / "command.json").write_text(json.dumps(argv, indent=1) + "\n")
    if shutil.which(argv[0], path=env.get("PATH")) is None:
        raise LMError(f"the sweep's command {argv[0]!r} is not found (not on PATH, or not executable)")
    with open(root / "trial.log", "a") as log:  # a resumed trial's log goes on after the cut-off one's
        # Its own process group: a terminal's Ctrl-C reaches only the sweep, which then stops the whole trial
        # (lm fit and its data-loader workers) once, with SIGTERM, instead of each process getting SIGINT.
        child = start_trial(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sent = None
        while (code := _wait(child, 0.2)) is None:
            if not (stop and stop.requested.is_set()):
                continue
            wanted = signal.SIGKILL if stop.forced.is_set() else signal.SIGTERM
            if wanted != sent:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, wanted)
                sent = wanted
    if stop and stop.requested.is_set():
        raise TrialFailed(f"stopped by {stop.name} (exit code {code})")  # run again on a restart
    if code != 0:
        raise TrialFailed(f"exit code {code}: {_last_error_line(root / 'trial.log')} (log: {root / 'trial.log'})")
    return best_metric(root, metric)


# The trial's first moments, in its own process: ask the kernel for SIGTERM when the sweep's thread that started it
# ends (that thread waits for the trial, so only the sweep's death sends it, SIGKILL included, which the sweep cannot
# forward), then become the trial's command. exec keeps the pid and the request, so the command itself gets the signal:
# lm fit saves a checkpoint and exits, as on a preemption, and a launcher (torchrun, srun) passes it to its ranks,
# rather than train on as an orphan beside the restarted sweep's resume of the same folder.
BECOME_THE_TRIAL = """
import ctypes, os, signal, sys
sweep, command = int(sys.argv[1]), sys.argv[2:]
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, <linux/prctl.h>
if os.getppid() != sweep:  # the sweep died before the request: no signal would come
    sys.exit(128 + signal.SIGTERM)
os.execvp(command[0], command)
"""


def start_trial(argv: list[str], **popen) -> subprocess.Popen:
    """subprocess.Popen(argv, **popen), whose process gets SIGTERM when the calling thread ends (on Linux;
    elsewhere a plain Popen)."""
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(argv, **popen)
    return subprocess.Popen([sys.executable, "-c", BECOME_THE_TRIAL, str(os.getpid()), *argv], **popen)


def _wait(child: subprocess.Popen, seconds: float) -> int | None:
    try:
        return child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _last_error_line(log: Path) -> str:
    """The log's last line that says something: wandb's closing `wandb: ...` sync hints come after the traceback."""
    lines = [ANSI.sub("", line).strip() for line in log.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith("wandb:")] or [line for line in lines if line]
    return lines[-1] if lines else "no output"


class Stop:
    """Set by the sweep's SIGINT/SIGTERM/SIGHUP handler: no new trials start, running ones get SIGTERM (a second
    signal: SIGKILL)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.forced = threading.Event()
        self.name = ""

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested.is_set():
            self.forced.set()
            print(f"lm sweep: {signal.Signals(signum).name} again: killing the running trials", flush=True)
            return
        self.name = signal.Signals(signum).name
        self.requested.set()
        print(f"lm sweep: {self.name}: stopping the running trials (again to kill them)", flush=True)


# ---- local sweep with Optuna ---------------------------------------------------------------------------------------

# A worker records a heartbeat for its running trial every HEARTBEAT_S; a RUNNING trial on another machine whose
# heartbeat is older than GRACE_S is taken for dead (its worker was killed), marked FAIL and run again.
HEARTBEAT_S = 30
GRACE_S = 90


def make_sampler(config: dict[str, Any], seed: int | None) -> Any:
    import optuna

    if config["method"] in ("bayes", "random"):
        # W&B's bayes uses a Gaussian process; TPE is Optuna's default
        base = optuna.samplers.TPESampler if config["method"] == "bayes" else optuna.samplers.RandomSampler

        class Replay(base):
            """Draws as usual, except the values in `replay`: those of a cut-off trial that run_local resumes."""

            replay: dict[str, Any] = {}

            def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
                # TPE samples every parameter jointly once 10 trials have completed (multivariate, Optuna's default
                # for one objective), without asking sample_independent: a resumed trial got a new draw there
                if self.replay:
                    return {name: self.replay[name] for name in search_space if name in self.replay}
                return super().sample_relative(study, trial, search_space)

            def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
                if name in self.replay:
                    return self.replay[name]
                return super().sample_independent(study, trial, name, distribution)

            def before_trial(self, study: Any, trial: Any) -> None:
                super().before_trial(study, trial)
                if seed is not None:
                    # Seeded per trial, not per process: a restarted sweep, or another process on the same study
                    # with the same --seed, drew the first run's values again
                    import numpy as np

                    trial_seed = int(np.random.SeedSequence([seed, trial.number]).generate_state(1)[0])
                    self._rng.rng.seed(trial_seed)
                    if hasattr(self, "_random_sampler"):  # TPE's draws before n_startup_trials
                        self._random_sampler._rng.rng.seed(trial_seed)

        if base is optuna.samplers.RandomSampler:
            return Replay(seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Parallel workers (--workers K, or other processes on the study): TPE counts each running trial as if it
            # had its worst value, so the next draw looks elsewhere instead of near the points already being tried.
            # With nothing running it draws as without. Optuna 5's default; 4.x, which lm still supports, had it off.
            return Replay(seed=seed, constant_liar=True)

    class GridPoint(optuna.samplers.RandomSampler):
        """Returns `point`, the grid point that run_local chose for the next trial (Optuna's GridSampler hands out
        points already running and never retries a failed one)."""

        point: dict[str, Any] = {}

        def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
            return self.point[name]

    return GridPoint(seed=seed)


def _storage(url: str, flag: str) -> Any:
    import sqlalchemy.exc
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats are experimental in Optuna 5
        for attempt in range(10):
            try:
                return RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    # SQLite: several workers write the same file; wait for the lock rather than fail at once
                    engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                )
            except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as e:
                # Workers started together (a job array) on a new storage: another one is creating the tables
                # ("table studies already exists", "UNIQUE constraint failed: alembic_version"); it is there next time
                racing = isinstance(e, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.OperationalError) and re.search(
                    r"already exists|UNIQUE constraint|Duplicate entry|duplicate key", str(e)
                )
                if not racing or attempt == 9:
                    reason = str(getattr(e, "orig", None) or e).splitlines()[0]
                    raise LMError(f"{flag}: cannot open the Optuna storage {_hide_password(url)} ({reason})") from None
                time.sleep(0.2 + random.random() * 0.3)


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: nothing to hide
        return url


def _worker_id() -> str:
    """host|pid namespace|pid|start time: enough to tell, on this machine, whether the worker is still alive."""
    return f"{_host()}|{os.getpid()}|{_start_time(os.getpid())}"


def _host() -> str:
    # Containers can share a hostname but not a pid namespace: the namespace says whose pids these are.
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{namespace}"


def _start_time(pid: int) -> str:
    # From /proc: a pid reused by an unrelated process has another start time. Elsewhere only the pid is compared.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime); the name in (...) may hold spaces


def _worker_alive(worker: str) -> bool | None:
    """Whether the worker that owns a trial is alive: None when it ran on another machine (heartbeats tell)."""
    *host, pid, started = worker.split("|")
    if "|".join(host) != _host():
        return None
    if Path("/proc").is_dir():
        return _start_time(int(pid)) == started  # "" (no such process) never equals a recorded start time
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def _fail_dead_trials(study: Any) -> None:
    """Mark FAIL every RUNNING trial whose worker is gone (a killed sweep), so that its point is run again.

    On this machine the worker's pid says so at once; on another one its heartbeat has to be GRACE_S old. A trial
    that a live worker runs is left alone, whichever machine it is on."""
    from optuna.trial import TrialState

    try:
        from optuna.exceptions import UpdateFinishedTrialError
    except ImportError:  # optuna < 4.3 raises a plain RuntimeError
        UpdateFinishedTrialError = RuntimeError

    storage = study._storage
    stale = set(storage._get_stale_trial_ids(study._study_id))  # what Optuna's fail_stale_trials checks
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        alive = _worker_alive(worker) if worker else None
        if alive is False or (alive is None and t._trial_id in stale):
            with contextlib.suppress(UpdateFinishedTrialError):  # it finished, or another worker was quicker
                storage.set_trial_user_attr(t._trial_id, "error", "its worker died (killed sweep?); run again")
                storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)


def _grid_key(params: dict[str, Any]) -> tuple:
    # 10 and 10.0 are one grid point (an old study's q_uniform params are floats); true and 1 are two (Python's
    # True == 1 would merge them); a list or mapping value (betas: [0.9, 0.95]) is keyed by its JSON
    def key(v):
        if isinstance(v, list | dict):
            return json.dumps(v, sort_keys=True)
        return int(v) if isinstance(v, float) and v.is_integer() else v

    return tuple((type(v) is bool, key(v)) for v in params.values())


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
    run: Callable[[list[str], Path, str, str], float] | None = None,
    max_initial_failures: int = MAX_INITIAL_FAILURES,
) -> dict[str, Any]:
    """Run (or resume) the sweep until `count` trials have completed or are running; returns the summary written to
    summary.json.

    Failed trials do not count, so a restart runs them (a grid point, a random draw) anew; within one run a grid
    point is tried once and at most `count` minus the completed trials are started, so a trial that always crashes
    cannot loop. When the first `max_initial_failures` trials of this run all fail by themselves (a typo in the
    command, a data file missing), the sweep stops there (W&B's agent stops on failures too), instead of starting
    every other trial only to fail the same way; 0 never stops."""
    try:
        import optuna
    except ImportError:
        raise LMError('lm sweep --local needs optuna: pip install "lm[sweep]"') from None
    from optuna.trial import TrialState

    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    grid = None
    if config["method"] == "grid":
        space = grid_space(config["parameters"])
        # every parameter of the sweep, in its order, constants included: what the trial's command gets
        grid = [dict(zip(space, values, strict=True)) for values in itertools.product(*space.values())]
        count = min(count or len(grid), config.get("run_cap") or len(grid), len(grid))  # W&B caps a grid by run_cap
    elif count is None:
        count = config.get("run_cap")
        if count is None:
            raise LMError(f"a {config['method']} sweep never ends by itself: pass --count N (or set run_cap)")
    elif config.get("run_cap"):
        count = min(count, config["run_cap"])  # W&B's run_cap bounds the whole sweep, whatever an agent's count
    for key, value in (
        ("early_terminate", config.get("early_terminate")),
        ("metric.target", config["metric"].get("target")),
    ):
        if value is not None:
            print(f"lm sweep: {key} is ignored by local sweeps")

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(out, e) from None
    # Trial folders are numbered per study: a second study in the same --out would write into the first one's, and
    # resume from its checkpoints
    marker = out / "study_name"
    held = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
    if held is not None and held != name:
        raise LMError(f"{out} holds the trials of study {held!r}; give study {name!r} another --out")
    if held is None:
        try:
            marker.write_text(name + "\n", encoding="utf-8")
        except OSError as e:
            raise cannot_write(marker, e) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, flag = (storage, "--storage") if storage else (f"sqlite:///{(out / 'optuna.db').resolve()}", f"--out {out}")
    study = optuna.create_study(
        study_name=name,
        storage=_storage(url, flag),
        sampler=make_sampler(config, seed),
        direction=goal,
        load_if_exists=True,  # a second worker, or a restarted sweep, joins the same study
    )
    # Optuna ignores `direction` when it loads a study: a sweep file edited to another metric or goal would count
    # and rank the old trials' values as the new metric's, and go on optimising the old direction.
    recorded = study.user_attrs.get("metric"), study.user_attrs.get("goal")
    if recorded == (None, None) and study.direction.name.lower() != goal:  # a study from before these attributes
        recorded = ("its metric", study.direction.name.lower())
    if recorded == (None, None):
        study.set_user_attr("metric", metric)
        study.set_user_attr("goal", goal)
    elif recorded != (metric, goal):
        raise LMError(
            f"study {name!r} was run for {recorded[0]} ({recorded[1]}), this sweep asks for {metric} ({goal}): "
            "give it another --out (and, in a shared --storage, another --name)"
        )
    # Nor another parameter set: a copied sweep file that kept `name:` counted the old trials towards --count (and
    # ran none of its own) and ranked them as its own, their new parameters shown as None. Values may change.
    names = sorted(config["parameters"])
    recorded = study.user_attrs.get("parameters")  # studies begun before this check: their trials' params say
    ran = recorded or next(
        (sorted(t.user_attrs["params"]) for t in study.get_trials(deepcopy=False) if "params" in t.user_attrs), None
    )
    if ran is not None and ran != names:
        raise LMError(
            f"study {name!r} swept the parameters {ran}, this sweep sweeps {names}: give it another --out (and, in "
            "a shared --storage, another --name)"
        )
    if recorded is None:
        study.set_user_attr("parameters", names)
    # ask/tell instead of study.optimize (which would decide --count and the grid per thread, unlocked): the
    # heartbeats that Optuna keeps in optimize are recorded by run_trials() below, so its warning does not apply.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    me = _worker_id()
    stop = Stop()
    workers = max(1, workers)
    if run is None:  # each worker's trials run on its own GPUs
        runs = [functools.partial(run_trial, stop=stop, devices=d) for d in worker_devices(workers)]
    else:  # the caller's (tests)
        runs = [run] * workers
    lock = threading.Lock()  # one worker at a time decides what runs next, so --count and the grid hold

    def point(t: Any) -> tuple:
        # the grid point of a trial: what it ran with, or was enqueued with (just asked for, in another process),
        # or (a study of an older lm) Optuna's params with the constants added
        ran = t.user_attrs.get("params") or t.system_attrs.get("fixed_params")  # fixed: old enqueued retries
        return _grid_key(ran or {n: t.params.get(n, spec.get("value")) for n, spec in config["parameters"].items()})

    _fail_dead_trials(study)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    budget = count - len(done)  # random/bayes: trials this run may start
    if grid is not None:
        order = random.Random(seed or 0).sample(range(len(grid)), len(grid))  # --count < grid: an even sample
        keys = [_grid_key(p) for p in grid]
        todo = set(keys) - {point(t) for t in done}  # the points this run may try, each once
    said_wait = False

    def claimed_before(number: int) -> list[Any]:
        # A trial asked for a moment ago by another process may not show its params yet: give it a few seconds.
        for _ in range(50):
            before = [
                t
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if t.number < number
            ]
            now = datetime.datetime.now()
            if not any(
                "params" not in t.user_attrs and t.datetime_start and (now - t.datetime_start).total_seconds() < 10
                for t in before
                if t.state == TrialState.RUNNING
            ):
                break
            time.sleep(0.1)
        return before

    def wait_for(others: list[Any]) -> str:
        # nothing to start now, but a trial that another worker (process, machine) runs may die and need this run
        nonlocal said_wait
        if not said_wait:
            numbers = ", ".join(str(t.number) for t in others)
            print(f"lm sweep: waiting for trials {numbers} of other workers (run here if they die)", flush=True)
            said_wait = True
        return "wait"

    def next_trial() -> tuple[Any, dict[str, Any]] | str:
        """A trial to run, "wait" (a trial another worker runs may die and need this run), or "done"."""
        with lock:
            while not stop.requested.is_set():
                job = claim()
                if job != "lost":
                    return job
            return "done"

    def claim() -> tuple[Any, dict[str, Any]] | str:
        nonlocal budget
        _fail_dead_trials(study)
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        running = [t for t in trials if t.state == TrialState.RUNNING]
        others = [t for t in running if t.user_attrs.get("worker") != me]
        if grid is not None:
            # points of the current grid only: a value replaced or removed since the study began ran, but it must
            # not take a new value's place in the count
            taken = {point(t) for t in trials} & set(keys)
            free = [i for i in order if keys[i] in todo and keys[i] not in taken]
            if len(taken) < count and free:
                todo.discard(keys[free[0]])
                # not enqueue_trial: two processes can pop the same enqueued trial from SQLite
                study.sampler.point = grid[free[0]]
            elif held := [t for t in others if point(t) in todo]:
                return wait_for(held)
            else:
                return "done"
        elif len(trials) < count and budget > 0:
            budget -= 1
        elif others and budget > 0:
            return wait_for(others)
        else:
            return "done"
        trial = study.ask()
        trial.set_user_attr("worker", me)
        study._storage.record_heartbeat(trial._trial_id)
        # random/bayes: the oldest cut-off trial, resumed before any new draw
        resumed = None if grid is not None else next(iter(unresumed_cut_offs()), None)
        if resumed is not None:  # random/bayes: a cut-off trial's draw again, to resume it rather than draw anew
            study.sampler.replay = dict(resumed[0].params)
            trial.set_user_attr("resumes_trial", resumed[0].number)
        if grid is not None:
            # The grid point as chosen, with no Optuna distribution recorded: a grid whose values were extended
            # since the study began (a natural edit) would otherwise be refused by Optuna
            params = dict(study.sampler.point)
        else:
            try:
                params = suggest(trial, config["parameters"])
            except ValueError as e:  # Optuna: this study drew the parameter from other values or bounds
                trial.set_user_attr("dropped", f"parameters changed since the study began: {e}")
                study.tell(trial, state=TrialState.FAIL)
                raise LMError(
                    f"study {name!r} in {out} drew its parameters from other values or bounds ({e}); run the edited "
                    "sweep with another --out"
                ) from None
            finally:
                study.sampler.replay = {}
        # what the trial runs with: q_log_uniform_values rounds Optuna's draw (trial.params keeps the draw)
        trial.set_user_attr("params", params)
        # The thread lock holds within this process only. Workers elsewhere may have claimed the same grid point
        # or the last place in --count at the same instant: the lowest trial number wins (the storage numbers
        # trials atomically); the others drop theirs and choose again.
        before = claimed_before(trial.number)
        taken = {point(t) for t in before} & set(keys) if grid is not None else before
        twice = resumed is not None and any(t.user_attrs.get("resumes_trial") == resumed[0].number for t in before)
        if len(taken) >= count or (grid is not None and _grid_key(params) in taken) or twice:
            trial.set_user_attr("dropped", "another worker took this point or the last place in --count")
            study.tell(trial, state=TrialState.FAIL)
            if grid is not None:
                todo.add(_grid_key(params))
            else:
                budget += 1
            return "lost"
        root = out / f"trial-{trial.number:04d}"
        if grid is not None:  # the newest cut-off trial of this point that no trial resumed yet, if any
            key = _grid_key(params)
            resumed = next((c for c in reversed(unresumed_cut_offs()) if point(c[0]) == key), None)
            if resumed is not None:
                trial.set_user_attr("resumes_trial", resumed[0].number)
        if resumed is not None:
            # In the cut-off trial's folder: its ModelCheckpoint keeps the best score of the validations before the
            # cut only where the checkpoint directory is the same.
            _, root, last = resumed
            trial.set_user_attr("resumes", str(last))
        trial.set_user_attr("root", str(root))
        return trial, params

    def cut_offs() -> list[tuple[Any, Path, Path]]:
        """The trials that the sweep's stop or death cut off after a checkpoint, oldest first: (trial, its root, its
        newest last.ckpt)."""
        found = []
        for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)), key=lambda t: t.number):
            if t.user_attrs.get("interrupted") and t.user_attrs.get("root"):
                root = Path(t.user_attrs["root"])
                if last := newest_last_checkpoint(root):
                    found.append((t, root, last))
        return found

    def unresumed_cut_offs() -> list[tuple[Any, Path, Path]]:
        """cut_offs() that no trial resumes yet (a trial dropped for a lost claim does not count), oldest first. A
        resumed trial that then failed by itself, its crash checkpoint in the same folder, is not resumed again."""
        trials = study.get_trials(deepcopy=False)
        taken = {t.user_attrs.get("resumes_trial") for t in trials if not t.user_attrs.get("dropped")}
        return [c for c in cut_offs() if c[0].number not in taken]

    def heartbeat(trial_id: int, finished: threading.Event) -> None:
        while not finished.wait(HEARTBEAT_S):
            study._storage.record_heartbeat(trial_id)

    errors: list[BaseException] = []
    outcomes = {"completed": 0, "failed": 0}  # this run's trials that ended by themselves
    outcomes_lock = threading.Lock()
    gave_up: list[str] = []  # why no new trial starts: the running ones finish, then the sweep stops with it

    def count_failure(error: TrialFailed) -> None:
        with outcomes_lock:
            outcomes["failed"] += 1
            if gave_up or outcomes["completed"] or not 0 < max_initial_failures <= outcomes["failed"]:
                return
            gave_up.append(
                f"sweep {name}: its first {outcomes['failed']} trials to end failed, the last with {error}; no new "
                f"trial was started (--max_initial_failures {max_initial_failures}; 0 goes on)"
            )

    def work(run: Callable[[list[str], Path, str, str], float]) -> None:
        try:
            run_trials(run)
        except BaseException as e:  # a bug, or a user error the sweep file made: stop everything and raise it
            errors.append(e)
            stop.name = stop.name or type(e).__name__
            stop.requested.set()

    def run_trials(run: Callable[[list[str], Path, str, str], float]) -> None:
        while True:
            if gave_up:
                return
            job = next_trial()
            if job == "done":
                return
            if job == "wait":
                stop.requested.wait(min(HEARTBEAT_S, GRACE_S / 3))
                continue
            trial, params = job
            root = Path(trial.user_attrs["root"])
            print(f"lm sweep: trial {trial.number} {params} -> {root}", flush=True)
            finished = threading.Event()
            beat = threading.Thread(target=heartbeat, args=(trial._trial_id, finished), daemon=True)
            beat.start()
            argv = trial_command(config, params, extra)
            if resume := trial.user_attrs.get("resumes"):
                print(f"lm sweep: trial {trial.number} resumes {resume}", flush=True)
                argv.append(f"--ckpt_path={resume}")
            try:
                value = run(argv, root, metric, goal)
            except TrialFailed as e:
                trial.set_user_attr("error", str(e))
                if stop.requested.is_set():  # cut off, not failed by itself: its point resumes on a restart
                    trial.set_user_attr("interrupted", True)
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                print(f"lm sweep: trial {trial.number} failed: {e}", flush=True)
                if not trial.user_attrs.get("interrupted"):
                    count_failure(e)
                continue
            except BaseException:
                # a bug: record the trial as failed rather than leave it RUNNING
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
            finally:
                finished.set()
            study.tell(trial, value, skip_if_finished=True)
            with outcomes_lock:
                outcomes["completed"] += 1
            print(f"lm sweep: trial {trial.number} best {metric} = {value:.4f}", flush=True)

    # Signals reach the main thread only, which is here joining the workers; without a handler Ctrl-C is a
    # traceback out of join() and SIGTERM leaves the trials' `lm fit` running as orphans.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, stop) for s in handled}
    try:
        threads = [threading.Thread(target=work, args=(runs[i],), name=f"sweep-worker-{i}") for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if errors:
        raise errors[0]
    summary = summarize(study, config, out)
    if gave_up:
        raise LMError(gave_up[0])
    if stop.requested.is_set():
        raise LMError(f"sweep {name} stopped by {stop.name}: start the same command again to finish it")
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if outcomes["failed"] and completed < count:  # not replaced within a run: a trial that always fails would loop
        print(
            f"lm sweep: {completed} of {count} trials completed; {outcomes['failed']} failed in this run (their logs "
            "are above): start the same command again to run them anew",
            flush=True,
        )
    return summary


def summarize(study: Any, config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Print params -> best metric for every trial (best first) and write it to <out>/summary.json."""
    from optuna.trial import TrialState

    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    names = list(config["parameters"])
    rows = []
    # a trial dropped at once because another worker claimed the same point is no part of the sweep
    for t in (t for t in study.get_trials(deepcopy=False) if "dropped" not in t.user_attrs):
        ran = t.user_attrs.get("params") or {}  # the values passed to lm fit (older studies: Optuna's draws)
        params = {n: ran.get(n, t.params.get(n, config["parameters"][n].get("value"))) for n in names}
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
    cells = [[str(r["params"][n]) for n in names] for r in rows]
    # As wide as the longest value too: a random or bayes draw (0.00027762939504459577) is wider than its header, and
    # a column sized by the header alone pushed every later column out from under its own header
    widths = [max([len(s), 10, *(len(row[i]) for row in cells)]) for i, s in enumerate(short)]
    print(f"\nlm sweep {study.study_name}: {len(rows)} trials, best {metric} first")
    print("  ".join(["trial", "state   ", *(s.rjust(w) for s, w in zip(short, widths, strict=True)), metric]))
    for r, row in zip(rows, cells, strict=True):
        value = f"{r[metric]:.4f}" if r[metric] is not None else (r["error"] or "")[:60]
        padded = [cell.rjust(w) for cell, w in zip(row, widths, strict=True)]
        print("  ".join([f"{r['trial']:>5}", f"{r['state']:<8}", *padded, value]))
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

    project = project or config.get("project") or "lm-sweeps"  # read before they leave the config W&B gets
    entity = entity or config.get("entity")
    config = {k: v for k, v in config.items() if k not in ("project", "entity")}
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
    p = ArgumentParser(
        prog="lm sweep",
        description="Run a W&B-format sweep file: on the W&B server, or locally with Optuna (--local).",
        epilog="Arguments after `--` are appended to every trial's command, e.g. -- --trainer.max_steps 10",
    )
    p.add_argument("file", help="sweep YAML in W&B's format (sweeps/*.yaml)")
    p.add_argument("--local", action="store_true", help="no W&B server: Optuna study in SQLite, W&B runs offline")
    p.add_argument("--count", type=int, default=None, help="trials in total (local: the study's total, resumable)")
    p.add_argument("--workers", type=int, default=1, help="local: trials run at the same time by this process")
    p.add_argument("--storage", default=None, help="local: Optuna storage URL (default sqlite:///<out>/optuna.db)")
    p.add_argument(
        "--name", default=None, help="sweep name, on W&B or the local study (default: the file's `name` or its stem)"
    )
    p.add_argument("--out", default=None, help="local: sweep directory (default runs/sweeps/<name>)")
    p.add_argument("--seed", type=int, default=None, help="local: sampler seed")
    p.add_argument(
        "--max_initial_failures",
        type=int,
        default=MAX_INITIAL_FAILURES,
        help=f"local: stop when this run's first N trials all fail (default {MAX_INITIAL_FAILURES}; 0: never)",
    )
    p.add_argument("--project", default=None, help="W&B project (default: the file's `project` or lm-sweeps)")
    p.add_argument("--entity", default=None, help="W&B entity (default: your default entity)")
    args = p.parse_args(argv)

    config = load_sweep(args.file)
    if args.count is not None and args.count < 1:
        raise LMError(f"--count must be at least 1, got {args.count}")
    if args.workers < 1:
        raise LMError(f"--workers must be at least 1, got {args.workers}")
    if args.seed is not None and not 0 <= args.seed < 2**32:  # Optuna's samplers seed numpy, which takes no other
        raise LMError(f"--seed must be in [0, {2**32 - 1}] (numpy's seeds), got {args.seed}")
    # A swept key after `--` would be overridden by the sweep's value in every trial: refused, not silently ignored
    swept = [a for a in extra if a.startswith("--") and a[2:].split("=", 1)[0] in config["parameters"]]
    if swept:
        raise LMError(f"{swept[0].split('=', 1)[0]} after `--` is a parameter of the sweep; leave it to the sweep")
    # The sweep's name on W&B as locally (it got a null name, that the server left to its own naming)
    name = args.name or config.get("name") or Path(args.file).stem
    # A flag of the other mode did nothing: `--workers 4` on W&B ran one agent, `--project` locally left the trials'
    # W&B runs in their experiment's project
    local_only = {
        "--workers": args.workers != 1,
        "--storage": args.storage is not None,
        "--out": args.out is not None,
        "--seed": args.seed is not None,
        "--max_initial_failures": args.max_initial_failures != MAX_INITIAL_FAILURES,
    }
    given = [flag for flag, set_ in local_only.items() if set_]
    if not args.local and given:
        raise LMError(f"{given[0]} only applies to --local sweeps (on W&B, more agents: wandb agent SWEEP_PATH)")
    wandb_only = [flag for flag, value in (("--project", args.project), ("--entity", args.entity)) if value]
    if args.local and wandb_only:
        raise LMError(
            f"{wandb_only[0]} only applies to W&B sweeps; a local trial logs to its experiment's W&B project and "
            "entity (trainer.logger.init_args.project, .entity)"
        )
    if not args.local:
        if extra:
            raise LMError("arguments after `--` only apply to --local sweeps; put them in the file's command")
        run_wandb(config | {"name": name}, count=args.count, project=args.project, entity=args.entity)
        return
    if not re.fullmatch(r"[\w.-]+", name):
        raise LMError(f"sweep name {name!r}: use letters, digits, '.', '_' or '-'")
    out = Path(args.out or Path("runs") / "sweeps" / name)
    summary = run_local(
        config,
        name=name,
        out=out,
        count=args.count,
        workers=args.workers,
        storage=args.storage,
        seed=args.seed,
        extra=extra,
        max_initial_failures=args.max_initial_failures,
    )
    if summary["best"] is None:
        raise LMError(f"no trial of sweep {name} finished: see the trial.log files under {out}")
