"""The GPT architecture as one dataclass, and the named sizes the experiments and tests use.

Every field has an attribute docstring so that LightningCLI shows it in `lm fit --help` (`--model.arch.n_layer`).
Defaults are GPT-2 124M's shape with the modern pieces (RoPE, RMSNorm, SwiGLU) that Llama/Qwen3 use.
"""

import dataclasses
import math
from dataclasses import dataclass, replace

from lm.errors import LMError


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    """Rows of the embedding table. Set from the tokenizer when training (its size padded to a multiple of 64)."""
    block_size: int = 1024
    """Context length in tokens: the longest sequence the model is trained on and the size of the RoPE table."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Query heads per attention layer."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); None means n_head (plain multi-head attention)."""
    n_embd: int = 768
    """Width of the residual stream."""
    mlp_hidden: int | None = None
    """Hidden width of the SwiGLU MLP; None: 8/3 * n_embd rounded up to a multiple of 64 (~ a 4x GELU MLP's FLOPs)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys before RoPE (Qwen3 style); stabilises training at high learning rates."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (GPT-2 style); saves vocab_size * n_embd parameters."""
    dropout: float = 0.0
    """Dropout on the token embeddings, on attention probabilities and on each residual branch; 0 for pretraining
    on large data."""

    # n_kv_head and mlp_hidden stay None when not given (so a changed n_head/n_embd re-derives them); the model
    # reads the resolved values from these properties.

    def __post_init__(self):
        # LMError, not ValueError: a bad shape is a user's config error, reported in one line (DESIGN.md 8).
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LMError(f"{name} must be >= 1, got {value}")
        if not 0 <= self.dropout < 1:
            raise LMError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head:
            raise LMError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise LMError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.head_dim % 2:
            raise LMError(f"head size n_embd/n_head = {self.head_dim} must be even for RoPE")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):  # 0, negative or NaN: NaN logits
            raise LMError(f"rope_theta must be a finite number > 0, got {self.rope_theta}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps >= 0):
            raise LMError(f"norm_eps must be a finite number >= 0, got {self.norm_eps}")

    @classmethod
    def from_dict(cls, fields: dict, where: str) -> "GPTConfig":
        """The config a checkpoint stored (`where` names it in errors); a field this version does not know is refused
        in one line rather than as a TypeError: the checkpoint was written by a newer lm."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LMError(f"{where}: model config fields {unknown} are unknown to this version of lm (a newer one?)")
        return cls(**fields)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or _round_up(int(8 * self.n_embd / 3), 64)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def padded_vocab_size(tokenizer_vocab_size: int) -> int:
    """Embedding rows for a tokenizer: a multiple of 64 so the head matmul uses tensor cores fully."""
    return _round_up(tokenizer_vocab_size, 64)


# Parameter counts are for the vocab shown; in brackets the blocks alone, without the embedding and the head
# (`GPT.num_params(non_embedding=True)` leaves out the embedding only: 123.6M and 355.1M for the two GPT-2 shapes).
SIZES: dict[str, GPTConfig] = {
    # ~0.03M: unit tests, runs in milliseconds.
    "tiny": GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32),
    # 10.7M with a 128-row char vocab (10.6M): nanoGPT's shakespeare_char "baby GPT" shape.
    "baby": GPTConfig(vocab_size=128, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    # 162M untied (85M): GPT-2 small's shape; 124M with tie_embeddings=True.
    "124m": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # 406M untied (303M): GPT-2 medium's shape.
    "350m": GPTConfig(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
}


def get_config(size: str, **overrides) -> GPTConfig:
    """A copy of a named size with some fields changed, e.g. get_config("124m", tie_embeddings=True)."""
    if size not in SIZES:
        raise KeyError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    return replace(SIZES[size], **overrides)
