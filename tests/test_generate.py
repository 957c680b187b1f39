"""The generation engine: KV cache == recomputation, padded batches, sampling, stop tokens/strings, streaming."""

import pytest
import torch

import lm.generate
from lm.config import get_config
from lm.errors import LMError
from lm.generate import (
    Finish,
    apply_repetition_penalty,
    generate_batch,
    generate_text,
    generate_texts,
    sample_next,
    stream_text,
    stream_tokens,
)
from lm.model import GPT
from lm.tokenizer import EOS, CharTokenizer, GPT2Tokenizer
from tests.test_chat_replies import scripted_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(get_config("tiny", n_kv_head=1)).eval()


def test_greedy_with_cache_equals_recomputing_the_prefix(model):
    prompt = [1, 5, 9, 3]
    cached = list(stream_tokens(model, prompt, max_new_tokens=12, temperature=0))  # fills the 16-token context
    recomputed = list(stream_tokens(model, prompt, max_new_tokens=12, temperature=0, use_cache=False))
    assert len(cached) == 12
    assert cached == recomputed


def test_generation_runs_past_the_context(model):
    """Past block_size the cache is rebuilt from the last half of the context, so generation keeps going."""
    ids = list(stream_tokens(model, [1, 5, 9, 3], max_new_tokens=40, temperature=0))
    assert len(ids) == 40


def sharp_model(**arch) -> GPT:
    """A tiny GPT with sharper logits: at random init they are nearly flat and any context gives the same argmax."""
    torch.manual_seed(0)
    model = GPT(get_config("tiny", **arch)).eval()  # 16-token context
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model


# One prompt, one longer than the context, a batch.
@pytest.mark.parametrize("prompts", [[[1, 5, 9, 3]], [list(range(1, 25))], [[1, 2, 3], list(range(10, 30)), [7]]])
def test_without_the_cache_generation_past_the_context_is_the_same(prompts):
    """The reference path uses the cached path's windows (a slide keeps the last block_size // 2 tokens), not the
    last block_size tokens at every step: both decode the same greedy tokens however long they run."""
    model = sharp_model()
    kwargs = dict(max_new_tokens=40, temperature=0)
    assert generate_batch(model, prompts, **kwargs) == generate_batch(model, prompts, use_cache=False, **kwargs)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_prompt_longer_than_the_context_starts_from_its_last_block_size_tokens(use_cache):
    """A prompt past block_size is read from its last block_size tokens, as if they were the whole prompt, not from the
    half window a later slide keeps: the first tokens depend on the whole context the model can see."""
    model = sharp_model()  # 16-token context
    long_prompt = list(range(1, 25))
    kwargs = dict(max_new_tokens=4, temperature=0, use_cache=use_cache)
    assert generate_batch(model, [long_prompt], **kwargs) == generate_batch(model, [long_prompt[-16:]], **kwargs)
    assert generate_batch(model, [long_prompt], **kwargs) != generate_batch(model, [long_prompt[-8:]], **kwargs)


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_the_shortest_contexts_slide_to_a_window_that_is_not_empty(block_size):
    """block_size // 2 is 0 for a context of 1: the slide kept no token and the next step failed on an empty window."""
    model = sharp_model(block_size=block_size)
    kwargs = dict(max_new_tokens=6, temperature=0)
    cached = generate_batch(model, [[1, 2, 3]], **kwargs)
    assert len(cached[0]) == 6 and cached == generate_batch(model, [[1, 2, 3]], use_cache=False, **kwargs)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_slide_keeps_exactly_the_last_half_context_of_the_row(model, use_cache):
    """Past block_size (16) the window slides to the row's last block_size // 2 tokens: the model's input at each
    slide (the cache's rebuild, or the recomputed window) is exactly those 8 tokens, and a slide comes every 9 steps."""
    prompt, block_size = [1, 5, 9, 3], model.config.block_size
    inputs = []  # the model's input ids at each step (one forward per step, one row)
    handle = model.register_forward_pre_hook(lambda module, args: inputs.append(args[0][0].tolist()))
    new = list(stream_tokens(model, prompt, max_new_tokens=40, temperature=0, use_cache=use_cache))
    handle.remove()
    assert len(inputs) == len(new) == 40
    if use_cache:  # a rebuild feeds the window; other steps feed one token
        slides = [k for k, ids in enumerate(inputs) if k > 0 and len(ids) > 1]
    else:  # every step feeds the whole window, which shrinks at a slide
        slides = [k for k in range(1, len(inputs)) if len(inputs[k]) < len(inputs[k - 1])]
    assert slides == [13, 22, 31]  # the row reaches 17 tokens at step 13, then 8 + 9 tokens every 9 steps
    for k in slides:
        row = prompt + new[:k]  # what step k continues
        assert inputs[k] == row[-(block_size // 2) :], k


def test_finished_rows_do_not_rebuild_the_cache(monkeypatch):
    """A row that has stopped is never read again: its growing context must not keep filling the cache and forcing
    rebuilds that the running rows do not need (it did every 8 steps: 9 prefills here)."""
    model = sharp_model()
    prompts = [list(range(1, 15)), [5]]  # the first would outgrow the 16-token context after 3 steps, then every 8
    free = generate_batch(model, prompts, max_new_tokens=40, temperature=0)
    stop = free[0][0]
    assert stop not in free[1]  # only the first row stops, at once
    prefills = []
    monkeypatch.setattr(lm.generate, "_prefill", lambda *a, f=lm.generate._prefill: prefills.append(1) or f(*a))
    batched = generate_batch(model, prompts, max_new_tokens=40, temperature=0, stop_ids=[stop])
    in_batch, prefills[:] = len(prefills), []
    alone = generate_batch(model, prompts[1:], max_new_tokens=40, temperature=0, stop_ids=[stop])
    assert batched == [[], *alone] and len(prefills) == 4  # alone: the prompt, then steps 16, 24 and 32
    # One more in the batch: at step 3 the cache the stopped row had filled is rebuilt, cutting it to one token.
    assert in_batch == len(prefills) + 1


def test_a_slide_frees_the_old_cache_before_it_builds_the_new_one(model, monkeypatch):
    """Each rebuild past the context allocated the new cache while the old one was still held: twice a full cache's
    memory at every slide (~9.7 GB for 64 rows of the 124m shape in fp32), out of memory where one fitted."""
    import weakref

    alive, most = weakref.WeakSet(), [0]

    class Counted(lm.generate.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive.add(self)
            most[0] = max(most[0], len(alive))

    monkeypatch.setattr(lm.generate, "KVCache", Counted)
    assert len(generate_batch(model, [[1, 2, 3]], max_new_tokens=40, temperature=0)[0]) == 40  # 4 slides
    assert most[0] == 1


@pytest.mark.parametrize("qk_norm", [False, True])  # qk_norm: fp32 keys (RMSNorm's fp32 gain) and bf16 values
def test_under_autocast_the_cache_holds_the_attention_dtype(monkeypatch, qk_norm):
    """Under bf16-mixed (TaskAccuracy, EvalCallback) the cache took the fp32 weights' dtype: twice the memory, for
    keys and values that autocast casts to bf16 before attention at every step. Greedy tokens are the recomputed
    prefix's, as attention reads the same bf16 values."""
    dtypes = []

    class Recorded(lm.generate.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            dtypes.append(self.k.dtype)

    monkeypatch.setattr(lm.generate, "KVCache", Recorded)
    torch.manual_seed(0)
    model = GPT(get_config("tiny", n_kv_head=1, qk_norm=qk_norm)).eval()
    prompts = [[1, 5, 9, 3], [7, 2]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = generate_batch(model, prompts, max_new_tokens=30, temperature=0)  # slides past the context
        recomputed = generate_batch(model, prompts, max_new_tokens=30, temperature=0, use_cache=False)
    assert set(dtypes) == {torch.bfloat16}
    assert cached == recomputed
    generate_batch(model, prompts, max_new_tokens=2, temperature=0)
    assert dtypes[-1] == torch.float32  # without autocast: the weights' dtype


def test_the_cache_holds_the_prompt_and_the_tokens_left_not_the_whole_context(model, monkeypatch):
    """A block_size cache for short prompts and answers (TaskAccuracy: 64 rows, a few new tokens) was 4.5 GiB on the
    124m shape, almost all of it never written."""
    lengths = []

    class Recorded(lm.generate.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            lengths.append(self.max_len)

    monkeypatch.setattr(lm.generate, "KVCache", Recorded)
    prompts = [[1, 5, 9], [7, 2]]
    cached = generate_batch(model, prompts, max_new_tokens=4, temperature=0)
    assert lengths == [3 + 3]  # the widest prompt and the 3 tokens fed after the first
    assert cached == generate_batch(model, prompts, max_new_tokens=4, temperature=0, use_cache=False)
    lengths.clear()
    generate_batch(model, prompts, max_new_tokens=30, temperature=0)  # past the 16-token context: full ones
    assert lengths[0] == model.config.block_size


def test_stop_token_ends_generation_and_is_not_yielded(model):
    prompt = [1, 2, 3]
    free = list(stream_tokens(model, prompt, max_new_tokens=10, temperature=0))
    stop = free[4]
    stopped = list(stream_tokens(model, prompt, max_new_tokens=10, temperature=0, stop_ids=[stop]))
    assert stopped == free[: free.index(stop)]


def test_padding_rows_are_never_sampled(model):
    ids = list(stream_tokens(model, [1], max_new_tokens=200, temperature=2.0, vocab_size=10))
    assert max(ids) < 10


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), logits.argmax(-1))


def test_top_k_zero_filters_nothing(model):
    """0 turns top-k off (the flags have a default, so unsetting is not an option on the command line)."""
    logits = torch.randn(4, 50)
    draws = [sample_next(logits, top_k=k, generator=torch.Generator().manual_seed(0)) for k in (0, None)]
    assert torch.equal(*draws)
    sampled = generate_batch(model, [[1, 2]], max_new_tokens=5, top_k=0, generator=torch.Generator().manual_seed(0))
    assert sampled == generate_batch(model, [[1, 2]], max_new_tokens=5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("temperature", [1e-50, 1e-30, 1e-8])
def test_a_tiny_temperature_tends_to_greedy_instead_of_failing(temperature):
    logits = torch.randn(4, 50) * 10  # float32 overflows at logit / 1e-38
    assert torch.equal(sample_next(logits, temperature=temperature, top_p=0.9), logits.argmax(-1))


def test_top_p_always_keeps_the_top_token():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, top_p=0.0), logits.argmax(-1))


def test_top_p_zero_is_taken_as_greedy(model):
    """OpenAI's API and transformers take top_p 0 (clients send it for a deterministic reply); it was refused."""
    greedy = generate_batch(model, [[1, 5, 9]], max_new_tokens=12, temperature=0)
    sampled = generate_batch(model, [[1, 5, 9]], max_new_tokens=12, temperature=1.0, top_p=0.0)
    assert sampled == greedy


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("top_k", -3),
        ("top_p", -0.5),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("temperature", float("nan")),
        ("temperature", -1.0),
        ("temperature", float("inf")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -2.0),
        ("repetition_penalty", float("nan")),
        ("repetition_penalty", 1e-4),  # positive, but dividing a logit by it overflows towards inf
        ("repetition_penalty", 1e4),
    ],
)
def test_bad_sampling_arguments_are_user_errors(model, argument, value):
    with pytest.raises(LMError, match=f"^{argument} must be") as error:
        generate_batch(model, [[1, 2]], max_new_tokens=3, **{argument: value})
    assert "\n" not in str(error.value)


def test_top_p_keeps_the_smallest_set_holding_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, top_p=0.75, generator=gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.75: tokens 2 and 3 are cut


def test_seeded_sampling_is_reproducible(model):
    def draw():
        return list(stream_tokens(model, [3], max_new_tokens=20, generator=torch.Generator().manual_seed(7)))

    assert draw() == draw()


def test_generate_text_decodes_the_stream_and_stops_at_eos():
    tok = CharTokenizer.train(["abcdefgh \n"])
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=64)).eval()
    text = generate_text(model, tok, "abc", max_new_tokens=12, temperature=0)
    ids = list(stream_tokens(model, tok.encode("abc"), max_new_tokens=12, temperature=0, vocab_size=tok.vocab_size))
    assert tok.eos_id not in ids  # this seed's model never emits EOS: the stop is checked with a scripted one below
    assert text == tok.decode(ids)
    assert all(i < tok.vocab_size for i in ids)
    scripted = scripted_model(tok, {"a": "b", "b": EOS, EOS: "c", "c": "c"})  # emits EOS for sure
    assert generate_text(scripted, tok, "a", max_new_tokens=6, temperature=0) == "b"  # stops at EOS, leaves it out
    assert generate_texts(scripted, tok, [tok.encode("a")], max_new_tokens=6, temperature=0) == ["b"]


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    """Sampled frequencies match softmax(logits / T); lm serve's tests compare with this same engine, so only this
    checks the scaling itself."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20_000, 4)
    draws = sample_next(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, (logits[0] / temperature).softmax(-1), atol=0.015, rtol=0)  # ~4 sigma


# ---- batches, penalties, stop strings, the cache's speed ------------------------------------------------------------


def test_batch_of_different_lengths_decodes_each_row_as_alone():
    """Left padding + the cache's valid mask: every row's greedy tokens equal its single-prompt greedy tokens, with
    and without the cache."""
    torch.manual_seed(0)
    model = GPT(get_config("tiny", block_size=64, n_kv_head=1)).eval()
    prompts = [[1, 5, 9, 3, 7, 2, 8], [4], [6, 6, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]
    batched = generate_batch(model, prompts, max_new_tokens=20, temperature=0)
    for prompt, row in zip(prompts, batched, strict=True):
        alone_cached = list(stream_tokens(model, prompt, max_new_tokens=20, temperature=0))
        alone_recomputed = list(stream_tokens(model, prompt, max_new_tokens=20, temperature=0, use_cache=False))
        assert row == alone_cached == alone_recomputed


@pytest.mark.parametrize(
    ("prompts", "max_new_tokens"),
    [
        ([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], 30),
        # The long row outgrows the context at step 2 while the short one (9 + 6 tokens) always fits: the rebuild
        # must not slide the short row's window.
        ([list(range(1, 16)), list(range(20, 29))], 6),
        ([list(range(1, 21)), [5], list(range(30, 46))], 30),  # a prompt longer than the context, one exactly as long
    ],
)
def test_batch_past_the_context_matches_single_rows(prompts, max_new_tokens):
    """The sliding-window rebuild of a padded batch keeps each row identical to decoding it alone: only the rows whose
    own context outgrew block_size slide."""
    model = sharp_model()
    batched = generate_batch(model, prompts, max_new_tokens=max_new_tokens, temperature=0)
    alone = [list(stream_tokens(model, p, max_new_tokens=max_new_tokens, temperature=0)) for p in prompts]
    assert batched == alone


def test_rows_stop_independently(model):
    prompts = [[1, 2, 3], [3, 2, 1, 4]]
    free = generate_batch(model, prompts, max_new_tokens=10, temperature=0)
    stop = free[0][3]
    stopped = generate_batch(model, prompts, max_new_tokens=10, temperature=0, stop_ids=[stop])
    for row, full in zip(stopped, free, strict=True):
        assert row == (full[: full.index(stop)] if stop in full else full)


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_the_end_of_a_chat_turn_is_not_penalised_for_being_in_the_prompt(model):
    """A chat prompt holds <|end|> after every turn; the penalty counted it as seen, so a model about to end its
    reply (END's logit 1.0, a letter's 0.95) was pushed into going on (1.0 / 1.1 < 0.95)."""
    from lm.chat import render_prompt, reply_stop_ids
    from lm.tokenizer import END

    tok = CharTokenizer.train(["abcdefgh xyz\n"])
    end, x, y = tok.token_id(END), *tok.encode("xy")
    prompt = render_prompt([{"role": "user", "content": "abc"}], tok)
    assert end in prompt and x not in prompt and y not in prompt
    logits_of = {}

    def fixed_logits(module, inputs, logits):
        fixed = torch.zeros_like(logits)
        for token, value in logits_of.items():
            fixed[..., token] = value
        return fixed

    model.lm_head.register_forward_hook(fixed_logits)
    stop = reply_stop_ids(tok)
    logits_of.update({end: 1.0, x: 0.95})
    for penalty in (1.0, 1.1, 2.0):
        reply = generate_batch(
            model, [prompt], max_new_tokens=3, temperature=0, repetition_penalty=penalty, stop_ids=stop
        )
        assert reply == [[]]
    # content tokens in the prompt are still penalised: x (1.0) seen, y (0.95) not
    logits_of.clear()
    logits_of.update({x: 1.0, y: 0.95})
    prompt_with_x = prompt[:-1] + [x, prompt[-1]]
    reply = generate_batch(
        model, [prompt_with_x], max_new_tokens=1, temperature=0, repetition_penalty=1.1, stop_ids=stop
    )
    assert reply == [[y]]


def test_a_stop_id_outside_the_vocabulary_is_harmless_under_a_repetition_penalty(model):
    out = generate_batch(model, [[1, 2]], max_new_tokens=3, temperature=0, repetition_penalty=1.1, stop_ids=[10**6])
    assert len(out[0]) == 3


def test_generation_builds_no_autograd_graph(model):
    """Called where gradients are on (a notebook, a callback outside validation), decoding records no graph: one kept
    through the KV cache would hold every step's activations until generation ends."""
    grads = []
    model.register_forward_hook(lambda module, args, output: grads.append(output.requires_grad))
    assert torch.is_grad_enabled()
    generate_batch(model, [[1, 2, 3]], max_new_tokens=3)
    assert grads == [False, False, False]


def test_prefill_computes_the_last_position_s_logits_only(model):
    """The head over every prompt position was thrown away but for the last: 64 windows of 1024 at GPT-2's vocabulary
    are 13 GB of fp32 logits."""
    shapes = []
    model.lm_head.register_forward_hook(lambda module, inputs, logits: shapes.append(tuple(logits.shape)))
    for use_cache in (True, False):
        generate_batch(model, [[1, 2, 3, 4, 5], [6, 7]], max_new_tokens=3, temperature=0, use_cache=use_cache)
    assert shapes and all(shape[1] == 1 for shape in shapes)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:])


def test_repetition_penalty_changes_greedy_decoding(model):
    plain = list(stream_tokens(model, [1, 2], max_new_tokens=12, temperature=0))
    penalised = list(stream_tokens(model, [1, 2], max_new_tokens=12, temperature=0, repetition_penalty=50.0))
    assert len(set(penalised)) > len(set(plain)) or len(set(penalised)) == len(penalised)


def _text_setup():
    tok = CharTokenizer.train(["abcdefgh \n"])
    torch.manual_seed(0)
    return tok, GPT(get_config("tiny", vocab_size=64, block_size=64)).eval()


def test_stop_string_cuts_the_text_and_streaming_agrees():
    tok, model = _text_setup()
    free = generate_text(model, tok, "abc", max_new_tokens=30, temperature=0)
    stop = free[5:7]
    cut = generate_text(model, tok, "abc", max_new_tokens=30, temperature=0, stop_strings=[stop])
    assert cut == free[: free.index(stop)]
    pieces = list(stream_text(model, tok, tok.encode("abc"), max_new_tokens=30, temperature=0, stop_strings=[stop]))
    assert "".join(pieces) == cut and all(pieces)
    batch = generate_texts(model, tok, [tok.encode("abc"), tok.encode("h")], max_new_tokens=30, temperature=0)
    assert batch[0] == free


def test_an_empty_prompt_starts_a_fresh_document_after_eos():
    """generate_text("") continues EOS, where every packed pretraining document begins (SampleText's default prompt is
    ""): an empty prompt holds no token to decode from."""
    tok, model = _text_setup()
    from_eos = "".join(stream_text(model, tok, [tok.eos_id], max_new_tokens=8, temperature=0))
    assert from_eos
    assert generate_text(model, tok, "", max_new_tokens=8, temperature=0) == from_eos


def test_an_empty_stop_string_stops_nothing():
    """An empty stop string (in a request, or a task config) is skipped, as lm-eval skips it: found
    at 0 in every text, it cut every reply to nothing."""
    tok, model = _text_setup()
    free = generate_text(model, tok, "abc", max_new_tokens=10, temperature=0)
    assert free
    assert generate_text(model, tok, "abc", max_new_tokens=10, temperature=0, stop_strings=[""]) == free
    batch = generate_texts(model, tok, [tok.encode("abc")], max_new_tokens=10, temperature=0, stop_strings=[""])
    assert batch == [free]


def test_stop_string_is_cut_when_the_stream_ends_mid_character(monkeypatch):
    """The loop skips text that ends in a partial character, so the stop string before it is found only in the final
    flush: it must be cut there too."""
    tok = GPT2Tokenizer()
    ids = tok.encode("Sure.\nUser: \U0001f600")  # the emoji is two tokens
    assert tok.decode(ids[:-1]).endswith("\ufffd")
    for stream in (ids[:-1], ids):  # the stream ends mid-emoji (max_new_tokens), or after it
        monkeypatch.setattr(lm.generate, "stream_tokens", lambda model, prompt, stream=stream, **sampling: iter(stream))
        assert "".join(stream_text(None, tok, [1], stop_strings=["\nUser: "])) == "Sure."


def test_a_stop_string_ending_inside_a_partial_character_stops_the_stream_at_once(monkeypatch):
    """GPT-2 spells "\nUser: 😀" with the stop string's last space in the token that begins the emoji: the stream
    used to go on until the character was whole (with a model emitting partial bytes, up to max_new_tokens)."""
    tok = GPT2Tokenizer()
    ids = tok.encode("Sure.\nUser: \U0001f600 ok")
    ends_stop = next(n for n in range(1, len(ids) + 1) if "\nUser: " in tok.decode(ids[:n]).replace("\ufffd", ""))
    assert tok.decode(ids[:ends_stop]).endswith("\ufffd")  # the case: the stop string completes mid-character
    monkeypatch.setattr(lm.generate, "stream_tokens", lambda model, prompt, **sampling: iter(ids))
    finish = Finish()
    assert "".join(stream_text(None, tok, [1], stop_strings=["\nUser: "], finish=finish)) == "Sure."
    assert finish.tokens == ends_stop


def test_a_batch_cuts_overlapping_stop_strings_where_the_stream_does(monkeypatch):
    """The first stop string to complete decides, then the earliest one in that text: "bc" completes before "abcd"."""
    tok = CharTokenizer("abcdxy")
    ids = tok.encode("xxabcdyy")
    monkeypatch.setattr(lm.generate, "stream_tokens", lambda model, prompt, **sampling: iter(ids))
    monkeypatch.setattr(lm.generate, "generate_batch", lambda model, prompts, **sampling: [ids for _ in prompts])
    for stops in (["bc", "abcd"], ["abcd", "bc"]):
        streamed = "".join(stream_text(None, tok, [1], stop_strings=stops))
        assert generate_texts(None, tok, [[1], [1]], stop_strings=stops) == [streamed] * 2 and streamed == "xxa"
    assert generate_texts(None, tok, [[1]], stop_strings=["d", "abc"]) == ["xx"]  # "abc" completes first


def test_a_batch_stops_once_every_row_holds_a_stop_string():
    """The batch ran every row to max_new_tokens and cut the texts afterwards: lm-eval's triviaqa (until "\n", ".",
    ",") took 256 steps for a one-word answer. A stop string can span tokens and end inside a character: GPT-2 spells
    "\nUser: 😀" with the stop string's last space in the token that begins the emoji."""
    tok = GPT2Tokenizer()
    first = tok.encode("Sure.\nUser: \U0001f600 ok")
    ends_stop = next(n for n in range(1, len(first) + 1) if "\nUser: " in tok.decode(first[:n]).replace("\ufffd", ""))
    assert ends_stop < len(first) and tok.decode(first[:ends_stop]).endswith("\ufffd")  # the case
    (a,), (b,), (x,) = tok.encode("A"), tok.encode("B"), tok.encode(" x")
    chain = [a, *first]  # "A" -> "Sure.\nUser: 😀 ok ok ...", "B" -> " x x x ..."
    follow = dict(zip(chain[:-1], chain[1:], strict=True)) | {first[-1]: first[-1], b: x, x: x}
    model = scripted_model(tok, follow, vocab_size=tok.vocab_size)
    passes = []
    model.register_forward_hook(lambda *args: passes.append(1))
    prompts, stops, kwargs = [[a], [b]], ["\nUser: ", "x x"], {"max_new_tokens": 40, "temperature": 0}
    texts = generate_texts(model, tok, prompts, stop_strings=stops, **kwargs)
    assert len(passes) == ends_stop  # the second row's "x x" completed at its second token
    assert texts == ["Sure.", " "]
    # The texts are those of the whole generation cut at the first stop string, and what stream_text gives
    whole = generate_texts(model, tok, prompts, **kwargs)
    assert texts == [text[: min(i for s in stops if (i := text.find(s)) >= 0)] for text in whole]
    assert texts == ["".join(stream_text(model, tok, p, stop_strings=stops, **kwargs)) for p in prompts]


@pytest.mark.parametrize(
    "stream, stop_strings, expected",
    [
        ([6, 7, 8], [], Finish(tokens=3, reason="length")),  # "abc": every step gave a token
        ([6, 7], [], Finish(tokens=2, reason="stop")),  # a stop token came at step 3 (it is not yielded)
        ([6, 7, 8], ["b"], Finish(tokens=2, reason="stop")),  # a stop string, completed by the second token
        ([6, 7, 8], ["cd"], Finish(tokens=3, reason="length")),  # a stop string begun at the end, never completed
    ],
)
def test_finish_reports_why_the_stream_ended_and_how_many_tokens_it_took(monkeypatch, stream, stop_strings, expected):
    tok = CharTokenizer("abcdefgh")
    monkeypatch.setattr(lm.generate, "stream_tokens", lambda model, prompt, **sampling: iter(stream))
    finish = Finish()
    list(stream_text(None, tok, [1], stop_strings=stop_strings, finish=finish, max_new_tokens=3))
    assert finish == expected


def test_cache_is_much_faster_than_recomputing_the_prefix():
    """The KV cache's point, measured on a small model with a long prompt (benchmarks/generation.py does 124m)."""
    import time

    torch.manual_seed(0)
    model = GPT(get_config("tiny", n_layer=4, n_head=4, n_embd=128, block_size=512, vocab_size=256)).eval()
    prompt = torch.randint(0, 256, (384,)).tolist()
    timings, outputs = {True: [], False: []}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cached path's many small steps suffer most when other jobs load the cores
    try:
        for _ in range(2):  # alternating, best of two: one slow moment of a shared machine does not decide
            for use_cache in (True, False):
                start = time.perf_counter()
                outputs[use_cache] = list(
                    stream_tokens(model, prompt, max_new_tokens=64, temperature=0, use_cache=use_cache)
                )
                timings[use_cache].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert outputs[True] == outputs[False]
    assert min(timings[False]) > 2 * min(timings[True]), timings


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer.json (as Llama's and Mistral's): its decoder strips the space that begins a
    decoded text."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lm.tokenizer import HFTokenizer

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(["Hello world, hello there world again"] * 50, trainer)
    return HFTokenizer.from_json(backend.to_str())


def test_a_continuation_keeps_the_space_a_metaspace_decoder_strips_from_a_text_s_start(monkeypatch):
    """Decoded alone, " world" after "Hello" came out "world" ("Helloworld" on screen and in /v1/completions), and a
    stop string beginning with the space was missed."""
    tok = _metaspace_tokenizer()
    continuation = tok.encode(" world")
    assert tok.decode(continuation) == "world"  # the case: the decoder strips the first space
    monkeypatch.setattr(lm.generate, "stream_tokens", lambda model, prompt, **sampling: iter(continuation))
    monkeypatch.setattr(
        lm.generate, "generate_batch", lambda model, prompts, **sampling: [continuation for _ in prompts]
    )
    assert generate_text(None, tok, "Hello") == " world"
    assert "".join(stream_text(None, tok, tok.encode("Hello"))) == " world"
    assert generate_texts(None, tok, [tok.encode("Hello")]) == [" world"]
    assert generate_text(None, tok, "Hello", stop_strings=[" wor"]) == ""
    assert generate_texts(None, tok, [tok.encode("Hello")], stop_strings=[" wor"]) == [""]
    # After a special token (a chat marker, or EOS for an empty prompt) the text starts afresh, as it was encoded
    assert generate_text(None, tok, "") == "world"
    assert generate_texts(None, tok, [[tok.eos_id]]) == ["world"]
    # and the text before that token is no context for it: a reply after a chat marker begins with no space
    assert generate_texts(None, tok, [tok.encode("Hello") + [tok.eos_id]]) == ["world"]


def test_a_stream_cut_by_the_length_limit_inside_a_character_leaves_the_partial_character_out(monkeypatch):
    """Its first bytes decode to U+FFFD: /v1/completions and lm generate ended such a text with a replacement
    character."""
    tok = GPT2Tokenizer()
    ids = tok.encode("ok \U0001f600")
    partial = ids[:-1]
    assert tok.decode(partial).endswith("\ufffd")  # the case: the emoji is split over tokens
    monkeypatch.setattr(lm.generate, "stream_tokens", lambda model, prompt, **sampling: iter(partial))
    monkeypatch.setattr(lm.generate, "generate_batch", lambda model, prompts, **sampling: [partial for _ in prompts])
    finish = Finish()
    streamed = "".join(stream_text(None, tok, [tok.eos_id], max_new_tokens=len(partial), finish=finish))
    assert streamed == "ok " and finish == Finish(tokens=len(partial), reason="length")
    assert generate_texts(None, tok, [[tok.eos_id]], max_new_tokens=len(partial)) == ["ok "]
    # a stop token (not the limit) after the same bytes: the text is what the model wrote, as before
    assert "".join(stream_text(None, tok, [tok.eos_id], max_new_tokens=len(partial) + 1)).endswith("\ufffd")
