"""Shared fixtures. Tests run offline: the environment pins HF/W&B to offline mode for every test."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import Logger

# ../shared/data beside the checkout (README, "Tests"), or wherever LM_SHARED_DATA points
SHARED_DATA = Path(os.environ.get("LM_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
REPO = Path(__file__).resolve().parents[1]

# Features of a newer torch than the oldest lm supports (pyproject.toml: torch>=2.6); lm refuses them in one line there
needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="model.optimizer muon: torch >= 2.9")
needs_cpu_fp8 = pytest.mark.skipif(torch.__version__ < (2, 8), reason="model.fp8 on CPU (_scaled_mm): torch >= 2.8")
OPTIMIZERS = ["adamw", pytest.param("muon", marks=needs_muon)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # No console capture: wandb < 0.19.8 captures it by setting sys.stderr.write to its own. The run this fixture
    # finishes after capsys is gone put back the capsys stream's write, closed by then. So every later write to
    # stderr, lightning's "Seed set to 0" say, failed with "--- Logging error ---".
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the data cache never leaks between tests
    # wandb-core's system monitor logs to $WANDB_CACHE_DIR, else $HOME/.cache/wandb/logs (it ignores XDG_CACHE_HOME);
    # its settings go to $WANDB_CONFIG_DIR, else ~/.config/wandb. Child processes inherit all three.
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    # A test that forgets its tmp_path writes there, not into whatever directory pytest was started in (the checkout)
    monkeypatch.chdir(tmp_path)
    yield
    # An lm fit run in this process with W&B on (one that stops with an error, say) leaves its run open, as the CLI's
    # process exit would close it, and its service named in $WANDB_SERVICE: a later test's logger took that run over,
    # and the lm processes a later test started joined that service, their W&B files missing from their roots
    wandb = sys.modules.get("wandb")
    if wandb is not None and "WANDB_SERVICE" in os.environ:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)


def _checkout_files() -> set[str]:
    """Every file and folder under the checkout, ignored ones included, but git's, the venv's and the caches'."""
    skip = {".git", ".venv", ".pytest_cache", ".ruff_cache", "__pycache__", "lm.egg-info"}
    found = set()
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip]
        found.update(os.path.relpath(os.path.join(folder, name), REPO) for name in dirs + files)
    return found


@pytest.fixture(scope="session", autouse=True)
def _checkout_untouched():
    """Unit tests write under tmp_path only: anything new in the checkout (runs/debug/checkpoints, lightning_logs,
    wandb/) fails the session loudly instead of piling up unseen (runs/ and wandb/ are git-ignored)."""
    before = _checkout_files()
    yield
    added = sorted(_checkout_files() - before)
    assert not added, f"tests wrote into the checkout: {added[:20]}"


# What a launcher (Slurm, torchrun) or a W&B sweep agent sets around the test run: Lightning would take it for its own
# cluster (expecting srun to start rank 1, or using a fixed MASTER_PORT), and a Slurm SIGUSR1 test would requeue the
# job itself; lm fit would take an agent's run for a sweep trial.
LAUNCHER_VARIABLES = (
    *("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
    *("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_RESUME"),
)
LAUNCHER_PREFIXES = ("SLURM_", "SRUN_", "TORCHELASTIC_")


@pytest.fixture(scope="session", autouse=True)
def _no_launcher_environment():
    """Tests and the processes they start see no launcher's variables, whatever shell or job runs pytest."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name in LAUNCHER_VARIABLES or name.startswith(LAUNCHER_PREFIXES):
                patch.delenv(name)
        yield


@pytest.fixture(scope="session", autouse=True)
def _scratch_tmpdir(tmp_path_factory):
    """Temporary files (W&B's media and artifact folders, which runs killed on purpose never delete) go to a folder
    of pytest's, which it prunes, instead of piling up in the system's /tmp; child processes inherit it."""
    scratch = tmp_path_factory.mktemp("tmpdir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(scratch))
        patch.setattr(tempfile, "tempdir", str(scratch))
        yield


def shared_file(name: str) -> Path:
    """A file of ../shared/data; integration tests fail loudly (not skip) when it is missing, as CI must see it."""
    path = SHARED_DATA / name
    assert path.is_file(), (
        f"{path} is missing: the integration tests need ../shared/data beside the checkout (or LM_SHARED_DATA)"
    )
    return path


def cli_env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.update(extra)
    return env


class MemoryLogger(Logger):
    """A Lightning logger that keeps what it is sent: `calls` in order, one (step, metrics) per log_metrics call."""

    name, version = "memory", 0

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def by_step(self) -> dict[int, dict]:
        """All metrics logged at each step, merged."""
        steps: dict[int, dict] = {}
        for step, metrics in self.calls:
            steps.setdefault(step, {}).update(metrics)
        return steps


def nan_loss_from_step(module, step: int) -> None:
    """Make `module`'s loss NaN from optimizer step `step` on (a run that diverges there)."""
    model_step = module.model_step

    def nan_from_step(batch):
        loss, n_tokens = model_step(batch)
        return (loss * float("nan") if module.trainer.global_step >= step else loss), n_tokens

    module.model_step = nan_from_step
