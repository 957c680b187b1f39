"""Loading `lm` checkpoints outside of training: a `.ckpt` is self-contained (weights, model config, tokenizer).

model, tokenizer, info = load_checkpoint("runs/quickstart/checkpoints/last.ckpt")
"""

from pathlib import Path

import torch

from lm.config import GPTConfig
from lm.errors import LMError
from lm.model import GPT
from lm.tokenizer import Tokenizer


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The raw checkpoint dict, loaded without executing pickled code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise LMError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load on a file that is not a checkpoint raises almost anything (KeyError, ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = "truncated or corrupted, or no .ckpt at all?"
        raise LMError(f"{path}: not a readable checkpoint ({why}): {first_line}") from e
    if not isinstance(ckpt, dict):
        raise LMError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def gpt_state_dict(ckpt: dict) -> dict:
    """The GPT's own weights in a Lightning checkpoint (LanguageModel keeps the GPT as `self.model`)."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def load_checkpoint(path: str | Path, map_location="cpu") -> tuple[GPT, Tokenizer, dict]:
    """Build the GPT and tokenizer stored in an `lm` checkpoint; returns (model in eval mode, tokenizer, info)."""
    ckpt = read_checkpoint(path, map_location)
    info = ckpt.get("lm")
    if not info or info.get("tokenizer") is None:
        raise LMError(f"{path}: not an lm checkpoint (no model config/tokenizer inside)")
    model = GPT(GPTConfig(**info["model_config"]))
    model.load_state_dict(gpt_state_dict(ckpt))
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
    model, tokenizer, info = load_checkpoint(path)
    return model.to(target), tokenizer, info, device
