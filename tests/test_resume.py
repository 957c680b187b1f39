"""Exact resume after SIGKILL, through the real CLI: a killed-and-resumed run retraces the uninterrupted one.

Run A trains N steps uninterrupted. Run B checkpoints every step, is killed with SIGKILL once it has passed a random
step k, and is resumed with `--ckpt_path last`. From the resumed step on, B's per-step train losses and its final
weights must equal A's exactly (CPU, same threads). The corpus is small so that an epoch is 10 batches and both runs
cross several epoch boundaries after the kill; dropout is on, so the RNG state has to travel in the checkpoint too.
"""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, cli_env

STEPS = 32


def corpus(path: Path) -> Path:
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "mind"]
    # 5,700 characters: with val_fraction 0.1, batch 8 and context 64 an epoch is 10 batches
    path.write_text(" ".join(rng.choice(words) for _ in range(1140))[:5700])
    return path


def fit_command(root: Path, source: Path, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lm",
        "fit",
        "--config",
        str(REPO / "experiments/debug.yaml"),
        "--data.init_args.source",
        str(source),
        "--model.init_args.arch.dropout",
        "0.1",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.val_check_interval",
        "7",
        "--data.init_args.val_windows",
        "16",
        "--samples.max_new_tokens",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.logger.init_args.flush_logs_every_n_steps",
        "1",
        *extra,
    ]


def env(tmp: Path) -> dict:
    # one thread: CPU kernels then reduce in a fixed order, so "exactly equal" is a fair demand
    return cli_env(XDG_CACHE_HOME=str(tmp / "cache"), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def train_losses(root: Path) -> dict[int, float]:
    """step -> train/loss from every CSV log under root (a resumed run writes a new version directory)."""
    losses = {}
    for metrics in sorted(root.glob("**/version_*/metrics.csv")):
        with open(metrics) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def last_step(ckpt: Path) -> int:
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_a")
    source = corpus(tmp / "corpus.txt")
    root = tmp / "a"
    done = subprocess.run(fit_command(root, source), env=env(tmp), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return source, root


@pytest.mark.slow
@pytest.mark.parametrize("kill_range", [(2, 6), (8, 11)], ids=["mid-epoch0", "epoch-boundary"])
def test_sigkill_then_resume_retraces_the_uninterrupted_run(uninterrupted, tmp_path, kill_range):
    source, root_a = uninterrupted
    root_b = tmp_path / "b"
    last = root_b / "checkpoints" / "last.ckpt"
    kill_at = random.randint(*kill_range)  # a different step each run; the messages below name it
    command = fit_command(root_b, source, "--checkpoint.every_n_train_steps", "1")

    # Output to a file: a pipe nobody reads while the loop polls would stall the run once it filled
    with open(tmp_path / "victim.log", "w") as log:
        victim = subprocess.Popen(command, env=env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while last_step(last) < kill_at and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim.poll() is None, f"the run finished before it could be killed at step {kill_at}"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    resumed_from = last_step(last)
    assert 0 < resumed_from < STEPS, f"killed at step {kill_at}"

    done = subprocess.run(
        [*command, "--ckpt_path", "last"], env=env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in done.stdout + done.stderr

    a, b = train_losses(root_a), train_losses(root_b)
    after = [step for step in sorted(a) if step >= resumed_from]
    assert after and after[-1] == STEPS - 1
    assert [b[step] for step in after] == [a[step] for step in after], f"resumed from step {resumed_from}"  # exactly
    final_a, final_b = weights(root_a / "checkpoints/last.ckpt"), weights(last)
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_a_checkpoint_and_the_run_resumes(uninterrupted, tmp_path, signum):
    """What SLURM sends before preemption: the step finishes, last.ckpt is written, the process exits; a resume
    with --ckpt_path last carries on from that step."""
    source, _ = uninterrupted
    root = tmp_path / "run"
    # No periodic checkpoints, and the first validation (which writes one) at step 30: until then only the signal
    # writes a checkpoint. (At step 7, as in the other tests, the poll below sometimes saw step 2 too late.)
    command = fit_command(root, source, "--trainer.val_check_interval", "30")
    # Output to files: a pipe nobody reads while the loop polls would stall the run once it filled
    with open(tmp_path / "out.log", "w+") as out_log, open(tmp_path / "err.log", "w+") as err_log:
        victim = subprocess.Popen(command, env=env(tmp_path), stdout=out_log, stderr=err_log)
        deadline = time.monotonic() + 240
        while max(train_losses(root), default=-1) < 2 and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victim.send_signal(signum)
        victim.wait(timeout=120)
    out, err = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert victim.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by a signal after saving a checkpoint" in out
    assert "Traceback" not in err
    stopped_at = last_step(root / "checkpoints" / "last.ckpt")
    assert 2 <= stopped_at < 30  # saved by the signal, before the first validation could have saved one

    done = subprocess.run(
        [*command, "--ckpt_path", "last"], env=env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    restored = f"Restored all states from the checkpoint at {root / 'checkpoints' / 'last.ckpt'}"
    assert restored in done.stdout + done.stderr
    resumed_log = max(root.glob("**/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    with open(resumed_log) as f:
        resumed_steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert resumed_steps[0] == stopped_at  # carries on from the saved step, not from step 0
    assert last_step(root / "checkpoints" / "last.ckpt") == STEPS
