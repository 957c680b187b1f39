import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import lm.model
from lm.config import SIZES, GPTConfig, get_config, padded_vocab_size
from lm.model import GPT, KVCache, apply_rope, rope_tables


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(get_config("tiny", **overrides))


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 1}, {"qk_norm": True}, {"tie_embeddings": True}])
def test_shapes(overrides):
    model = tiny(**overrides)
    logits = model(torch.randint(0, 64, (3, 16)))
    assert logits.shape == (3, 16, 64)


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 1, "qk_norm": True}])
def test_causality(overrides):
    """Changing tokens at positions >= t never changes the logits before t."""
    model = tiny(**overrides).eval()
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 64, (2, 7))
    assert torch.equal(model(x)[:, :9], model(y)[:, :9])
    assert not torch.allclose(model(x)[:, 9:], model(y)[:, 9:])


def reference_attention(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """The first layer's attention written out by hand: explicit masked softmax and repeated kv heads."""
    c, layer = model.config, model.layers[0]
    h = layer.attn_norm(model.embed_tokens(x))
    B, T, _ = h.shape
    attn = layer.attn
    q = attn.q_proj(h).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = c.n_head // c.kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    return attn.o_proj(y)


def test_attention_matches_hand_written_reference():
    model = tiny(n_head=4, n_kv_head=2).eval()
    x = torch.randint(0, 64, (2, 16))
    layer = model.layers[0]
    h = layer.attn_norm(model.embed_tokens(x))
    ours = layer.attn(h, model.rope_cos[:16], model.rope_sin[:16])
    torch.testing.assert_close(ours, reference_attention(model, x), atol=1e-5, rtol=1e-5)


def reference_forward(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """The whole model written out from its weights and the papers, sharing no code with lm.model: RMSNorm with its
    gain, QK-norm, RoPE tables from rope_theta, grouped heads, causal softmax, SwiGLU, two residuals per block, the
    final norm and the head."""
    c = model.config
    B, T = x.shape

    def rms_norm(h, gain):
        return gain * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + c.norm_eps)

    def rope(h):  # pair (i, i + head_dim/2) turns by position * theta^(-2i/head_dim)
        half = c.head_dim // 2
        angle = torch.arange(T)[:, None] * c.rope_theta ** (-2 * torch.arange(half) / c.head_dim)  # (T, half)
        a, b = h[..., :half], h[..., half:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)

    h = model.embed_tokens.weight[x]  # (B, T, n_embd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        a = rms_norm(h, layer.attn_norm.weight)
        q = (a @ attn.q_proj.weight.T).view(B, T, c.n_head, c.head_dim)
        k = (a @ attn.k_proj.weight.T).view(B, T, c.kv_heads, c.head_dim)
        v = (a @ attn.v_proj.weight.T).view(B, T, c.kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = rms_norm(q, attn.q_norm.weight), rms_norm(k, attn.k_norm.weight)
        q, k, v = rope(q.transpose(1, 2)), rope(k.transpose(1, 2)), v.transpose(1, 2)  # (B, heads, T, head_dim)
        group = c.n_head // c.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        h = h + y @ attn.o_proj.weight.T
        m = rms_norm(h, layer.mlp_norm.weight)
        h = h + (F.silu(m @ mlp.gate_proj.weight.T) * (m @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return rms_norm(h, model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize(
    "overrides",
    [{"n_head": 4, "n_kv_head": 2, "qk_norm": True, "rope_theta": 100.0}, {"tie_embeddings": True}],
    ids=["gqa_qk_norm_theta_100", "tied"],
)
def test_forward_matches_a_hand_written_reference(overrides):
    """Every layer end to end, in eval mode with dropout configured (eval must not drop anything), and with norm gains
    away from their initial 1 (a forward that dropped a gain would agree with the reference at init)."""
    model = tiny(n_layer=2, dropout=0.1, **overrides).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(x), reference_forward(model, x), atol=1e-5, rtol=1e-5)


def test_rope_rotates_pairs_by_position():
    cos, sin = rope_tables(head_dim=4, max_len=3, theta=10000.0)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    out = apply_rope(x, cos, sin)[0, 0]
    # pair (0, 2) rotates by angle = position * theta^0 = position
    for pos in range(3):
        torch.testing.assert_close(out[pos, [0, 2]], torch.tensor([math.cos(pos), math.sin(pos)]))


def test_rope_uses_the_llama_frequency_for_every_pair():
    """Pair (i, i + head_dim/2) turns by position * theta^(-2i/head_dim), from the formula, not from the tables the
    model reads (pair 0's frequency is 1 whatever the exponent)."""
    head_dim, theta, max_len = 8, 10000.0, 5
    cos, sin = rope_tables(head_dim=head_dim, max_len=max_len, theta=theta)
    x = torch.randn(max_len, head_dim)
    out = apply_rope(x.view(1, 1, max_len, head_dim), cos, sin)[0, 0]
    for pos in range(max_len):
        for i in range(head_dim // 2):
            angle = pos * theta ** (-2 * i / head_dim)
            a, b = x[pos, i], x[pos, i + head_dim // 2]
            torch.testing.assert_close(out[pos, i], a * math.cos(angle) - b * math.sin(angle))
            torch.testing.assert_close(out[pos, i + head_dim // 2], b * math.cos(angle) + a * math.sin(angle))


def test_mlp_is_swiglu_with_the_activation_on_gate_proj():
    """down(silu(gate(x)) * up(x)), as Llama/Qwen3 name it: the export maps these weights one-to-one."""
    mlp = tiny().layers[0].mlp
    x = torch.randn(2, 3, 32)
    expected = F.linear(
        F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight
    )
    torch.testing.assert_close(mlp(x), expected)


def test_rmsnorm_matches_formula():
    model = tiny()
    norm = model.norm
    x = torch.randn(2, 5, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(x), expected)


def test_124m_parameter_count():
    model = GPT(SIZES["124m"])
    assert model.num_params() == 162_220_800  # untied: embedding and head are separate 50304 x 768 tables
    tied = GPT(get_config("124m", tie_embeddings=True))
    assert tied.num_params() == 123_587_328  # GPT-2 small's 124M with RoPE instead of learned positions
    assert tied.num_params() == model.num_params() - 50304 * 768
    # Without the input embedding: the untied head stays, and a tied one is that same table, counted once
    assert model.num_params(non_embedding=True) == tied.num_params(non_embedding=True) == 123_587_328


def test_hf_llama_layout():
    """Names and shapes map one-to-one onto transformers' LlamaForCausalLM by renaming only."""
    model = tiny(n_head=2, n_kv_head=1, qk_norm=True)
    names = dict(model.named_parameters())
    c = model.config
    assert names["embed_tokens.weight"].shape == (c.vocab_size, c.n_embd)
    assert names["layers.0.attn.q_proj.weight"].shape == (c.n_head * c.head_dim, c.n_embd)
    assert names["layers.0.attn.k_proj.weight"].shape == (c.kv_heads * c.head_dim, c.n_embd)
    assert names["layers.0.attn.q_norm.weight"].shape == (c.head_dim,)
    assert names["layers.0.mlp.gate_proj.weight"].shape == (c.mlp_width, c.n_embd)
    assert names["layers.0.mlp.down_proj.weight"].shape == (c.n_embd, c.mlp_width)
    assert {n.split(".")[0] for n in names} == {"embed_tokens", "layers", "norm", "lm_head"}


def test_init_scales_residual_projections():
    model = GPT(get_config("baby", n_layer=8))
    std = model.layers[0].attn.o_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.norm.weight == 1)


def test_init_scales_the_mlp_down_projection_like_o_proj_and_not_gate_or_up():
    """mlp.down_proj writes into the residual stream too, so it gets std / sqrt(2 * n_layer) in every layer; the
    projections inside the MLP (gate_proj, up_proj) keep the plain std. 384 x 1024 entries: a std within 5%."""
    torch.manual_seed(0)
    model = GPT(get_config("baby", n_layer=8))
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        assert mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05), i
        assert mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.05), i
        assert mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05), i


@pytest.mark.parametrize(
    "arch",
    [{}, {"n_kv_head": 1}, {"n_kv_head": 2, "tie_embeddings": True}],
    ids=["mha", "gqa", "gqa_tied"],
)
def test_flops_per_token_matches_flop_counter(arch):
    """Our closed-form count equals torch's FLOP counter on a forward+backward, matmuls and attention included:
    k/v projections n_kv_head heads wide under GQA, and a tied head still one matmul per token.

    The math SDPA backend runs attention as counted matmuls (the fused CPU kernel is invisible to the counter)."""
    model = GPT(GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=64, **arch))
    x = torch.randint(0, 128, (2, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    assert counter.get_total_flops() == model.flops_per_token(32) * x.numel()


def test_kv_cache_matches_full_forward_in_chunks():
    model = tiny(n_kv_head=1).eval()
    x = torch.randint(0, 64, (2, 14))
    cache = KVCache(model.config, batch_size=2, max_len=16)
    chunks = [model(x[:, a:b], cache=cache) for a, b in [(0, 5), (5, 9), (9, 10), (10, 14)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(x), atol=1e-5, rtol=1e-5)


def test_a_cached_forward_with_gradients_on_fills_the_cache_under_activation_checkpointing():
    """Checkpointing runs a block without the cache: a cached forward (a caller's own decoding loop, gradients on)
    must run the blocks as they are, or the cache stays empty and the later chunks attend to nothing before them."""
    model = tiny(n_kv_head=1).eval()
    model.checkpoint_layers = True
    x = torch.randint(0, 64, (2, 14))
    cache = KVCache(model.config, batch_size=2, max_len=16)
    chunks = [model(x[:, a:b], cache=cache) for a, b in [(0, 9), (9, 14)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 64, "n_head": 3}, "n_embd (64) must be divisible by n_head (3)"),
        ({"n_head": 4, "n_kv_head": 3}, "n_head (4) must be divisible by n_kv_head (3)"),
        ({"n_embd": 30, "n_head": 2}, "head size n_embd/n_head = 15 must be even for RoPE"),
        ({"n_head": 0}, "n_head must be >= 1, got 0"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"rope_theta": 0.0}, "rope_theta must be a finite number > 0, got 0.0"),  # NaN logits, no error, before
        ({"rope_theta": float("nan")}, "rope_theta must be a finite number > 0, got nan"),
        ({"norm_eps": -1.0}, "norm_eps must be a finite number >= 0, got -1.0"),
    ],
)
def test_impossible_shapes_are_user_errors(overrides, message):
    """A config error, not a crash: LMError, which the CLI prints as one line with exit code 2."""
    from lm.errors import LMError

    with pytest.raises(LMError) as error:
        get_config("tiny", **overrides)
    assert str(error.value) == message


def test_flops_per_token_holds_when_fsdp_hands_the_parameters_over_as_flat_shards():
    """Under FSDP a rank's parameters are 1-D shards: counting them gave 0 or less (the 1-D filter dropped all)."""
    model = GPT(get_config("tiny", n_kv_head=1, qk_norm=True))
    expected = model.flops_per_token(16)
    shards = [p.detach().flatten()[: p.numel() // 2] for p in model.parameters()]  # one of two ranks' halves
    model.parameters = lambda recurse=True: iter(shards)
    assert model.flops_per_token(16) == expected


def test_a_sequence_longer_than_the_context_says_so():
    """A clear error, with or without a cache, rather than a shape mismatch from the RoPE tables deep in a layer."""
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"sequence of 17 tokens is longer than the context \(16\)"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = KVCache(model.config, batch_size=1, max_len=32)
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"sequence of 18 tokens is longer than the context \(16\)"):
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)


def test_an_overfull_cache_with_a_padding_mask_says_so():
    model = GPT(get_config("tiny")).eval()
    cache = KVCache(model.config, batch_size=1, max_len=8)
    cache.valid = torch.ones(1, 8, dtype=torch.bool)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache full: 10 positions > max_len 8"):  # was a shape mismatch
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)


def test_padded_vocab():
    assert padded_vocab_size(71) == 128
    assert padded_vocab_size(50261) == 50304
    assert padded_vocab_size(64) == 64


def test_overfits_one_batch():
    """A tiny model memorises one batch: loss falls by more than 90%."""
    torch.manual_seed(0)
    model = GPT(get_config("tiny", n_embd=64))
    x = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_flops_per_token_matches_lightning_measure_flops_on_the_124m_shape():
    """MFU's numerator, checked the way Lightning measures FLOPs: a meta-device 124M model, forward + backward."""
    from lightning.fabric.utilities.throughput import measure_flops

    seq_len = 1024
    with torch.device("meta"):
        model = GPT(SIZES["124m"])
        x = torch.randint(0, 50304, (1, seq_len))
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees
        flops = measure_flops(model, lambda: model(x), lambda logits: logits.sum())
    assert flops == model.flops_per_token(seq_len) * seq_len


def test_peak_flops_knows_the_plain_h200_name(monkeypatch):
    from lm.callbacks import peak_flops

    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == 989.4e12  # the H100 SXM's dense bf16 peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == 989.4e12  # from Lightning's table
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 on: MFU read ~7x too high
    assert peak_flops(torch.device("cuda"), torch.float32) == 494.7e12  # the H100 SXM's dense TF32 peak
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_flops(torch.device("cuda"), torch.float32) == 66.9e12


@pytest.mark.parametrize(
    ("name", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835.5e12),  # Lightning's table: 1978.8e12, a two-card pair's
        ("NVIDIA H200 NVL", 835.5e12),  # Lightning's table: none
        ("NVIDIA L40S", 362.05e12),  # Lightning's parsing: an L4's 121e12
        ("NVIDIA GH200 480GB", 989.4e12),  # Lightning's table: none (no MFU logged)
        ("NVIDIA GH200 144G HBM3e", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        # Lightning's table: the non-tensor fp32 figure (82.6e12, 35.6e12, 38.7e12), MFU read 2x to 4x too high
        ("NVIDIA GeForce RTX 4090", 165.2e12),
        ("NVIDIA GeForce RTX 3090", 71e12),
        ("NVIDIA RTX A6000", 154.8e12),
    ],
)
def test_peak_flops_is_one_gpus_dense_bf16_peak(monkeypatch, name, bf16):
    from lm.callbacks import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == pytest.approx(bf16)


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("bf16-mixed", torch.bfloat16),
        ("bf16-true", torch.bfloat16),
        ("16-mixed", torch.float16),
        ("32-true", torch.float32),
        ("64-true", torch.float64),
        ("transformer-engine", torch.bfloat16),  # was read as "transformer": fp32's peak, MFU ~15x too high
        ("transformer-engine-float16", torch.float16),
    ],
)
def test_mfu_is_measured_against_the_peak_of_the_training_precision(precision, dtype):
    from lm.callbacks import training_dtype

    assert training_dtype(precision) == dtype


@pytest.mark.parametrize("checkpoint_layers", [False, True], ids=["plain", "activation_checkpointing"])
def test_compiled_training_step_has_no_graph_breaks(checkpoint_layers):
    """torch.compile sees the model's forward and the loss as one graph each: no graph break in the step."""
    from lm.module import next_token_loss

    model = GPT(get_config("tiny", dropout=0.1))
    model.checkpoint_layers = checkpoint_layers
    ids = torch.randint(0, 64, (2, 16))
    forward = torch._dynamo.explain(model)(ids)
    assert forward.graph_break_count == 0, forward.break_reasons
    assert forward.graph_count == 1
    loss = torch._dynamo.explain(next_token_loss)(model(ids), ids)
    assert loss.graph_break_count == 0, loss.break_reasons


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less_for_the_backward(monkeypatch):
    """Each block is recomputed in the backward pass: the same loss and gradients (the recomputed dropout masks are
    the forward's), far fewer bytes saved for the backward; no-grad passes (generation, the KV cache) skip it."""
    config = get_config("tiny", dropout=0.1)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))

    def train_step(checkpoint_layers: bool):
        torch.manual_seed(0)
        model = GPT(config).train()
        model.checkpoint_layers = checkpoint_layers
        saved = []
        torch.manual_seed(5)  # the dropout masks

        def pack(t):  # what autograd keeps for the backward
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}, sum(saved), model

    loss, grads, saved, _ = train_step(False)
    loss_ckpt, grads_ckpt, saved_ckpt, model = train_step(True)
    assert torch.equal(loss, loss_ckpt)
    assert all(torch.equal(grads[name], grads_ckpt[name]) for name in grads)
    assert saved_ckpt < saved / 4
    calls = []
    original = lm.model.checkpoint
    monkeypatch.setattr(lm.model, "checkpoint", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    with torch.no_grad():
        model(ids)
    assert calls == []  # no-grad passes run the blocks as they are
    model(ids)
    assert len(calls) == config.n_layer  # a training forward recomputes every block
    model.eval()
    with torch.no_grad():  # as generation runs it: the blocks run as they are, and fill the cache
        cache = KVCache(config, batch_size=2, max_len=16)
        first, rest = model(ids[:, :10], cache), model(ids[:, 10:], cache)
        torch.testing.assert_close(torch.cat([first, rest], 1), model(ids), rtol=1e-4, atol=1e-4)
