"""A decoder-only Transformer in plain PyTorch: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional QK-norm.

No Lightning here: `lm.module` wraps this in a LightningModule, and `lm.generate` drives it with a KV cache.

The parameter names and shapes map one-to-one onto Hugging Face transformers' `LlamaForCausalLM`
(`Qwen3ForCausalLM` when `qk_norm=True`), so exporting is a renaming:

    embed_tokens            -> model.embed_tokens
    layers.i.attn_norm      -> model.layers.i.input_layernorm
    layers.i.attn.{q,k,v,o}_proj, q_norm, k_norm -> model.layers.i.self_attn.*
    layers.i.mlp_norm       -> model.layers.i.post_attention_layernorm
    layers.i.mlp.{gate,up,down}_proj -> model.layers.i.mlp.*
    norm                    -> model.norm
    lm_head                 -> lm_head

RoPE uses the same "rotate half" layout as transformers, so q/k weights need no permutation.

    python -c "from lm.model import GPT; from lm.config import SIZES; print(GPT(SIZES['124m']).num_params())"
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lm.config import GPTConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; computed in fp32 like transformers' LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_len, head_dim), each frequency repeated for both halves of the head."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x: (B, n_head, T, head_dim) by the angles in cos/sin: (T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, n_kv_head, max_len, head_dim) each.

    `pos` is how many positions are filled; the model writes the new ones and advances it after the last layer.
    `valid` (B, max_len) bool, when set, marks the positions holding real tokens: a batch of prompts of different
    lengths is left-padded, and no query attends to a padding key (`lm.generate` sets it).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.valid: torch.Tensor | None = None

    def attn_mask(self, T: int) -> torch.Tensor:
        """Boolean mask (B, 1, T, pos + T) for the next T queries: causal, and padding keys hidden.

        A padding query may still see itself, so its softmax is never over nothing (that would be NaN, and NaN values
        poison real rows through 0 * NaN); padding outputs are garbage that no real token ever reads.
        """
        end = self.pos + T
        causal = torch.ones(T, end, dtype=torch.bool, device=self.k.device).tril(diagonal=self.pos)  # (T, end)
        itself = torch.zeros_like(causal)
        itself[:, self.pos : end] = torch.eye(T, dtype=torch.bool, device=self.k.device)
        return (causal & self.valid[:, None, None, :end]) | itself  # (B, 1, T, end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, n_kv_head, T, head_dim) at [pos, pos+T) and return everything cached so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head or n_kv_head, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        mask, is_causal = None, True
        if cache is not None and cache.valid is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv_head, past + T, head_dim); checks the capacity first
            mask, is_causal = cache.attn_mask(T), False
        elif cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, n_kv_head, past + T, head_dim)
            if past > 0:
                # New queries sit at positions past..past+T-1: each sees the whole past and the new tokens up to itself.
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_width, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_width, bias=False)
        self.down_proj = nn.Linear(config.mlp_width, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache))
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Buffers, not parameters: not saved (persistent=False), rebuilt from the config, moved with .to(device).
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Training option, not architecture (not in the config or checkpoints): keep only each block's input for the
        # backward pass and recompute the block's activations there, ~1/3 more compute for far less memory.
        self.checkpoint_layers = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """GPT-2 style init, in one place.

        - every Linear and the embedding: N(0, std), no biases anywhere;
        - the two projections that write into the residual stream (attn.o_proj, mlp.down_proj):
          N(0, std / sqrt(2 * n_layer)), so the residual's variance does not grow with depth;
        - RMSNorm gains: 1; RoPE tables recomputed (they are buffers, and meta-device init leaves them empty).
        """
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        cos, sin = rope_tables(self.config.head_dim, self.config.block_size, self.config.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids: (B, T) token ids -> logits (B, T, vocab_size).

        With a cache, input_ids are the next T tokens after the `cache.pos` already cached. last_only: the logits of
        the last position only, (B, 1, vocab_size): generation's prefill needs no more, and the head over every
        position would cost B x T x vocab_size floats (13 GB in fp32 for 64 windows of 1024 at GPT-2's vocabulary).
        """
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context ({self.config.block_size})")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, head_dim)
        x = self.dropout(self.embed_tokens(input_ids))  # (B, T, n_embd)
        for layer in self.layers:
            if self.checkpoint_layers and cache is None and torch.is_grad_enabled():
                # non-reentrant: works under torch.compile; the recomputation replays the dropout masks
                x = checkpoint(layer, x, cos, sin, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # (B, T or 1, vocab_size)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once). non_embedding drops the input embedding table; a tied head
        shares it, so then the head's matmul weights are counted."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at context seq_len, the PaLM appendix B way:
        6 * (matmul parameters) + 12 * n_layer * n_head * head_dim * seq_len for attention scores and values.
        Like nanoGPT and PaLM this counts the full T x T attention (no discount for the causal mask)."""
        c = self.config
        seq_len = seq_len or c.block_size
        # From the config, not from self.parameters(): under FSDP those are this rank's flat 1-D shards.
        attention = c.n_embd * c.head_dim * (2 * c.n_head + 2 * c.kv_heads)  # q and o, k and v
        mlp = 3 * c.n_embd * c.mlp_width  # gate, up, down
        matmul_params = c.n_layer * (attention + mlp) + c.vocab_size * c.n_embd  # + the head (tied or not)
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * seq_len
