"""Reading checkpoints for inference: any file that is not an lm checkpoint is a one-line LMError, and the model
lands on the device asked for."""

import pytest
import torch

from lm.checkpoint import load_for_inference, read_checkpoint
from lm.errors import LMError
from lm.tokenizer import CharTokenizer
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
