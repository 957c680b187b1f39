"""Reading checkpoints for inference: any file that is not an lm checkpoint is a one-line LMError, and the model
lands on the device asked for."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_for_inference, read_checkpoint
from lm.errors import LMError
from lm.tokenizer import CharTokenizer
from tests.conftest import REPO, cli_env
from tests.test_eval import write_checkpoint


@pytest.mark.parametrize(
    "content",
    [b"just some text\n", b"", None],  # a text file, an empty file, a pickle of a list
)
def test_files_that_are_not_checkpoints_are_lm_errors(tmp_path, content):
    path = tmp_path / "x.ckpt"
    if content is None:
        torch.save([1, 2], path)
    else:
        path.write_bytes(content)
    with pytest.raises(LMError, match="x.ckpt: not a") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)


def test_load_for_inference_moves_the_model_to_the_device(tmp_path):
    path = tmp_path / "model.ckpt"
    write_checkpoint(path, CharTokenizer("abc"), n_layer=1, n_head=2, n_embd=16, block_size=8)
    model, _, _, device = load_for_inference(path, "cpu")
    assert device == "cpu" and {p.device.type for p in model.parameters()} == {"cpu"}
    # "meta" stands in for a GPU here: what matters is that parameters and buffers follow the device argument.
    model, _, _, _ = load_for_inference(path, "meta")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "gpu0"])
def test_unusable_devices_are_lm_errors(tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, also on a GPU one
    path = tmp_path / "model.ckpt"
    write_checkpoint(path, CharTokenizer("abc"), n_layer=1, n_head=2, n_embd=16, block_size=8)
    with pytest.raises(LMError, match=f"--device {device}"):
        load_for_inference(path, device)


def test_a_device_this_build_or_machine_lacks_is_an_lm_error(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    write_checkpoint(path, CharTokenizer("abc"), n_layer=1, n_head=2, n_embd=16, block_size=8)
    if not torch.backends.mps.is_available():  # this CPU build: torch raises a RuntimeError moving a model there
        with pytest.raises(LMError, match="--device mps: not usable here"):
            load_for_inference(path, "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LMError, match="--device cuda:7: this machine has 1 CUDA device"):
        load_for_inference(path, "cuda:7")


def test_the_device_index_past_the_last_gpu_is_an_lm_error(tmp_path, monkeypatch):
    """CUDA devices count from 0: on a two-GPU machine cuda:1 is the last one and cuda:2 is none."""
    path = tmp_path / "model.ckpt"
    write_checkpoint(path, CharTokenizer("abc"), n_layer=1, n_head=2, n_embd=16, block_size=8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LMError, match="^--device cuda:2: this machine has 2 CUDA device"):
        load_for_inference(path, "cuda:2")


def test_a_loaded_model_is_in_eval_mode(tmp_path):
    """Inference on a model left in training mode would apply dropout to every answer."""
    path = tmp_path / "model.ckpt"
    write_checkpoint(path, CharTokenizer("abc"), n_layer=1, n_head=2, n_embd=16, block_size=8)
    model, _, info = load_checkpoint(path)
    assert not any(m.training for m in model.modules())
    assert info["global_step"] == 3


def _broken(tmp_path, change) -> str:
    """A good checkpoint with one thing changed by change(ckpt dict)."""
    path = tmp_path / "model.ckpt"
    write_checkpoint(path, CharTokenizer("abc"), n_layer=1, n_head=2, n_embd=16, block_size=8)
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["lm"]["model_config"].update(sliding_window=128), r"fields \['sliding_window'\] are unknown"),
        (lambda c: c["lm"].update(format=99), "checkpoint format 99 is newer than this lm reads"),
        (
            lambda c: c["lm"].update(format=CHECKPOINT_FORMAT + 1),
            f"checkpoint format {CHECKPOINT_FORMAT + 1} is newer than this lm reads \\({CHECKPOINT_FORMAT}\\)",
        ),
        (lambda c: c.pop("state_dict"), "not a Lightning checkpoint"),
        (lambda c: c["state_dict"].pop("model.norm.weight"), 'Missing key.*"norm.weight"'),
        (lambda c: c["lm"]["model_config"].update(n_embd=32), "size mismatch for"),
        (lambda c: c.update(lm="an lm checkpoint"), "not an lm checkpoint"),
        (lambda c: c["lm"].pop("tokenizer"), "not an lm checkpoint"),  # the model alone cannot turn text into ids
    ],
)
def test_a_checkpoint_from_elsewhere_or_a_newer_lm_is_a_one_line_error(tmp_path, change, message):
    with pytest.raises(LMError, match=message) as info:
        load_for_inference(_broken(tmp_path, change), "cpu")
    assert "\n" not in str(info.value)


def test_a_path_from_the_home_directory_is_expanded(tmp_path, monkeypatch):
    """A YAML's `~/runs/.../last.ckpt` meets no shell to expand it: read as written, it was "not found"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_checkpoint(tmp_path / "model.ckpt", CharTokenizer("abc"), n_layer=1, n_head=2, n_embd=16, block_size=8)
    _, _, info = load_checkpoint("~/model.ckpt")
    assert info["global_step"] == 3


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(LMError, match="a directory, not a checkpoint file"):
        read_checkpoint(tmp_path)


def test_a_checkpoint_in_torch_s_older_format_reads_also_memory_mapped(tmp_path):
    """LanguageModel.context_length reads init_from's config memory-mapped; torch's non-zip format cannot be, and the
    file was refused as "truncated or corrupted" although training would load it."""
    path = tmp_path / "old.ckpt"
    torch.save({"lm": {"model_config": {"block_size": 32}}}, path, _use_new_zipfile_serialization=False)
    assert read_checkpoint(path, mmap=True) == read_checkpoint(path) == {"lm": {"model_config": {"block_size": 32}}}


def _checkpoint_with_optimizer_state(tmp_path) -> Path:
    """A tiny model's checkpoint carrying 128 MiB of optimizer state, as a training checkpoint carries AdamW's."""
    path = tmp_path / "model.ckpt"
    write_checkpoint(path, CharTokenizer("abc"), n_layer=1, n_head=2, n_embd=16, block_size=8)
    ckpt = torch.load(path, weights_only=True)
    ckpt["optimizer_states"] = [{"state": {0: {"exp_avg": torch.zeros(32 * 2**20)}}}]  # 128 MiB
    torch.save(ckpt, path)
    return path


def _peak_growth_mib(path: Path, setup: str, load: str) -> int:
    """How much `load` grows the peak resident memory (MiB) of a fresh process, after `setup`; both see `sys.argv[1]`
    = path. VmHWM, not ru_maxrss: Linux carries the parent's (this pytest's) ru_maxrss over into the child."""
    measure = (
        f"import sys; from pathlib import Path\n{setup}\n"
        "def peak_mib(): return int(Path('/proc/self/status').read_text().partition('VmHWM:')[2].split()[0]) // 1024\n"
        f"before = peak_mib()\n{load}\nprint(peak_mib() - before)"
    )
    run = subprocess.run([sys.executable, "-c", measure, path], env=cli_env(), cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
def test_inference_reads_the_weights_and_leaves_the_optimizer_state_on_disk(tmp_path):
    """A training checkpoint carries AdamW's state, twice the weights: `lm generate`, chat, eval, export and serve read
    all of it into memory before, three times the model's size at the peak. Measured in a fresh process, whose peak
    resident memory is this load's."""
    path = _checkpoint_with_optimizer_state(tmp_path)
    grown = _peak_growth_mib(path, "from lm.checkpoint import load_checkpoint", "load_checkpoint(sys.argv[1])")
    assert grown < 32, f"loading grew the peak resident memory by {grown} MiB"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
def test_init_from_reads_the_weights_and_leaves_the_optimizer_state_on_disk(tmp_path):
    """SFT and DPO start from a pretraining run's last.ckpt, AdamW's state included (twice the weights): the new run
    needs only the weights. Measured in a fresh process, as above."""
    path = _checkpoint_with_optimizer_state(tmp_path)
    setup = (
        "from lm.config import get_config; from lm.module import LanguageModel\n"
        "module = LanguageModel(get_config('tiny'), init_from=sys.argv[1])"
    )
    load = "module.configure_model()\nassert module.model.config.n_embd == 16, module.model.config"
    grown = _peak_growth_mib(path, setup, load)
    assert grown < 32, f"init_from grew the peak resident memory by {grown} MiB"
