"""Loading `lm` checkpoints outside of training: a `.ckpt` is self-contained (weights, model config, tokenizer).

model, tokenizer, info = load_checkpoint("runs/quickstart/checkpoints/last.ckpt")
"""

from pathlib import Path

import torch

from lm.config import GPTConfig
from lm.errors import LMError
from lm.model import GPT
from lm.tokenizer import Tokenizer

CHECKPOINT_FORMAT = 1  # bump when what LanguageModel.on_save_checkpoint writes under "lm" changes


def read_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """The raw checkpoint dict, loaded without executing pickled code (weights_only=True). mmap: the tensors stay on
    disk until read, for a caller that wants the metadata or a part of the tensors (the weights, not the optimizer
    state). "~" is expanded: a YAML's paths meet no shell."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise LMError(
            f"{path}: a directory, not a checkpoint file (a sharded checkpoint? lm reads one .ckpt file: train with "
            "the FSDP strategy's state_dict_type: full)"
        )
    if not path.is_file():
        raise LMError(f"{path}: checkpoint not found")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):
                raise
            # torch's older (non-zip) format cannot be memory-mapped; read it whole
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load on a file that is not a checkpoint raises almost anything (KeyError, ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "WeightsUnpickler error:" in str(e):
            # torch's first line advises weights_only=False ("will likely succeed"), which lm never does (and a text
            # file would not load either): its unpickler's own reason is the news
            lines = str(e).partition("WeightsUnpickler error:")[2].splitlines()
            reason = next((line for line in lines if line.strip()), "?")
            first_line = f"torch.load(weights_only=True): {reason.strip().partition('. Please')[0]}"
        why = "truncated or corrupted, or no .ckpt at all?"
        raise LMError(f"{path}: not a readable checkpoint ({why}): {first_line}") from e
    if not isinstance(ckpt, dict):
        raise LMError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def gpt_state_dict(ckpt: dict, where: str | Path = "the checkpoint") -> dict:
    """The GPT's own weights in a Lightning checkpoint (LanguageModel keeps the GPT as `self.model`)."""
    prefix = "model."
    if not isinstance(ckpt.get("state_dict"), dict):
        raise LMError(f"{where}: not a Lightning checkpoint (no state_dict inside)")
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def load_checkpoint(path: str | Path) -> tuple[GPT, Tokenizer, dict]:
    """Build the GPT and tokenizer stored in an `lm` checkpoint, on the CPU; returns (model in eval mode, tokenizer,
    info). `load_for_inference` moves it to a device.

    The file is memory-mapped: only the GPT's weights are read (and copied into the model), so the optimizer state a
    training checkpoint carries (AdamW: twice the weights) never occupies memory."""
    ckpt = read_checkpoint(path, mmap=True)
    info = ckpt.get("lm")
    if not isinstance(info, dict) or info.get("tokenizer") is None or "model_config" not in info:
        raise LMError(f"{path}: not an lm checkpoint (no model config/tokenizer inside)")
    if info.get("format", CHECKPOINT_FORMAT) > CHECKPOINT_FORMAT:
        raise LMError(f"{path}: checkpoint format {info['format']} is newer than this lm reads ({CHECKPOINT_FORMAT})")
    model = GPT(GPTConfig.from_dict(info["model_config"], str(path)))
    weights = gpt_state_dict(ckpt, path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # missing or misshapen weights: torch's second line names the first of them
        lines = [line.strip() for line in str(e).strip().splitlines()]
        raise LMError(f"{path}: the weights do not fit its model config: {lines[min(1, len(lines) - 1)]}") from e
    model.eval()
    info = {**info, "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"), "path": str(path)}
    return model, Tokenizer.from_state(info["tokenizer"]), info


def load_for_inference(path: str | Path, device: str = "auto") -> tuple[GPT, Tokenizer, dict, str]:
    """`load_checkpoint`, then the model moved to a device, for the inference commands ("auto": CUDA when there is
    one). The file is read onto the CPU first, so a checkpoint saved on any device loads on any other."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError:
        raise LMError(f"--device {device}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise LMError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
        raise LMError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    model, tokenizer, info = load_checkpoint(path)
    try:
        model = model.to(target)
    except (RuntimeError, AssertionError) as e:  # mps or xpu on a build or machine without them
        raise LMError(f"--device {device}: not usable here ({str(e).strip().splitlines()[0]})") from None
    return model, tokenizer, info, device
