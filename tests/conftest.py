"""Shared fixtures. Tests run offline: the environment pins HF/W&B to offline mode for every test."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the data cache never leaks between tests


def shared_file(name: str) -> Path:
    """A file of ../shared/data; integration tests fail loudly (not skip) when it is missing, as CI must see it."""
    path = SHARED_DATA / name
    assert path.is_file(), f"{path} is missing: the integration tests need ../shared/data beside the checkout"
    return path


def cli_env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.update(extra)
    return env
