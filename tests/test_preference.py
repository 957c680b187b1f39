"""Preference tuning: pair formats, batches, the DPO/IPO losses, the reference model, and DPO through the Trainer."""

import json
import math
import random
from dataclasses import asdict

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lm.chat import render_chat
from lm.chat_data import IGNORE_INDEX
from lm.checkpoint import load_checkpoint
from lm.config import get_config, padded_vocab_size
from lm.errors import LMError
from lm.model import GPT
from lm.preference import (
    REWARD_METRICS,
    PreferenceData,
    PreferenceModel,
    detect_preference_format,
    pair_problem,
    preference_loss,
    reward_metrics,
    sequence_logprobs,
    to_pair,
)
from lm.tasks import TASKS, wrong_answer
from lm.tokenizer import ASSISTANT, BOS, CharTokenizer
from tests.conftest import MemoryLogger, needs_cpu_fp8, shared_file

TOK = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ?!.,0123456789+"])
PROMPT = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "what is 2+2?"},
]
CHOSEN = [{"role": "assistant", "content": "4"}]
REJECTED = [{"role": "assistant", "content": "5, i think"}]


def _hh(messages):
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


RECORDS = {
    "conversational": {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    "implicit": {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
    "hh": {"chosen": _hh(PROMPT + CHOSEN), "rejected": _hh(PROMPT + REJECTED)},
}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_formats_are_detected_and_give_the_same_pair(fmt):
    record = RECORDS[fmt]
    assert detect_preference_format(record) == fmt
    assert to_pair(record, fmt) == (PROMPT, CHOSEN, REJECTED)


@pytest.mark.parametrize("fmt", ["conversational", "implicit"])
def test_openai_text_parts_give_the_same_pair_as_strings(fmt):
    """Content as a list of OpenAI text parts reads as its joined text, as ChatData reads it."""

    def parted(messages):
        return [
            {**m, "content": [{"type": "text", "text": m["content"][:1]}, {"type": "text", "text": m["content"][1:]}]}
            for m in messages
        ]

    record = {k: parted(v) for k, v in RECORDS[fmt].items()}
    if fmt == "implicit":  # the prompt written as parts in one transcript and as a string in the other
        record["rejected"] = PROMPT + parted(REJECTED)
    assert to_pair(record, fmt) == (PROMPT, CHOSEN, REJECTED)
    record["chosen"][-1]["content"] = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(ValueError, match="only text content parts"):
        to_pair(record, fmt)


@pytest.mark.parametrize("fmt", ["conversational", "implicit"])
def test_a_blank_system_message_is_left_out_and_developer_is_system(fmt):
    """Both made the pair malformed ("message 0 (system) has empty content", "unknown role 'developer'")."""
    record = json.loads(json.dumps(RECORDS[fmt]))
    first = "prompt" if fmt == "conversational" else "chosen"
    record[first].insert(0, {"role": "system", "content": " "})
    if fmt == "implicit":
        record["rejected"].insert(0, {"role": "system", "content": " "})
    assert to_pair(record, fmt) == (PROMPT, CHOSEN, REJECTED)
    for key in ["prompt"] if fmt == "conversational" else ["chosen", "rejected"]:
        record[key][0] = {"role": "developer", "content": "be brief"}
    prompt, chosen, rejected = to_pair(record, fmt)
    assert (prompt, chosen, rejected) == ([{"role": "system", "content": "be brief"}, *PROMPT], CHOSEN, REJECTED)
    assert pair_problem(prompt, chosen, rejected) is None


def test_standard_format_is_one_user_turn_and_one_reply():
    record = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    assert detect_preference_format(record) == "standard"
    assert to_pair(record, "standard") == (
        [{"role": "user", "content": "2+2?"}],
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "5"}],
    )


def test_implicit_prompt_ends_at_the_last_user_turn_before_the_replies_differ():
    # Both transcripts share an assistant turn after the last user turn: it belongs to the replies, not the prompt.
    chosen = PROMPT + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "sure?"}]
    rejected = PROMPT + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "ok"}]
    prompt, c, r = to_pair({"chosen": chosen + CHOSEN, "rejected": rejected + REJECTED}, "implicit")
    assert prompt == PROMPT
    assert c[0]["role"] == "assistant" and c[-1] == CHOSEN[0] and r[-1] == REJECTED[0]
    user_only = {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}
    with pytest.raises(ValueError, match="no common prompt"):
        to_pair(user_only, "implicit")


def test_an_hh_transcript_as_the_prompt_string_gives_its_turns():
    """Dahoas/full-hh-rlhf's layout: the prompt is an HH transcript ending in "\n\nAssistant:", the replies are strings.
    It was read as the standard format: the whole transcript, markers and all, as one user message."""
    record = {"prompt": _hh(PROMPT) + "\n\nAssistant:", "chosen": " 4", "rejected": " 5, i think"}
    assert detect_preference_format(record) == "hh"
    assert to_pair(record, "hh") == (PROMPT, CHOSEN, REJECTED)
    with pytest.raises(ValueError, match="must end with a Human turn"):
        to_pair({**record, "prompt": _hh(PROMPT + CHOSEN)}, "hh")


def test_an_empty_hh_reply_is_named_as_such():
    """Some hh-rlhf replies are empty: the transcript ends in "\n\nAssistant:" with no space after it."""
    record = {"chosen": _hh(PROMPT + CHOSEN), "rejected": _hh(PROMPT) + "\n\nAssistant:"}
    prompt, chosen, rejected = to_pair(record, "hh")
    assert (prompt, chosen, rejected) == (PROMPT, CHOSEN, [{"role": "assistant", "content": ""}])
    assert pair_problem(prompt, chosen, rejected) == "prompt + rejected: message 3 (assistant) has empty content"


def test_bad_pairs_name_file_and_line_or_are_skipped_and_counted(tmp_path):
    same = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN}
    user_reply = {"prompt": PROMPT, "chosen": [{"role": "user", "content": "4"}], "rejected": REJECTED}
    good = [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": CHOSEN, "rejected": REJECTED} for i in range(6)
    ]
    path = _write_jsonl(tmp_path / "p.jsonl", [*good[:3], same, user_reply, *good[3:]])
    with pytest.raises(LMError, match=r"p.jsonl:4: chosen and rejected are the same reply"):
        PreferenceData(source=path)._conversations()
    data = PreferenceData(source=path, on_bad_record="skip", val_fraction=0.2)
    train, val = data._conversations()
    assert len(train) + len(val) == 6 and data.counts == {"skipped_bad": 2}
    not_pairs = _write_jsonl(tmp_path / "m.jsonl", [{"messages": PROMPT + CHOSEN}] * 3)
    with pytest.raises(LMError, match="not a preference pair"):
        PreferenceData(source=not_pairs)._conversations()
    # TRL's prompt-less text pairs: both keys are there, so the message must not say they are missing alone
    text_pairs = _write_jsonl(tmp_path / "t.jsonl", [{"chosen": "The sky is blue.", "rejected": "It is green."}] * 3)
    with pytest.raises(LMError, match="or text replies with no prompt and no HH transcript"):
        PreferenceData(source=text_pairs)._conversations()


def test_batches_are_chosen_rows_then_rejected_rows_with_the_same_prompt_and_loss_on_replies_only(tmp_path):
    records = [
        {"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": CHOSEN, "rejected": REJECTED}
        for i in range(8)
    ]
    data = PreferenceData(source=_write_jsonl(tmp_path / "p.jsonl", records), block_size=64, batch_size=3)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape[0] == 6  # B chosen, then B rejected
    ids, labels = batch["input_ids"], batch["labels"]
    tok = data.tokenizer
    for row in range(3):
        chosen, rejected = labels[row][labels[row] != IGNORE_INDEX], labels[row + 3][labels[row + 3] != IGNORE_INDEX]
        assert tok.decode(chosen.tolist()) == "4<|end|>" and tok.decode(rejected.tolist()) == "5, i think<|end|>"
        first_c = int((labels[row] != IGNORE_INDEX).nonzero()[0])
        first_r = int((labels[row + 3] != IGNORE_INDEX).nonzero()[0])
        assert first_c == first_r and torch.equal(ids[row, : first_c + 1], ids[row + 3, : first_r + 1])


def test_a_long_pair_keeps_bos_and_the_end_of_its_prompt_and_is_counted():
    data = PreferenceData(block_size=24, max_prompt_fraction=0.5)
    data.tokenizer = TOK
    prompt = [{"role": "user", "content": "a" * 40 + "zz"}]
    (chosen, rejected), cut = data._example(prompt, [{"role": "assistant", "content": "b" * 30}], REJECTED)
    assert cut
    for ids, labels in (chosen, rejected):
        assert len(ids) <= 24 and ids[0] == TOK.token_id(BOS)
        assert any(label != IGNORE_INDEX for label in labels)
    assert chosen[0][:12] == rejected[0][:12]  # the same cut prompt: BOS + 11 of the prompt's last tokens
    assert TOK.decode(chosen[0][1:12]) == "a" * 8 + "zz<|end|>" and chosen[0][12] == TOK.token_id(ASSISTANT)
    short, cut = data._example([{"role": "user", "content": "hi"}], CHOSEN, REJECTED)
    assert not cut and short[0][0] == render_chat([{"role": "user", "content": "hi"}, *CHOSEN], TOK)[0][:-1]


def test_a_pair_the_cut_leaves_with_the_same_replies_is_dropped():
    """Replies that agree past the context's end would be two equal rows: a margin of 0, loss log 2, no gradient."""
    data = PreferenceData(block_size=24)
    data.tokenizer = TOK
    prompt = [{"role": "user", "content": "q1"}]
    same_start = [[{"role": "assistant", "content": "same prefix " * 3 + end}] for end in "xy"]
    assert data._example(prompt, *same_start) == (None, True)  # _examples counts it as dropped_*_truncated
    differ_early = [[{"role": "assistant", "content": end + "same prefix " * 3}] for end in "xy"]
    pair, cut = data._example(prompt, *differ_early)
    assert cut and pair[0] != pair[1]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_pairs_reject_a_near_miss(task):
    rng = random.Random(0)
    for _ in range(200):
        problem = TASKS[task](rng, 2)
        wrong = wrong_answer(problem, rng)
        assert wrong != problem.answer and len(wrong) in (len(problem.answer), len(problem.answer) + 1)
    data = PreferenceData(source=f"task:{task}", task_size=50, task_val_size=10, batch_size=4)
    data.setup()
    assert len(data.train_examples) == 50 and len(data.val_examples) == 10


def test_sequence_logprobs_are_summed_log_softmax_with_the_same_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (4, 6), generator=g)
    labels[:, :2] = IGNORE_INDEX
    logps, n_tokens = sequence_logprobs(logits, labels)
    reference = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = (reference * (labels != IGNORE_INDEX)).sum(1)
    torch.testing.assert_close(logps, expected)
    assert n_tokens.tolist() == [4] * 4
    weights = torch.randn(4, generator=g)
    (grad,) = torch.autograd.grad((logps * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


def test_dpo_ipo_and_label_smoothing_losses():
    logps = torch.tensor([-3.0, -5.0, -4.0, -4.0])  # chosen (2), then rejected (2)
    ref = torch.tensor([-4.0, -5.0, -4.0, -3.0])
    n = torch.tensor([2, 4, 2, 4])
    losses, chosen, rejected = preference_loss(logps, ref, n, beta=0.5)
    margin = torch.tensor([1.0 - 0.0, 0.0 - (-1.0)])
    torch.testing.assert_close(losses, -F.logsigmoid(0.5 * margin))
    torch.testing.assert_close(chosen, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([0.0, -0.5]))
    smooth, _, _ = preference_loss(logps, ref, n, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(smooth, -0.9 * F.logsigmoid(0.5 * margin) - 0.1 * F.logsigmoid(-0.5 * margin))
    ipo, _, _ = preference_loss(logps, ref, n, beta=0.5, loss_type="ipo")
    per_token = torch.tensor([1.0 / 2 - 0.0 / 2, 0.0 / 4 - (-1.0) / 4])
    torch.testing.assert_close(ipo, (per_token - 1.0) ** 2)
    # The policy at its reference: every pair costs log 2, no reward, and a tie is not a win.
    same, c, r = preference_loss(logps, logps, n, beta=0.1)
    torch.testing.assert_close(same, torch.full((2,), math.log(2)))
    assert reward_metrics(c, r).tolist() == [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_a_hub_preference_dataset_is_read_with_its_config_split_and_revision(monkeypatch):
    """HuggingFaceH4/ultrafeedback_binarized keeps its pairs in train_prefs; a config and a pinned revision reach
    datasets.load_dataset too (standing in for the download), as they do for PretrainData and ChatData."""
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        prompts = [[{"role": "user", "content": f"what is {i}+{i}?"}] for i in range(10)]
        return datasets.Dataset.from_list([{"prompt": p, "chosen": CHOSEN, "rejected": REJECTED} for p in prompts])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = PreferenceData(
        source="org/prefs",
        source_config="default",
        source_split="train_prefs",
        source_revision="abc123",
        tokenizer="char",
        block_size=64,
        batch_size=2,
    )
    data.setup()
    assert calls == [("org/prefs", {"name": "default", "split": "train_prefs", "revision": "abc123", "data_dir": None})]
    assert len(data.train_examples) + len(data.val_examples) == 10


def test_anthropic_hh_rlhf_s_helpful_base_is_read_from_its_folder(monkeypatch):
    """Anthropic/hh-rlhf keeps helpful-base in a folder, not a config: only load_dataset(..., data_dir="helpful-base")
    reads it. PreferenceData had no such setting, so dpo_hh.yaml on the hub trained on every folder's pairs, harmless
    ones too. (datasets.load_dataset stands in for the download.)"""
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        pairs = [([{"role": "user", "content": f"what is {i}+{i}?"}], CHOSEN, REJECTED) for i in range(10)]
        return datasets.Dataset.from_list([{"chosen": _hh(p + c), "rejected": _hh(p + r)} for p, c, r in pairs])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = PreferenceData(
        source="Anthropic/hh-rlhf", source_data_dir="helpful-base", source_split="test", tokenizer="char", block_size=64
    )
    data.setup()
    assert calls == [
        ("Anthropic/hh-rlhf", {"name": None, "split": "test", "revision": None, "data_dir": "helpful-base"})
    ]
    assert len(data.train_examples) + len(data.val_examples) == 10


def test_a_compressed_pairs_file_reads_as_the_plain_file(tmp_path):
    """A .jsonl.gz of pairs was taken for a hub id and failed; it reads as ChatData and PretrainData read one."""
    import gzip

    records = [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": CHOSEN, "rejected": REJECTED} for i in range(10)
    ]
    plain = PreferenceData(source=_write_jsonl(tmp_path / "p.jsonl", records), tokenizer="char", block_size=64)
    plain.setup()
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress((tmp_path / "p.jsonl").read_bytes()))
    data = PreferenceData(source=str(tmp_path / "p.jsonl.gz"), tokenizer="char", block_size=64)
    data.setup()
    assert data.train_examples == plain.train_examples and data.val_examples == plain.val_examples


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.jsonl", "preference data file not found: "), ("pairs.csv", "unsupported preference data file ")],
)
def test_a_missing_or_unsupported_pairs_file_is_named_preference_data(tmp_path, name, message):
    """The file errors of pairs said "chat data" (read_records wrote them for ChatData alone), as its load error did."""
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(LMError, match=f"^{message}"):
        PreferenceData(source=str(tmp_path / name), tokenizer="char", block_size=64).setup()


def _sft_checkpoint(tmp_path, tokenizer=TOK):
    """An lm checkpoint of a tiny random GPT (context 32), as init_from reads it."""
    config = get_config("tiny", vocab_size=padded_vocab_size(tokenizer.vocab_size), block_size=32)
    torch.manual_seed(0)
    gpt = GPT(config)
    path = tmp_path / "sft.ckpt"
    state = {f"model.{k}": v for k, v in gpt.state_dict().items()}
    torch.save({"lm": {"model_config": asdict(config), "tokenizer": tokenizer.to_state()}, "state_dict": state}, path)
    return path, gpt


def _trainer(tmp_path, steps, *, accumulate=1, logger=False, val=0):
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        logger=logger,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=val,
        val_check_interval=steps if val else None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )


def test_dpo_trains_the_policy_keeps_the_reference_and_saves_one_gpt(tmp_path):
    # A preference the tiny model can pick up in a few steps: replies that agree, over replies that refuse.
    records = [
        {"prompt": f"is {i} fine?", "chosen": "yes, it is.", "rejected": "no. never." if i % 2 else "no!"}
        for i in range(200)
    ]
    source = _write_jsonl(tmp_path / "pairs.jsonl", records)
    path, start = _sft_checkpoint(tmp_path, TOK)
    data = PreferenceData(source=source, tokenizer=str(path), batch_size=16, block_size=32, val_fraction=0.1)
    module = PreferenceModel(get_config("tiny"), init_from=str(path), lr=3e-3, beta=0.5, warmup_steps=0)
    logger = MemoryLogger()
    trainer = _trainer(tmp_path, 30, logger=logger, val=2)
    trainer.fit(module, datamodule=data)
    steps = logger.by_step()
    first, last = steps[0], steps[max(steps)]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert last["train/loss"] < 0.1 and last["train/rewards/accuracy"] == 1 and last["train/rewards/margin"] > 2
    val = next(m for m in steps.values() if "val/rewards/accuracy" in m)
    assert val["val/rewards/accuracy"] == 1 and val["val/loss"] < 0.1 and "val/ppl" not in val
    reference = module.reference
    for name, weight in start.state_dict().items():  # the reference is the init checkpoint, untouched
        torch.testing.assert_close(reference.state_dict()[name], weight)
    assert not torch.equal(module.model.state_dict()["lm_head.weight"], start.state_dict()["lm_head.weight"])
    saved = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(saved)
    keys = torch.load(saved, weights_only=True)["state_dict"].keys()
    assert keys and all(k.startswith("model.") for k in keys)  # the policy only: lm chat/eval/export load it
    model, tokenizer, _ = load_checkpoint(saved)
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], module.model.state_dict()["lm_head.weight"])
    assert tokenizer.fingerprint == TOK.fingerprint
    # Resuming rebuilds the reference from init_from, not from the resumed policy.
    resumed = PreferenceModel(get_config("tiny"), init_from=str(path), lr=3e-3, beta=0.5, warmup_steps=0)
    _trainer(tmp_path, 32).fit(resumed, datamodule=data, ckpt_path=saved)
    assert resumed.global_step == 32
    for name, weight in start.state_dict().items():
        torch.testing.assert_close(resumed.reference.state_dict()[name], weight)


def test_dpo_accumulation_equals_one_big_batch_of_pairs(tmp_path):
    """2 micro-batches of 4 pairs with replies of different lengths == one batch of 8 pairs: the gradient of a step is
    that of the mean loss over its pairs, whatever their token counts. (Compared before AdamW, whose first update is
    about lr * sign(gradient), so float noise in gradients near 0 would decide the test.)"""
    data = PreferenceData(source="task:reverse", task_size=64, task_val_size=8, batch_size=8, block_size=32)
    data.setup()
    pairs = data.train_examples[:8]
    assert len({len(c[0]) for c, _ in pairs}) > 1
    path, _ = _sft_checkpoint(tmp_path, data.tokenizer)

    def step_gradients(batches, accumulate):
        module = PreferenceModel(get_config("tiny"), init_from=str(path), lr=1e-2, warmup_steps=0, beta=0.5)
        gradients = {}
        clip = module.configure_gradient_clipping

        def clip_and_keep(*args, **kwargs):  # where the step's gradients get their final scale
            clip(*args, **kwargs)
            gradients.update({n: p.grad.clone() for n, p in module.model.named_parameters()})

        module.configure_gradient_clipping = clip_and_keep
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        _trainer(tmp_path, 1, accumulate=accumulate).fit(module, loader)
        return gradients

    one = step_gradients([PreferenceData.collate(pairs)], 1)
    two = step_gradients([PreferenceData.collate(pairs[:4]), PreferenceData.collate(pairs[4:])], 2)
    assert one
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-6, rtol=1e-4, msg=name)


def _agree_over_refuse_pairs(tmp_path) -> tuple[PreferenceData, PreferenceModel]:
    """40 pairs (batches of 4) preferring "yes, it is." over "no!", and a DPO module from a tiny SFT checkpoint."""
    records = [{"prompt": f"is {i} fine?", "chosen": "yes, it is.", "rejected": "no!"} for i in range(40)]
    source = _write_jsonl(tmp_path / "pairs.jsonl", records)
    path, _ = _sft_checkpoint(tmp_path, TOK)
    data = PreferenceData(source=source, tokenizer=str(path), batch_size=4, block_size=32, val_fraction=0.1)
    module = PreferenceModel(get_config("tiny"), init_from=str(path), lr=3e-3, beta=0.5, warmup_steps=0)
    return data, module


def test_a_fit_stopped_inside_an_accumulation_window_leaves_no_reward_sums_to_the_next_fit(tmp_path):
    data, module = _agree_over_refuse_pairs(tmp_path)

    class StopInsideTheSecondWindow(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = batch_idx == 2  # batches 0-1: step 1; batch 2 opens step 2's window

    def trainer(steps, callbacks=(), logger=False):
        return L.Trainer(
            accelerator="cpu", max_steps=steps, accumulate_grad_batches=2, logger=logger, log_every_n_steps=1,
            default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks),
        )  # fmt: skip

    trainer(10, [StopInsideTheSecondWindow()]).fit(module, datamodule=data)
    assert module._step_reward_sums is not None  # the cut window's micro-batch
    at_first_batch = []

    class SumsAtTheFirstBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not at_first_batch:
                at_first_batch.append(pl_module._step_reward_sums)

    logger = MemoryLogger()
    trainer(1, [SumsAtTheFirstBatch()], logger=logger).fit(module, datamodule=data)
    assert at_first_batch == [None]  # the next fit starts with no sums (the claim itself, not only its symptom)
    (first,) = logger.by_step().values()
    assert 0 <= first["train/rewards/accuracy"] <= 1  # it was 1.5, with the cut window's micro-batch counted in


def test_mfu_counts_the_reference_forward(tmp_path):
    path, gpt = _sft_checkpoint(tmp_path)
    module = PreferenceModel(get_config("tiny"), init_from=str(path))
    module.configure_model()
    assert module.train_flops_per_token(32) == pytest.approx(gpt.flops_per_token(32) * 4 / 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "init_from: preference tuning starts from a fine-tuned lm checkpoint"),
        ({"init_from": "x.ckpt", "beta": 0.0}, "beta must be > 0"),
        ({"init_from": "x.ckpt", "label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"init_from": "x.ckpt", "loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid only"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(LMError, match=message):
        PreferenceModel(get_config("tiny"), **kwargs)


def test_hh_preference_file_loads():
    data = PreferenceData(
        source=str(shared_file("hh_rlhf_helpful_base_test.preference.jsonl")), tokenizer="gpt2", block_size=256
    )
    data.setup()
    assert len(data.train_examples) + len(data.val_examples) == 2333  # every pair of the file is usable
    assert data.counts.get("skipped_bad", 0) == 0 and data.counts.get("truncated_train", 0) > 0


def _pairs_file(tmp_path, n=40):
    records = [{"prompt": f"is {i} fine?", "chosen": "yes, it is.", "rejected": "no!" * (1 + i % 3)} for i in range(n)]
    return _write_jsonl(tmp_path / "pairs.jsonl", records)


@pytest.mark.parametrize(
    ("precision", "compile"),
    [
        ("32-true", False),
        ("bf16-mixed", False),
        ("bf16-true", False),
        pytest.param("32-true", True, marks=pytest.mark.slow),  # torch.compile of policy and reference: ~17 s of CPU
    ],
)
def test_the_policy_ties_its_reference_before_training_in_every_precision(tmp_path, precision, compile):
    """bf16-true casts the policy's RoPE tables too: the reference must follow, or step 0 compares two models. With
    compile: true the reference is compiled like the policy (else their kernels round differently)."""
    path, _ = _sft_checkpoint(tmp_path)
    data = PreferenceData(source=_pairs_file(tmp_path), tokenizer=str(path), batch_size=4, block_size=32)
    module = PreferenceModel(get_config("tiny"), init_from=str(path), compile=compile)
    logger = MemoryLogger()
    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=logger, enable_progress_bar=False)
    trainer.validate(module, datamodule=data)
    metrics = logger.by_step()[0]
    assert metrics["val/loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["val/rewards/accuracy"] == 0 and metrics["val/rewards/margin"] == 0
    assert (module.reference._compiled_call_impl is not None) == compile


def test_the_reference_drops_nothing_when_the_run_trains_with_dropout(tmp_path):
    """The run's dropout (model.arch.dropout, kept over the SFT checkpoint's) is the policy's: the reference is the
    fixed point the rewards are measured from. Lightning puts the module in eval mode for validation but never
    reaches the reference (it is outside the module tree), so a reference built with dropout would still drop."""
    path, _ = _sft_checkpoint(tmp_path)
    data = PreferenceData(source=_pairs_file(tmp_path), tokenizer=str(path), batch_size=4, block_size=32)
    module = PreferenceModel(get_config("tiny", dropout=0.5), init_from=str(path))
    logger = MemoryLogger()
    L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False).validate(module, datamodule=data)
    metrics = logger.by_step()[0]
    assert module.model.config.dropout == 0.5
    assert metrics["val/loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics["val/rewards/margin"] == 0


def test_the_policy_ties_its_reference_in_the_first_training_step(tmp_path):
    """Training takes the policy's log-probabilities with gradients (lm.module's chunked cross-entropy) and the
    reference's without (then F.cross_entropy): the two rounded differently, so step 0 logged noise rewards (1e-8) and
    a train/rewards/accuracy of ~0.4 for a policy equal to its reference, where the docs promise 0."""
    data, module = _agree_over_refuse_pairs(tmp_path)
    logger = MemoryLogger()
    _trainer(tmp_path, 1, logger=logger).fit(module, datamodule=data)
    first = logger.by_step()[0]
    assert first["train/rewards/chosen"] == 0 and first["train/rewards/rejected"] == 0
    assert first["train/rewards/accuracy"] == 0 and first["train/rewards/margin"] == 0
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)


@needs_cpu_fp8
def test_the_policy_ties_its_reference_also_with_fp8(tmp_path):
    """model.fp8 converted the policy's block matmuls to float8 and not the reference's: at step 0 the rewards were
    float8 rounding noise, and the accuracy of those ties came out 1.0 instead of 0."""
    path, _ = _sft_checkpoint(tmp_path)  # torchao comes with the dev extra (lm[fp8]), as in test_module's fp8 test
    data = PreferenceData(
        source=_pairs_file(tmp_path), tokenizer=str(path), batch_size=4, block_size=32, pad_to_multiple_of=16
    )
    module = PreferenceModel(get_config("tiny"), init_from=str(path), fp8=True)
    logger = MemoryLogger()
    trainer = L.Trainer(accelerator="cpu", precision="bf16-true", logger=logger, enable_progress_bar=False)
    trainer.validate(module, datamodule=data)
    metrics = logger.by_step()[0]
    assert metrics["val/rewards/accuracy"] == 0 and metrics["val/rewards/margin"] == 0


def test_the_reference_checksum_does_not_depend_on_the_precision_the_run_builds_in(tmp_path):
    """Under bf16-true the reference is built in bf16; its checksum was taken from those rounded weights, so resuming
    the run under 32-true refused the unchanged init_from file as changed."""
    path, _ = _sft_checkpoint(tmp_path)
    fp32 = PreferenceModel(get_config("tiny"), init_from=str(path))
    fp32.configure_model()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what bf16-true's tensor_init_context does while the model is built
    try:
        bf16 = PreferenceModel(get_config("tiny"), init_from=str(path))
        bf16.configure_model()
    finally:
        torch.set_default_dtype(default)
    assert next(bf16.reference.parameters()).dtype == torch.bfloat16
    assert bf16._reference_checksum == fp32._reference_checksum


def test_an_unscored_padding_pair_weighs_nothing_in_validation(tmp_path):
    """Validation pads the ranks' shards with unscored pairs: loss and rewards must be those of the real pairs."""
    path, _ = _sft_checkpoint(tmp_path)
    data = PreferenceData(source=_pairs_file(tmp_path), tokenizer=str(path), batch_size=4, block_size=32)
    data.setup()
    module = PreferenceModel(get_config("tiny"), init_from=str(path))
    module.configure_model()
    with torch.no_grad():
        module.model.lm_head.weight.add_(0.1 * torch.randn_like(module.model.lm_head.weight))  # policy != reference
    pairs = data.train_examples[:3]

    def validate(batch_pairs):
        module.on_validation_epoch_start()
        module.validation_step(PreferenceData.collate(batch_pairs), 0)
        logger = MemoryLogger()
        module.log = lambda name, value, **kwargs: logger.log_metrics({name: float(value)}, 0)
        module.on_validation_epoch_end()  # computes and resets
        return logger.by_step()[0]

    padded = validate([*pairs, PreferenceData.unscored(pairs[0])])
    assert padded.keys() == {"val/loss", *(f"val/rewards/{name}" for name in REWARD_METRICS)}
    assert padded == pytest.approx(validate(pairs), abs=1e-6)


def test_validation_sums_stay_fp32_under_bf16_true(tmp_path):
    """A bf16 running sum stops growing: 400 batches of loss 1 then 3 must still average 2."""
    path, _ = _sft_checkpoint(tmp_path)
    module = PreferenceModel(get_config("tiny"), init_from=str(path))
    module.to(torch.bfloat16)  # what bf16-true's convert_module does to every submodule
    module.on_validation_epoch_start()
    for value in [1.0] * 200 + [3.0] * 200:
        module.val_loss_sum.update(torch.tensor(value, dtype=torch.bfloat16) * 8)
        module.val_tokens.update(torch.tensor(8))
    assert module._val_loss().item() == pytest.approx(2.0)


def test_sft_weight_is_per_pair_so_accumulation_still_equals_one_batch(tmp_path):
    data = PreferenceData(source="task:reverse", task_size=64, task_val_size=8, batch_size=8, block_size=32)
    data.setup()
    pairs = sorted(data.train_examples[:8], key=lambda p: len(p[0][0]))  # the halves differ in reply lengths
    path, _ = _sft_checkpoint(tmp_path, data.tokenizer)

    def gradients(batches, accumulate):
        module = PreferenceModel(get_config("tiny"), init_from=str(path), sft_weight=1.0, warmup_steps=0)
        module.configure_model()
        module.train()
        total = sum(module.training_step(b, 0) for b in batches)  # summed over pairs, as Lightning accumulates it
        total.backward()
        module._step_tokens = module._step_loss_sum = module._step_reward_sums = None
        return {n: p.grad / 8 for n, p in module.model.named_parameters()}

    one = gradients([PreferenceData.collate(pairs)], 1)
    two = gradients([PreferenceData.collate(pairs[:4]), PreferenceData.collate(pairs[4:])], 2)
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-6, rtol=1e-4, msg=name)


def test_sft_term_is_each_chosen_reply_s_mean_token_nll(tmp_path):
    """RPO's SFT term is per token of the chosen reply: without the division a long reply would outweigh a short one
    and the term would grow with the reply lengths. Replies of 1 to 9 characters here."""
    records = [{"prompt": f"is {i} fine?", "chosen": "yes" * (1 + i % 3), "rejected": "no!"} for i in range(8)]
    path, _ = _sft_checkpoint(tmp_path)
    data = PreferenceData(source=_write_jsonl(tmp_path / "pairs.jsonl", records), tokenizer=str(path), batch_size=4)
    data.setup()
    batch = PreferenceData.collate(data.train_examples[:4])

    def step(sft_weight):
        module = PreferenceModel(get_config("tiny"), init_from=str(path), sft_weight=sft_weight)
        module.configure_model()
        module.eval()
        with torch.no_grad():
            loss, n_pairs = module.model_step(batch)
            logps, n_tokens = sequence_logprobs(module.model(batch["input_ids"]), batch["labels"])
        return loss, n_pairs, logps.chunk(2)[0], n_tokens.chunk(2)[0]

    plain, n_pairs, _, _ = step(0.0)
    with_sft, _, chosen_logps, chosen_tokens = step(1.0)
    assert n_pairs.item() == 4 and len(set(chosen_tokens.tolist())) > 1  # replies of different lengths
    torch.testing.assert_close(with_sft, plain + (-chosen_logps / chosen_tokens).mean())


def test_pairs_and_plain_rows_go_with_their_own_model(tmp_path):
    from lm.chat_data import ChatData
    from lm.module import LanguageModel

    path, _ = _sft_checkpoint(tmp_path)
    pairs = PreferenceData(source=_pairs_file(tmp_path), tokenizer=str(path), batch_size=4, block_size=32)
    rows = ChatData(source="task:addition", tokenizer=str(path), block_size=32, batch_size=4, task_size=20)
    for module, data in ((LanguageModel(get_config("tiny"), init_from=str(path)), pairs),
                         (PreferenceModel(get_config("tiny"), init_from=str(path)), rows)):  # fmt: skip
        with pytest.raises(LMError, match="cannot train on .*PreferenceData.* go with lm.preference.PreferenceModel"):
            _trainer(tmp_path, 1).fit(module, datamodule=data)


def test_ema_shares_the_reference_instead_of_copying_it(tmp_path):
    import copy

    path, _ = _sft_checkpoint(tmp_path)
    module = PreferenceModel(get_config("tiny"), init_from=str(path))
    module.configure_model()
    averaged = copy.deepcopy(module)  # what WeightAveraging (lm.callbacks.EMA) does
    assert averaged.reference is module.reference and averaged.model is not module.model


def test_resuming_against_a_changed_init_checkpoint_is_refused(tmp_path):
    path, _ = _sft_checkpoint(tmp_path)
    data = PreferenceData(source=_pairs_file(tmp_path), tokenizer=str(path), batch_size=4, block_size=32)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(PreferenceModel(get_config("tiny"), init_from=str(path), warmup_steps=0), datamodule=data)
    saved = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(saved)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["model.lm_head.weight"] += 0.01  # the SFT run wrote its last.ckpt again
    torch.save(ckpt, path)
    resumed = PreferenceModel(get_config("tiny"), init_from=str(path))
    with pytest.raises(LMError, match="not the weights this run started from"):
        _trainer(tmp_path, 4).fit(resumed, datamodule=data, ckpt_path=saved)


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"prompt": "2+2?", "chosen": [{"role": "user", "content": "2+2?"}] + CHOSEN,
          "rejected": [{"role": "user", "content": "2+2?"}] + REJECTED}, "implicit"),  # UltraFeedback's rows
        ({"chosen": "4", "rejected": "5"}, None),  # strings without a prompt or HH turns: cannot tell
    ],
)  # fmt: skip
def test_format_detection_of_other_hub_layouts(record, fmt):
    assert detect_preference_format(record) == fmt
    if fmt:
        assert to_pair(record, fmt) == ([{"role": "user", "content": "2+2?"}], CHOSEN, REJECTED)


def test_a_step_that_stops_the_run_logs_its_own_rewards(tmp_path):
    """Lightning logs the step that stops a run whatever log_every_n_steps says; the rewards it got were the last
    logging step's, cached, beside that step's own loss."""
    data, module = _agree_over_refuse_pairs(tmp_path)

    class StopAfterStep7(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step == 7

    logger = MemoryLogger()
    L.Trainer(
        accelerator="cpu", max_steps=20, logger=logger, log_every_n_steps=5, default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[StopAfterStep7()],
    ).fit(module, datamodule=data)  # fmt: skip
    steps = logger.by_step()
    assert sorted(steps) == [4, 6]  # a logging step, then the stop
    sums = module._step_rewards  # the last step's
    expected = dict(zip(REWARD_METRICS, (sums[:-1] / sums[-1]).tolist(), strict=True))
    stop = {name: steps[6][f"train/rewards/{name}"] for name in REWARD_METRICS}
    assert stop == pytest.approx(expected)
    assert stop["margin"] != steps[4]["train/rewards/margin"]


def test_fp16_dpo_gets_the_same_gradient_norm_as_fp32_and_keeps_its_loss_scale(tmp_path):
    """Under fp16 the backward divides the loss sum by a per-fit constant (for DPO: the pairs of a batch) and the
    gradients are multiplied back: the first step's gradient norm is fp32's, and no step overflows the first scale."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    path, _ = _sft_checkpoint(tmp_path)
    norms, scales = {}, []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            norms.setdefault(trainer.precision, []).append(module._grad_norm.item())
            if trainer.precision == "16-mixed":
                scales.append(trainer.precision_plugin.scaler.get_scale())

    for plugins in ([], [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]):
        data = PreferenceData(source=_pairs_file(tmp_path), tokenizer=str(path), batch_size=4, block_size=32)
        module = PreferenceModel(get_config("tiny"), init_from=str(path), lr=1e-4, warmup_steps=1)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=4, plugins=plugins, callbacks=[Record()], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
    assert min(scales) == 2.0**16, scales
    assert norms["16-mixed"][0] == pytest.approx(norms["32-true"][0], rel=2e-2)
