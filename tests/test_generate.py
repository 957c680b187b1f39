import pytest
import torch

from lm.config import get_config
from lm.generate import generate_text, sample_next, stream_tokens
from lm.model import GPT
from lm.tokenizer import CharTokenizer


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
    if tok.eos_id in ids:
        ids = ids[: ids.index(tok.eos_id)]
    assert text == tok.decode(ids)
    assert all(i < tok.vocab_size for i in ids)
