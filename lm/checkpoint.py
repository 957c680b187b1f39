"""Loading `lm` checkpoints outside of training: a `.ckpt` is self-contained (weights, model config, tokenizer).

model, tokenizer, info = load_checkpoint("runs/quickstart/checkpoints/last.ckpt")
"""

import pickle
import zipfile
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
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LMError(f"{path}: not a readable checkpoint (truncated or corrupted?): {first_line}") from e


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
    """`load_checkpoint` onto a device for the inference commands; "auto" means CUDA when there is one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, info = load_checkpoint(path, map_location=device)
    return model, tokenizer, info, device
