"""The lm-evaluation-harness adapter, offline: a local multiple-choice task over a local JSONL through
`lm_eval.simple_evaluate`, plus loglikelihood_rolling and generate_until against lm's own code."""

import json
import math
import warnings

import pytest
import torch
from lm_eval import simple_evaluate  # lm[dev] installs lm-eval: a missing one fails here rather than skipping
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from lm.chat import render_chat, reply_stop_ids
from lm.eval import EvalSpec, continuation_passes, evaluate
from lm.generate import stream_tokens
from lm.lm_eval_adapter import LMEvalAdapter, generation_args
from lm.tokenizer import ASSISTANT, USER, CharTokenizer
from tests.test_eval import hand_nats, write_checkpoint

ROWS = [
    {"activity_label": "Roof", "ctx": "A man is on a roof. he", "endings": ["is up.", "eats", "runs far.", "x"]},
    {"activity_label": "Jump", "ctx": "The boy lands on a mat.", "endings": ["a", "bb", "sits.", "ccc dd"]},
    {"activity_label": "Cats", "ctx": "A cat sits.", "endings": ["It naps.", "It", "Zzz", "It runs, it hides."]},
    {"activity_label": "Dogs", "ctx": "The dog", "endings": ["barks.", "is red", "sat", "eats a bone."]},
]

TASK_YAML = """\
task: tiny_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{activity_label}}}}: {{{{ctx}}}}"
doc_to_target: label
doc_to_choice: endings
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def adapter(tmp_path):
    tokenizer = CharTokenizer.train([json.dumps(ROWS), "The quick brown fox\n"])
    path = tmp_path / "tiny.ckpt"
    write_checkpoint(path, tokenizer, block_size=48, n_layer=2, n_head=2, n_embd=32)
    return LMEvalAdapter(ckpt=str(path), batch_size=3, device="cpu")


def test_simple_evaluate_on_a_local_task_matches_lm_eval_command(adapter, tmp_path):
    data = tmp_path / "hs.jsonl"
    rows = [row | {"label": label} for row, label in zip(ROWS, (0, 2, 3, 3), strict=True)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_hellaswag.yaml").write_text(TASK_YAML.format(data=data))

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = simple_evaluate(model=adapter, tasks=["tiny_hellaswag"], task_manager=manager, bootstrap_iters=0)
    harness = out["results"]["tiny_hellaswag"]
    ours, n = evaluate(adapter.model, adapter.tokenizer, EvalSpec(task="hellaswag", data=str(data)))
    assert n == 4
    assert harness["acc,none"] == pytest.approx(ours["acc"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_loglikelihood_rolling_scores_every_token_after_eos(adapter):
    short, long = "The quick brown fox", "The quick brown fox\n" * 6  # the long one spans several windows
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0) for text in (short, long)]
    got = adapter.loglikelihood_rolling(requests)
    tokenizer, model = adapter.tokenizer, adapter.model
    assert got[0] == pytest.approx(-hand_nats(model, [tokenizer.eos_id, *tokenizer.encode(short)]), rel=1e-5)
    assert math.isfinite(got[1]) and got[1] < got[0]


def test_generate_until_is_lm_greedy_cut_at_the_stop_string(adapter):
    contexts = ["The dog", "A cat sits."]
    requests = [
        Instance("generate_until", {}, (c, {"until": ["s"], "max_gen_toks": 8}), i) for i, c in enumerate(contexts)
    ]
    got = adapter.generate_until(requests)
    tokenizer = adapter.tokenizer
    for context, text in zip(contexts, got, strict=True):
        ids = list(
            stream_tokens(
                adapter.model,
                tokenizer.encode(context),
                max_new_tokens=8,
                temperature=0,
                vocab_size=tokenizer.vocab_size,
                stop_ids=reply_stop_ids(tokenizer),  # EOS, and a chat model's end of turn
            )
        )
        expected = tokenizer.decode(ids, skip_special=True).split("s")[0]
        assert text == expected
    assert torch.is_grad_enabled()  # the adapter leaves global state alone


GENERATION_ARGS = [
    {"until": ["s"], "max_new_tokens": 3},
    {"until": "s", "max_tokens": 5, "temperature": 0.7},
    {"until": ["s", ""], "max_completion_tokens": 2, "do_sample": False, "temperature": 0.7},
    {"max_gen_toks": 4, "max_new_tokens": 9, "do_sample": True, "temperature": 0.5},
    {"temperature": 0.0},
]


@pytest.mark.parametrize("kwargs", GENERATION_ARGS)
def test_generation_arguments_are_read_as_the_harness_reads_them(kwargs):
    """The budget's aliases and do_sample/temperature as lm-eval's own normalize_gen_kwargs reads them (this adapter
    used to read max_gen_toks only, so max_new_tokens: 3 generated 256 tokens, and a temperature alone was greedy)."""
    from lm_eval.models.utils import normalize_gen_kwargs

    until, max_new, sampling, unsupported = generation_args(kwargs, 256)
    harness = normalize_gen_kwargs(kwargs, 256)
    assert until == [s for s in harness["until"] if s] and max_new == harness["max_gen_toks"]
    assert sampling == {"temperature": harness["temperature"] if harness["do_sample"] else 0.0}
    assert unsupported == []


def test_sampling_arguments_reach_lm_s_engine_and_others_are_named():
    kwargs = {"until": ["\n"], "do_sample": True, "temperature": 0.7, "top_p": "0.95", "top_k": 40}
    others = {"repetition_penalty": 1.1, "num_beams": 2, "min_p": 0.05, "typical_p": None}
    args = generation_args(kwargs | others, 256)  # top_p "0.95" as text is read as the number
    assert args.sampling == {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1}
    assert args.unsupported == ["min_p", "num_beams"]  # an argument left unset (None) is no request


@pytest.mark.parametrize("narrowing", [{"top_k": 1}, {"top_p": 0.0}])
def test_sampling_narrowed_to_the_top_token_is_greedy(adapter, narrowing):
    """top_k and top_p were dropped (humaneval asks for top_p 0.95): sampling at temperature 1 kept every token."""
    contexts = ["The dog", "A cat sits.", "Roof: A man"]

    def generate(kwargs):
        return adapter.generate_until([Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)])

    asked = {"until": ["\n"], "max_gen_toks": 12}
    greedy = generate(asked | {"do_sample": False})
    for seed in range(4):
        torch.manual_seed(seed)
        assert generate(asked | {"do_sample": True, "temperature": 1.0} | narrowing) == greedy


def test_an_unsupported_generation_argument_is_named_once(adapter):
    request = Instance("generate_until", {}, ("The dog", {"until": ["s"], "max_gen_toks": 2, "num_beams": 4}), 0)
    with pytest.warns(UserWarning, match=r"ignoring generation arguments \['num_beams'\]"):
        adapter.generate_until([request])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.generate_until([request])


def test_generate_until_stops_once_every_answer_holds_a_stop_string(adapter):
    """Stop strings used to cut the texts after max_gen_toks steps: each row here writes one at its first token, and
    the batch took 32 forward passes for one."""
    contexts = ["The dog", "A cat sits.", "Roof: A man"]

    def generate(kwargs):
        return adapter.generate_until([Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)])

    firsts = generate({"until": [], "max_gen_toks": 1})  # each row's first character, greedy
    assert all(len(first) == 1 for first in firsts)
    passes = []
    adapter.model.register_forward_hook(lambda *args: passes.append(1))
    assert generate({"until": sorted(set(firsts)), "max_gen_toks": 32}) == ["", "", ""]
    assert len(passes) == 1  # the prompts' prefill, which gave every row its first token


def test_generate_until_keeps_to_a_max_new_tokens_budget(adapter):
    request = Instance("generate_until", {}, ("The dog", {"until": ["\x00"], "max_new_tokens": 3}), 0)
    (text,) = adapter.generate_until([request])
    assert len(adapter.tokenizer.encode(text)) <= 3


def test_the_model_goes_to_the_device_asked_for(tmp_path, monkeypatch):
    """The adapter used to read the checkpoint with map_location=cuda and leave the model it built on the CPU."""
    import lm.checkpoint

    asked = []

    def load_for_inference(path, device):
        asked.append(device)
        return torch.nn.Linear(1, 1), CharTokenizer.train(["ab"]), {}, device

    monkeypatch.setattr(lm.checkpoint, "load_for_inference", load_for_inference)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    LMEvalAdapter(ckpt="x.ckpt", device="cuda:1")
    assert asked == ["cuda:1"]


def test_chat_template_is_lm_s_and_its_markers_encode_back_to_special_tokens(adapter, tmp_path):
    tokenizer = adapter.tokenizer
    history = [{"role": "system", "content": "A cat sits."}, {"role": "user", "content": "The dog"}]
    text = adapter.apply_chat_template(history)
    assert adapter.tok_encode(text) == render_chat(history, tokenizer, add_generation_prompt=True)[0]
    prefill = [*history, {"role": "assistant", "content": "barks"}]
    open_reply = adapter.apply_chat_template(prefill, add_generation_prompt=False)
    assert adapter.tok_encode(open_reply) == render_chat(prefill, tokenizer)[0][:-1]  # no END after "barks"
    assert adapter.tokenizer_name.startswith("lm-char-")

    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps(row | {"label": 0}) + "\n" for row in ROWS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_hellaswag.yaml").write_text(TASK_YAML.format(data=data))
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    contexts = []
    loglikelihood = adapter.loglikelihood
    adapter.loglikelihood = lambda requests, **kw: (
        contexts.extend(r.args[0] for r in requests) or loglikelihood(requests, **kw)
    )
    out = simple_evaluate(
        model=adapter, tasks=["tiny_hellaswag"], task_manager=manager, bootstrap_iters=0, apply_chat_template=True
    )
    # a range check of acc (0 <= acc <= 1, as before) cannot fail: what matters is that the contexts were chat-rendered
    assert "acc,none" in out["results"]["tiny_hellaswag"]
    assert contexts and all(adapter.tok_encode(c)[-1] == tokenizer.token_id(ASSISTANT) for c in contexts)


@pytest.mark.parametrize("kind", ["gpt2", "hf"])
def test_chat_template_markers_encode_back_where_bos_decodes_to_another_string(tmp_path, kind):
    """gpt2's BOS decodes to "<|endoftext|>", a Llama-style tokenizer.json's to "<s>": the rendered chat holds those,
    and they used to encode back as plain text."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFBackend

    from lm.tokenizer import GPT2Tokenizer, Tokenizer

    if kind == "gpt2":
        tokenizer = GPT2Tokenizer()
    else:
        words = {"<s>": 0, "</s>": 1, "[UNK]": 2, **{c: 3 + i for i, c in enumerate("hi ter")}}
        backend = HFBackend(models.WordLevel(words, unk_token="[UNK]"))  # one token a character: "<s>" as text is 3
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()  # decodes to the text it encoded
        backend.save(str(tmp_path / "tokenizer.json"))
        tokenizer = Tokenizer.load(tmp_path / "tokenizer.json")
    path = tmp_path / "t.ckpt"
    write_checkpoint(path, tokenizer, block_size=16, n_layer=1, n_head=2, n_embd=32)
    adapter = LMEvalAdapter(ckpt=str(path), batch_size=2, device="cpu")
    history = [{"role": "user", "content": "hi there"}]
    text = adapter.apply_chat_template(history)
    assert not text.startswith("<|bos|>")
    assert adapter.tok_encode(text) == render_chat(history, tokenizer, add_generation_prompt=True)[0]


def test_marker_text_in_a_chat_s_contents_stays_text_as_render_chat_encodes_it(tmp_path):
    """The rendered chat was split at every marker's text, a content's own "<|end|>" or gpt2's "<|endoftext|>"
    included: the harness's prompt held special tokens where SFT, lm chat and lm serve have plain text."""
    from lm.tokenizer import GPT2Tokenizer

    tokenizer = GPT2Tokenizer()
    path = tmp_path / "t.ckpt"
    write_checkpoint(path, tokenizer, block_size=16, n_layer=1, n_head=2, n_embd=32)
    adapter = LMEvalAdapter(ckpt=str(path), batch_size=2, device="cpu")
    history = [
        {"role": "system", "content": "Say <|endoftext|> at the end."},
        {"role": "user", "content": "What is <|end|>?<|assistant|>"},
    ]
    text = adapter.apply_chat_template(history)
    assert adapter.tok_encode(text) == render_chat(history, tokenizer, add_generation_prompt=True)[0]
    reply = " A marker, <|end|>"  # a continuation holding marker text: the reply's content, text too
    context, continuation = adapter._encode_pair(text, reply)
    assert context + continuation == render_chat([*history, {"role": "assistant", "content": reply}], tokenizer)[0][:-1]
    prefill = [*history, {"role": "assistant", "content": "It ends <|end|> a turn"}]
    open_reply = adapter.apply_chat_template(prefill, add_generation_prompt=False)
    assert adapter.tok_encode(open_reply) == render_chat(prefill, tokenizer)[0][:-1]  # no END after the reply


def test_a_chat_rendered_by_an_earlier_run_encodes_to_its_markers_and_other_text_stays_text(tmp_path):
    """lm-eval's --cache_requests reads the rendered contexts of an earlier run back without calling
    apply_chat_template: the markers were restored only after such a call in this process, so a cached run scored
    "<|endoftext|><|user|>..." as plain text. A text that is not a chat keeps marker text as text after one too."""
    from lm.tokenizer import GPT2Tokenizer

    tokenizer = GPT2Tokenizer()
    path = tmp_path / "t.ckpt"
    write_checkpoint(path, tokenizer, block_size=16, n_layer=1, n_head=2, n_embd=32)
    history = [{"role": "user", "content": "The dog"}]
    cached = LMEvalAdapter(ckpt=str(path), device="cpu").apply_chat_template(history)
    adapter = LMEvalAdapter(ckpt=str(path), device="cpu")  # the next run's
    assert adapter.tok_encode(cached) == render_chat(history, tokenizer, add_generation_prompt=True)[0]
    adapter.apply_chat_template(history)
    document = "A page that quotes <|endoftext|> and <|end|>."  # a rolling (perplexity) request in the same run
    assert adapter.tok_encode(document) == tokenizer.encode(document)


def test_marker_text_in_a_continuation_stays_text_when_the_chat_s_messages_hold_none(tmp_path):
    """Only chats whose messages held marker text were remembered: a plain chat's continuation (a choice such as
    " A marker, <|end|>") was split at its marker text, and scored with an <|end|> token that render_chat never
    puts in a reply's content."""
    from lm.tokenizer import GPT2Tokenizer

    tokenizer = GPT2Tokenizer()
    path = tmp_path / "t.ckpt"
    write_checkpoint(path, tokenizer, block_size=16, n_layer=1, n_head=2, n_embd=32)
    adapter = LMEvalAdapter(ckpt=str(path), batch_size=2, device="cpu")
    history = [{"role": "user", "content": "What ends a turn?"}]
    text = adapter.apply_chat_template(history)
    for reply in (" A marker, <|end|>", " <|endoftext|> ends documents"):
        context, continuation = adapter._encode_pair(text, reply)
        expected = render_chat([*history, {"role": "assistant", "content": reply}], tokenizer)[0][:-1]
        assert context + continuation == expected
    prefill = [*history, {"role": "assistant", "content": "It is"}]  # an open reply, continued with marker text
    open_reply = adapter.apply_chat_template(prefill, add_generation_prompt=False)
    whole = [*history, {"role": "assistant", "content": "It is <|end|>"}]
    assert adapter.tok_encode(open_reply + " <|end|>") == render_chat(whole, tokenizer)[0][:-1]


def test_model_args_may_set_device_and_batch_size_beside_the_harness_s_flags(tmp_path):
    """lm-eval's command line always passes its --batch_size (default 1) and --device as well: the docstring's
    device= or batch_size= in --model_args was a TypeError ("multiple values"). --model_args wins."""
    path = tmp_path / "tiny.ckpt"
    write_checkpoint(path, CharTokenizer.train(["ab"]), block_size=8, n_layer=1, n_head=2, n_embd=16)
    both = {"batch_size": 1, "device": "cuda:3", "max_batch_size": None}
    adapter = LMEvalAdapter.create_from_arg_string(f"ckpt={path},device=cpu,batch_size=8", both)
    assert adapter.batch_size == 8 and next(adapter.model.parameters()).device == torch.device("cpu")
    adapter = LMEvalAdapter.create_from_arg_obj({"ckpt": str(path)}, {"batch_size": 4, "device": "cpu"})
    assert adapter.batch_size == 4


def test_a_misspelled_model_arg_is_named_not_swallowed(tmp_path):
    path = tmp_path / "tiny.ckpt"
    write_checkpoint(path, CharTokenizer.train(["ab"]), block_size=8, n_layer=1, n_head=2, n_embd=16)
    with pytest.warns(UserWarning, match=r"ignoring model_args \['max_gen_tok'\]"):
        LMEvalAdapter.create_from_arg_string(f"ckpt={path},max_gen_tok=8", {"device": "cpu", "max_batch_size": None})


def sentencepiece_style_tokenizer(directory):
    """A Llama-2-style tokenizer.json: the normalizer writes a text's start and every space as "▁", and the decoder
    strips the one space that begins a decoded text, so the decode of a content after a marker begins with a space
    that encodes as another "▁"."""
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import decoders, models, normalizers, trainers

    from lm.tokenizer import Tokenizer

    backend = HFBackend(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(["Hello there. Be brief, say hi. What is it?"] * 20, trainer)
    backend.save(str(directory / "tokenizer.json"))
    return Tokenizer.load(directory / "tokenizer.json")


def test_chat_template_gives_lm_chat_s_ids_with_a_sentencepiece_style_tokenizer(tmp_path):
    """The rendered chat used to be decoded from render_chat's ids, and " Hello" after a marker encoded back as
    "▁▁Hello": every message gained a token that SFT never trained on."""
    tokenizer = sentencepiece_style_tokenizer(tmp_path)
    user = tokenizer.token_id(USER)
    assert tokenizer.decode([user, *tokenizer.encode("Hello")]) == "<|user|> Hello"  # the case: a space added
    path = tmp_path / "sp.ckpt"
    write_checkpoint(path, tokenizer, block_size=32, n_layer=1, n_head=2, n_embd=32)
    adapter = LMEvalAdapter(ckpt=str(path), batch_size=2, device="cpu")
    single = [{"role": "user", "content": "Hello there"}]
    several = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Say hi."},
        {"role": "user", "content": "What is it?"},
    ]
    for history in (single, several):
        text = adapter.apply_chat_template(history)
        assert adapter.tok_encode(text) == render_chat(history, tokenizer, add_generation_prompt=True)[0]
    open_reply = adapter.apply_chat_template(several[:3], add_generation_prompt=False)
    assert adapter.tok_encode(open_reply) == render_chat(several[:3], tokenizer)[0][:-1]  # no END after the reply


def test_the_adapter_s_command_without_lm_eval_is_one_line():
    """python -m lm.lm_eval_adapter without the eval extra was a traceback ending in the LMError."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import runpy, sys; sys.modules['lm_eval'] = None; runpy.run_module('lm.lm_eval_adapter', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == 'error: the lm-evaluation-harness adapter needs lm-eval: pip install "lm[eval]"\n'


def test_an_empty_continuation_scores_zero_as_nothing_to_predict(adapter, tmp_path):
    """Under --apply_chat_template the harness puts no delimiter before a choice, so an empty choice is an empty
    continuation: score_continuations raised a ValueError traceback and the whole run stopped."""
    context = adapter.apply_chat_template([{"role": "user", "content": "The dog"}])
    requests = [Instance("loglikelihood", {}, (context, choice), i) for i, choice in enumerate(["barks.", "", "sat"])]
    scores = adapter.loglikelihood(requests)
    assert scores[1] == (0.0, True)
    assert [scores[0], scores[2]] == adapter.loglikelihood([requests[0], requests[2]])
    # (counted as no forward pass, as it runs none: under FSDP a rank counting one more would wait for good)
    assert continuation_passes([([1], [2]), ([1], [])], block_size=8, batch_size=1) == 1

    data = tmp_path / "hs.jsonl"
    # (not in the first row, whose choices the harness reads each first character of when it builds the task)
    rows = [ROWS[0] | {"label": 0}, ROWS[1] | {"endings": ["a", "", "sits.", "ccc dd"], "label": 2}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_hellaswag.yaml").write_text(TASK_YAML.format(data=data))
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = simple_evaluate(
        model=adapter, tasks=["tiny_hellaswag"], task_manager=manager, bootstrap_iters=0, apply_chat_template=True
    )
    assert "acc,none" in out["results"]["tiny_hellaswag"]
