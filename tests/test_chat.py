"""The chat template, its loss mask, ChatData (formats, validation, truncation, batches) and SFT end to end."""

import json
from types import SimpleNamespace

import pytest
import torch

from lm.chat import CHAT_TEMPLATE_VERSION, check_messages, fit_history, render_chat, render_prompt
from lm.chat_data import IGNORE_INDEX, ChatData
from lm.errors import LMError
from lm.tokenizer import ASSISTANT, BOS, CHAT_TOKENS, END, SPECIAL_TOKENS, SYSTEM, USER, CharTokenizer, build_tokenizer
from tests.conftest import REPO, shared_file

TOK = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ?!.,0123456789+<|>"])
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "you are welcome."},
]


def test_mask_is_one_exactly_on_assistant_content_and_its_end():
    ids, mask = render_chat(CONVERSATION, TOK)
    assert len(ids) == len(mask) and ids[0] == TOK.token_id(BOS)
    specials = {TOK.token_id(t) for t in SPECIAL_TOKENS}
    end = TOK.token_id(END)
    # Walk the turns: every assistant turn (all three) is learned, content and END; nothing else is.
    supervised = [i for i, m in enumerate(mask) if m]
    expected, pos = [], 1
    for message in CONVERSATION:
        n = len(TOK.encode(message["content"]))
        assert ids[pos] == TOK.token_id({"system": SYSTEM, "user": USER, "assistant": ASSISTANT}[message["role"]])
        assert ids[pos + 1 + n] == end
        if message["role"] == "assistant":
            expected += list(range(pos + 1, pos + 2 + n))
        pos += n + 2
    assert pos == len(ids)
    assert supervised == expected
    # No marker other than an assistant's END ever carries loss.
    assert all(ids[i] == end for i in supervised if ids[i] in specials)
    assert TOK.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "hello<|end|>4<|end|>you are welcome.<|end|>"


def test_supervise_all_learns_every_token_after_bos():
    """supervise: all (pretraining on transcripts, experiments/pretrain_addition.yaml): every next token carries loss,
    where the default learns the assistant turns only."""

    def examples(**kwargs):
        data = ChatData(source="task:addition", block_size=32, task_size=20, task_val_size=4, **kwargs)
        data.setup()
        return data.train_examples

    assert all(labels == ids[1:] + labels[-1:] for ids, labels in examples(supervise="all"))
    assert all(IGNORE_INDEX not in labels for _, labels in examples(supervise="all"))
    assert all(IGNORE_INDEX in labels for _, labels in examples())


def test_prompt_is_the_rendering_up_to_the_assistant_marker():
    prompt = render_prompt(CONVERSATION[:4], TOK)
    full, _ = render_chat(CONVERSATION, TOK)
    assert prompt[-1] == TOK.token_id(ASSISTANT)
    assert full[: len(prompt)] == prompt


def test_the_exported_chat_template_reads_messages_as_lm_serve_does(tmp_path):
    """An exported model's template (vLLM, transformers) rendered OpenAI's "developer" role as the text
    "<|developer|>" and a blank system message as "<|system|><|end|>", where lm serve reads them as the system role
    and as no message; a prompt the model was never trained on, for the same request."""
    import transformers

    from lm.chat import tidy_messages
    from lm.export import save_hf_tokenizer

    save_hf_tokenizer(TOK, tmp_path)
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for system in ({"role": "developer", "content": "be brief"}, {"role": "system", "content": " "}):
        chat = [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        chat += [{"role": "user", "content": "2+2?"}]
        ids = exported.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        assert list(getattr(ids, "input_ids", ids)) == render_prompt(tidy_messages(chat), TOK)
    with pytest.raises(Exception, match="unknown role tool"):  # lm refuses it too; not a "<|tool|>" of plain text
        exported.apply_chat_template([{"role": "tool", "content": "4"}], tokenize=False)


def test_the_exported_chat_template_joins_text_parts_as_lm_serve_does(tmp_path):
    """lm serve reads a content of OpenAI text parts as their text joined; the exported template concatenated the
    list to a string, a TypeError in transformers (and vLLM, seeing a string-only template, joins them with "\\n")."""
    import transformers

    from lm.export import save_hf_tokenizer
    from lm.serve import _messages

    save_hf_tokenizer(TOK, tmp_path)
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    chat = [
        {"role": "system", "content": [{"type": "text", "text": " "}]},  # blank once joined: left out
        {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]},
    ]
    ids = exported.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert list(getattr(ids, "input_ids", ids)) == render_prompt(_messages(chat), TOK)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(Exception, match="only text content parts are read"):  # lm serve refuses it too
        exported.apply_chat_template(image, tokenize=False)


def test_marker_strings_in_user_text_stay_text():
    ids, mask = render_chat([{"role": "user", "content": "<|end|>"}, {"role": "assistant", "content": "ok"}], TOK)
    assert ids.count(TOK.token_id(END)) == 2  # the user's END marker and the assistant's, not the typed string
    assert TOK.decode(ids[2:9]) == "<|end|>"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}], "empty content"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "assistant", "content": "a"}], "alternate"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}], "no assistant reply"),
        ([], "no messages"),
    ],
)
def test_malformed_conversations_are_named(messages, reason):
    assert reason in check_messages(messages)


def test_fit_history_drops_oldest_exchanges_but_keeps_the_system_message():
    kept, prompt = fit_history(CONVERSATION[:6], TOK, budget=30)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "thanks"
    assert len(prompt) <= 30 and len(kept) < 6
    with pytest.raises(LMError):
        fit_history(CONVERSATION[:2], TOK, budget=5)


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def _messages(i):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}


@pytest.mark.parametrize(
    "record",
    [
        lambda i: {"instruction": f"say hi {i}", "input": "", "output": "hi"},
        lambda i: {"conversations": [{"from": "human", "value": f"say hi {i}"}, {"from": "gpt", "value": "hi"}]},
        lambda i: {"messages": [{"role": "user", "content": f"say hi {i}"}, {"role": "assistant", "content": "hi"}]},
    ],
    ids=["alpaca", "sharegpt", "messages"],
)
def test_formats_are_detected_and_render_the_same(tmp_path, record):
    records = [record(i) for i in range(4)]  # distinct questions: the split keeps equal openings on one side
    data = ChatData(source=_write_jsonl(tmp_path / "d.jsonl", records), tokenizer="char", block_size=32)
    data.setup()
    ids, labels = data.train_examples[0]
    assert data.tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "hi<|end|>"
    assert data.chat_template_version == CHAT_TEMPLATE_VERSION


def test_bad_record_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    records = [_messages(i) for i in range(5)]
    records[3] = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]}
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(LMError, match=rf"{path}:4: turns do not alternate"):
        ChatData(source=path, tokenizer="char", block_size=32).setup()
    data = ChatData(source=path, tokenizer="char", block_size=32, on_bad_record="skip")
    data.setup()
    assert data.counts["skipped_bad"] == 1
    assert len(data.train_examples) + len(data.val_examples) == 4


def test_a_tokenizer_that_cannot_spell_most_of_the_data_is_an_error_not_a_skip_of_most_records(tmp_path):
    """on_bad_record: skip is for the odd broken record. A char vocabulary from other text skipped most of the data
    (1,784 of HH-RLHF's 2,344 conversations with the quickstart's) and trained on what was left, exit code 0."""
    CharTokenizer.train(["qanswer 0123456789"]).save(tmp_path / "tok")
    records = [_messages(i) for i in range(20)]
    for i in range(12):  # 12 of 20 conversations hold characters the vocabulary lacks
        records[i]["messages"][1]["content"] = f"it\u2019s {i}"
    kwargs = dict(tokenizer=str(tmp_path / "tok"), block_size=32, on_bad_record="skip", val_fraction=0.25)
    with pytest.raises(LMError, match=r"cannot encode 12 of the 20 conversations, the first .*d.jsonl:\d+: character"):
        ChatData(source=_write_jsonl(tmp_path / "d.jsonl", records), **kwargs).setup()
    for i in range(2, 12):  # now 2 of 20: skipped and counted
        records[i] = _messages(i)
    data = ChatData(source=_write_jsonl(tmp_path / "d.jsonl", records), **kwargs)
    data.setup()
    assert data.counts["skipped_bad"] == 2


def test_bad_json_on_line_one_is_a_bad_record_not_a_format_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [],}\n' + "".join(json.dumps(_messages(i)) + "\n" for i in range(4)))
    with pytest.raises(LMError, match=rf"{path}:1: invalid JSON"):
        ChatData(source=str(path), tokenizer="char", block_size=32).setup()
    data = ChatData(source=str(path), tokenizer="char", block_size=32, on_bad_record="skip")
    data.setup()
    assert data.counts["skipped_bad"] == 1
    assert len(data.train_examples) + len(data.val_examples) == 4


def test_format_is_detected_past_leading_records_of_no_known_shape(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("{}\n" + "".join(json.dumps(_messages(i)) + "\n" for i in range(4)))  # it used to stop the run
    with pytest.raises(LMError, match=rf"{path}:1: no \"messages\" list"):
        ChatData(source=str(path), tokenizer="char", block_size=32).setup()
    data = ChatData(source=str(path), tokenizer="char", block_size=32, on_bad_record="skip")
    data.setup()
    assert data.counts["skipped_bad"] == 1 and len(data.train_examples) + len(data.val_examples) == 4
    nothing_known = _write_jsonl(tmp_path / "n.jsonl", [{}, {"text": "x"}])
    with pytest.raises(LMError, match=r"n.jsonl:1: cannot tell the chat format"):
        ChatData(source=nothing_known, tokenizer="char", block_size=32).setup()


def test_an_assistant_message_of_weight_0_is_shown_but_not_learned(tmp_path):
    def chat(i, first_weight, second_weight=1):
        turns = [("user", f"q{i}"), ("assistant", "bad"), ("user", "again"), ("assistant", "good")]
        messages = [{"role": r, "content": c} for r, c in turns]
        messages[1]["weight"], messages[3]["weight"] = first_weight, second_weight
        return {"messages": messages}

    # the last: nothing to learn; it opens as the first does, so whichever side they land on has a supervised one
    records = [chat(i, 0) for i in range(4)] + [chat(0, 0, 0)]
    data = ChatData(source=_write_jsonl(tmp_path / "d.jsonl", records), tokenizer="char", block_size=64)
    data.setup()
    for ids, labels in data.train_examples + data.val_examples:
        assert "bad" in data.tokenizer.decode(ids)  # in the context
        assert data.tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "good<|end|>"  # not in the loss
    assert data.counts["dropped_unsupervised"] == 1  # before the split
    for bad in ({"weight": 2}, {"weight": 0.5}):
        record = chat(0, 1)
        record["messages"][1].update(bad)
        path = _write_jsonl(tmp_path / "bad.jsonl", [record] + [_messages(i) for i in range(4)])
        with pytest.raises(LMError, match="bad.jsonl:1: message 1 .assistant.: weight must be 0 or 1"):
            ChatData(source=path, tokenizer="char", block_size=64).setup()
    record = _messages(0)
    record["messages"][0]["weight"] = 0  # on a user message
    path = _write_jsonl(tmp_path / "user.jsonl", [record] + [_messages(i) for i in range(1, 5)])
    with pytest.raises(LMError, match="user.jsonl:1: message 0 .user.: weight must be 0 or 1, on assistant"):
        ChatData(source=path, tokenizer="char", block_size=64).setup()


def test_a_sharegpt_turn_carries_its_weight_as_a_message_does(tmp_path):
    """A ShareGPT "gpt" turn with "weight": 0 was learned all the same: the weight was dropped in the conversion."""

    def chat(i, fmt):
        turns = [("user", f"q{i}", 0), ("assistant", "bad", 0), ("user", "again", None), ("assistant", "good", 1)]
        if fmt == "messages":  # OpenAI's format allows a weight on assistant messages only
            return {
                "messages": [
                    {"role": r, "content": c} | ({"weight": w} if r == "assistant" else {}) for r, c, w in turns
                ]
            }
        sharegpt = {"user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": sharegpt[r], "value": c, "weight": w} for r, c, w in turns]}

    examples = {}
    for fmt in ("messages", "sharegpt"):
        data = ChatData(
            source=_write_jsonl(tmp_path / f"{fmt}.jsonl", [chat(i, fmt) for i in range(5)]),
            tokenizer="char",
            block_size=64,
        )
        data.setup()
        examples[fmt] = data.train_examples + data.val_examples
    assert examples["sharegpt"] == examples["messages"]
    ids, labels = examples["sharegpt"][0]
    assert data.tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "good<|end|>"
    slim_orca = [chat(i, "sharegpt") for i in range(5)]  # SlimOrca's float64 weights: 0.0 and 1.0, null on system
    for record in slim_orca:
        record["conversations"].insert(0, {"from": "system", "value": "Be brief.", "weight": None})
        for turn in record["conversations"][1:]:
            turn["weight"] = float(turn["weight"] if turn["weight"] is not None else 0)
    data = ChatData(source=_write_jsonl(tmp_path / "slim.jsonl", slim_orca), tokenizer="char", block_size=96)
    data.setup()
    ids, labels = (data.train_examples + data.val_examples)[0]
    assert data.tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "good<|end|>"
    learn_user = chat(0, "sharegpt")
    learn_user["conversations"][0]["weight"] = 1  # lm learns assistant turns only: refused, not ignored
    path = _write_jsonl(tmp_path / "u.jsonl", [learn_user] + [chat(i, "sharegpt") for i in range(1, 5)])
    with pytest.raises(LMError, match="u.jsonl:1: message 0 .user.: weight must be 0 or 1, on assistant"):
        ChatData(source=path, tokenizer="char", block_size=64).setup()


def test_weights_read_through_arrow_where_unweighted_messages_get_null_train_as_from_jsonl(tmp_path):
    """Parquet, the Hub and Dataset.to_json give every message every key: the user's "weight" is null, not absent."""
    from datasets import Dataset

    def chat(i):
        return {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "draft", "weight": 0},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": f"final {i}", "weight": 1},
            ]
        }

    records = [chat(i) for i in range(5)]
    Dataset.from_list(records).to_parquet(tmp_path / "c.parquet")
    from_parquet = ChatData(source=str(tmp_path / "c.parquet"), tokenizer="char", block_size=64)
    from_jsonl = ChatData(source=_write_jsonl(tmp_path / "c.jsonl", records), tokenizer="char", block_size=64)
    from_parquet.setup()
    from_jsonl.setup()
    assert from_parquet.train_examples == from_jsonl.train_examples and from_parquet.val_examples
    assert from_parquet.val_examples == from_jsonl.val_examples


def test_a_byte_order_mark_at_the_start_of_a_json_or_jsonl_file_is_not_part_of_the_data(tmp_path):
    records = [_messages(i) for i in range(5)]
    plain = ChatData(source=_write_jsonl(tmp_path / "plain.jsonl", records), tokenizer="char", block_size=64)
    plain.setup()
    for name, text in (("bom.jsonl", "\n".join(json.dumps(r) for r in records)), ("bom.json", json.dumps(records))):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")  # as Notepad and Excel save "UTF-8"
        data = ChatData(source=str(tmp_path / name), tokenizer="char", block_size=64)
        data.setup()
        assert data.train_examples == plain.train_examples and data.val_examples == plain.val_examples


def test_a_line_that_is_not_utf8_is_a_bad_record_not_a_traceback(tmp_path):
    """A Latin-1 "é" in a chat file stopped the run with a UnicodeDecodeError traceback (exit 1), naming no line."""
    records = [json.dumps(_messages(i), ensure_ascii=False).encode() for i in range(5)]
    records[2] = records[2].replace(b"answer", "réponse".encode("latin-1"))
    (tmp_path / "latin.jsonl").write_bytes(b"\n".join(records) + b"\n")
    path = str(tmp_path / "latin.jsonl")
    with pytest.raises(LMError, match=rf"{path}:3: not UTF-8 \(byte 0xe9 at column \d+\); save the file as UTF-8"):
        ChatData(source=path, tokenizer="char", block_size=64).setup()
    data = ChatData(source=path, tokenizer="char", block_size=64, on_bad_record="skip")
    data.setup()
    assert data.counts["skipped_bad"] == 1 and len(data.train_examples) + len(data.val_examples) == 4
    (tmp_path / "latin.json").write_bytes(b"[\n" + b",\n".join(records) + b"\n]")
    with pytest.raises(LMError, match=r"latin.json:4: not UTF-8 \(byte 0xe9\)"):
        ChatData(source=str(tmp_path / "latin.json"), tokenizer="char", block_size=64).setup()


def test_a_hub_chat_dataset_is_read_with_its_config_split_and_revision(tmp_path, monkeypatch):
    """HuggingFaceTB/smoltalk needs a config (all), and a pinned revision makes a run reproducible: ChatData took
    neither (a TypeError), and read hub data with only a split. datasets.load_dataset stands in for the download;
    a local source drops a config or revision, as PretrainData does, so a hub recipe runs on a local file."""
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list([_messages(i) for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = ChatData(
        source="HuggingFaceTB/smoltalk",
        source_config="all",
        source_split="train_sft",
        source_revision="abc123",
        tokenizer="char",
        block_size=64,
    )
    hub.setup()
    assert calls == [
        ("HuggingFaceTB/smoltalk", {"name": "all", "split": "train_sft", "revision": "abc123", "data_dir": None})
    ]
    local = ChatData(
        source=_write_jsonl(tmp_path / "c.jsonl", [_messages(i) for i in range(10)]),
        source_config="all",
        source_revision="abc123",
        tokenizer="char",
        block_size=64,
    )
    local.setup()
    assert (local.source_config, local.source_revision) == (None, None)
    assert local.train_examples == hub.train_examples and local.val_examples == hub.val_examples


def test_a_hub_chat_dataset_is_read_from_its_data_dir(tmp_path, monkeypatch, caplog):
    """A hub repository organised by folders (as Anthropic/hh-rlhf's helpful-base/, harmless-base/, ...) could not be
    narrowed to one: ChatData had no data_dir, and read every folder. It reaches load_dataset and the hub error; a
    local source drops it with the log line of source_config and reads as before."""
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        if kwargs["data_dir"] == "missing":
            raise FileNotFoundError("no such folder")
        return datasets.Dataset.from_list([_messages(i) for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = ChatData(source="org/chats", source_data_dir="helpful", tokenizer="char", block_size=64)
    hub.setup()
    assert calls == [("org/chats", {"name": None, "split": "train", "revision": None, "data_dir": "helpful"})]
    with pytest.raises(LMError, match=r"'org/chats' \(config=None, split=train, revision=None, data_dir=missing\)"):
        ChatData(source="org/chats", source_data_dir="missing", tokenizer="char", block_size=64).setup()
    path = _write_jsonl(tmp_path / "c.jsonl", [_messages(i) for i in range(10)])
    with caplog.at_level("INFO"):
        local = ChatData(source=path, source_data_dir="helpful", tokenizer="char", block_size=64)
    assert "source_data_dir are for hub datasets; " in caplog.text and local.source_data_dir is None
    local.setup()
    assert local.train_examples == hub.train_examples and local.val_examples == hub.val_examples


@pytest.mark.parametrize("name", ["c.jsonl.gz", "c.jsonl.bz2", "c.jsonl.xz", "c.json.gz", "C.JSONL.GZ"])
def test_a_compressed_chat_file_reads_as_the_plain_file(tmp_path, name):
    """PretrainData reads .jsonl.gz (as C4 and Dolma ship); ChatData took such a file for a hub id and failed ("Couldn't
    reach 'c.jsonl.gz' on the Hub"). A file that is not what its name says is one line naming it."""
    import bz2
    import gzip
    import lzma

    records = [_messages(i) for i in range(10)]
    plain = ChatData(source=_write_jsonl(tmp_path / "plain.jsonl", records), tokenizer="char", block_size=64)
    plain.setup()
    text = json.dumps(records) if ".json." in name.lower() else (tmp_path / "plain.jsonl").read_text()
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[name[name.rindex(".") :].lower()]
    with opener(tmp_path / name, "wt", encoding="utf-8") as f:
        f.write(text)
    data = ChatData(source=str(tmp_path / name), tokenizer="char", block_size=64)
    data.setup()
    assert data.train_examples == plain.train_examples and data.val_examples == plain.val_examples
    (tmp_path / "not.jsonl.gz").write_text((tmp_path / "plain.jsonl").read_text())
    with pytest.raises(LMError, match=r"not\.jsonl\.gz: could not read it: Not a gzipped file"):
        ChatData(source=str(tmp_path / "not.jsonl.gz"), tokenizer="char", block_size=64).setup()


@pytest.mark.parametrize("name", ["chats.txt", "chats.csv", "chats.parquet.gz"])
def test_a_local_file_of_another_type_is_named_unsupported_not_looked_up_on_the_hub(tmp_path, name):
    """A .txt or .csv file was taken for a hub id: "could not load chat data 'chats.txt': ... Couldn't reach
    'chats.txt' on the Hub", which sends the user looking for a network problem."""
    (tmp_path / name).write_text('{"messages": []}\n')
    with pytest.raises(LMError, match=r"unsupported chat data file .*chats\..*: expected \.jsonl, \.json or \.parquet"):
        ChatData(source=str(tmp_path / name), tokenizer="char", block_size=64).setup()


def test_conversations_with_nothing_to_learn_are_dropped_before_the_split(tmp_path):
    """A conversation whose every reply has weight 0 was counted into val, then dropped from it: val could be left
    with nothing ("no val conversation has a supervised token") or smaller than val_fraction."""
    shown = [
        {"messages": [{"role": "user", "content": f"z{i}"}, {"role": "assistant", "content": "shown", "weight": 0}]}
        for i in range(2)
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", [_messages(i) for i in range(20)] + shown)
    for seed in range(40):  # some seed put both in val before (8 did)
        data = ChatData(source=path, tokenizer="char", block_size=64, split_seed=seed)
        data.setup()
        assert (len(data.train_examples), len(data.val_examples)) == (19, 1)  # 5% of the 20 that can be learned
        assert data.counts == {"dropped_unsupervised": 2}


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q{i}"},
                      {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "q{i}"},
                      {"role": "assistant", "content": "hi"}]},
        {"conversations": [{"from": "system", "value": " "}, {"from": "human", "value": "q{i}"},
                           {"from": "gpt", "value": "hi"}]},
        {"messages": [{"role": "user", "content": "q{i} \ud800"}, {"role": "assistant", "content": "hi"}]},
    ],
    ids=["blank-system", "developer", "sharegpt-blank-system", "lone-surrogate-in-the-opening"],
)  # fmt: skip
def test_records_that_were_refused_or_crashed_the_split_train(tmp_path, record):
    """A blank system message ("system": "" in many exports) and OpenAI's "developer" role (its newer name for system,
    which lm serve already took) were malformed records; a lone surrogate in an opening crashed the split's hash
    (UnicodeEncodeError) even under on_bad_record: skip. The byte-level tokenizer encodes it (as a replacement)."""
    text = json.dumps(record)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(text.replace("{i}", str(i)) + "\n" for i in range(10)))
    data = ChatData(source=str(path), tokenizer="gpt2", block_size=64)
    data.setup()
    assert len(data.train_examples) + len(data.val_examples) == 10 and not data.counts
    ids, labels = data.train_examples[0]
    assert data.tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "hi<|end|>"
    has_system = "developer" in text
    assert (data.tokenizer.token_id("<|system|>") in ids) == has_system  # a blank one is left out, not rendered


def test_openai_text_content_parts_train_as_the_joined_text(tmp_path):
    """Content as a list of text parts (OpenAI's format, which `lm serve` accepts too) trains as its text joined."""

    def text(*pieces):
        return [{"type": "text", "text": piece} for piece in pieces]

    plain = [_messages(i) for i in range(5)]  # q{i} -> answer {i}
    parted = [
        {
            "messages": [
                {"role": "user", "content": text("q", f"{i}")},
                {"role": "assistant", "content": text("answer ", f"{i}")},
            ]
        }
        for i in range(5)
    ]
    a = ChatData(source=_write_jsonl(tmp_path / "plain.jsonl", plain), tokenizer="char", block_size=64)
    b = ChatData(source=_write_jsonl(tmp_path / "parts.jsonl", parted), tokenizer="char", block_size=64)
    a.setup()
    b.setup()
    assert a.train_examples == b.train_examples and a.val_examples == b.val_examples
    image = {"messages": [plain[0]["messages"][0], {"role": "assistant", "content": [{"type": "image_url"}]}]}
    path = _write_jsonl(tmp_path / "image.jsonl", [image] + plain)
    with pytest.raises(LMError, match="image.jsonl:1: message 1: only text content parts"):
        ChatData(source=path, tokenizer="char", block_size=64).setup()


def test_alpaca_fields_must_be_strings_and_a_system_field_is_the_system_message(tmp_path):
    records = [{"instruction": f"say hi {i}", "output": "hi", "system": "be brief"} for i in range(4)]
    data = ChatData(source=_write_jsonl(tmp_path / "a.jsonl", records), tokenizer="char", block_size=64)
    data.setup()
    assert data.tokenizer.decode(data.train_examples[0][0]).startswith("<|bos|><|system|>be brief<|end|>")
    records[2] = {"instruction": 5, "input": ["a", "b"], "output": "hi"}  # was rendered as "5\n\n['a', 'b']"
    path = _write_jsonl(tmp_path / "b.jsonl", records)
    with pytest.raises(LMError, match='b.jsonl:3: "instruction" is not a string .got int.'):
        ChatData(source=path, tokenizer="char", block_size=64).setup()


def test_an_alpaca_question_in_input_alone_trains_without_leading_blank_lines(tmp_path):
    """With an empty instruction, the question in "input" trained as "\n\nquestion": a user turn no one types."""
    records = [{"instruction": "", "input": f"say hi {i}", "output": "hi"} for i in range(4)]
    records[1] = {"instruction": "say hi 1", "input": " ", "output": "hi"}
    data = ChatData(source=_write_jsonl(tmp_path / "a.jsonl", records), tokenizer="char", block_size=64)
    data.setup()
    rendered = sorted(data.tokenizer.decode(ids) for ids, _ in data.train_examples + data.val_examples)
    assert rendered == [f"<|bos|><|user|>say hi {i}<|end|><|assistant|>hi" for i in range(4)]


def test_multi_turn_alpaca_history_comes_before_the_last_exchange(tmp_path):
    """LLaMA-Factory's `history` ([question, answer] pairs, oldest first) was ignored: the conversation trained
    without its earlier turns, and without a word."""
    alpaca = [
        {"instruction": f"and {i}?", "output": "yes", "history": [[f"q{i}", "one"], ["more", "two"]]} for i in range(6)
    ]
    turns = [("user", "q{i}"), ("assistant", "one"), ("user", "more"), ("assistant", "two")]
    turns += [("user", "and {i}?"), ("assistant", "yes")]
    messages = [{"messages": [{"role": r, "content": c.format(i=i)} for r, c in turns]} for i in range(6)]
    built = []
    for name, records in (("alpaca", alpaca), ("messages", messages)):
        data = ChatData(source=_write_jsonl(tmp_path / f"{name}.jsonl", records), tokenizer="char", block_size=64)
        data.setup()
        built.append(data.tokenizer.decode(data.train_examples[0][0]))
    assert built[0] == built[1] and "<|user|>more<|end|><|assistant|>two<|end|>" in built[0]
    alpaca[1]["history"] = [["only a question"]]
    with pytest.raises(LMError, match='alpaca.jsonl:2: "history" must be a list of .question, answer. string pairs'):
        ChatData(source=_write_jsonl(tmp_path / "alpaca.jsonl", alpaca), tokenizer="char", block_size=64).setup()


def test_a_sharegpt_role_that_is_not_a_string_is_a_bad_record(tmp_path):
    """A "from" holding a list or an object is no key of the role table: a TypeError traceback, naming no line."""
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]} for i in range(4)
    ]
    sharegpt[1]["conversations"][0]["from"] = ["human"]
    with pytest.raises(LMError, match=r"s.jsonl:2: turn 0 has unknown role \['human'\]"):
        ChatData(source=_write_jsonl(tmp_path / "s.jsonl", sharegpt), tokenizer="char", block_size=64).setup()


def test_a_sharegpt_system_field_is_the_system_message(tmp_path):
    """LLaMA-Factory's ShareGPT keeps the system prompt in a "system" field beside "conversations": it was dropped,
    and the conversations trained without it, without a word."""
    sharegpt = [
        {
            "conversations": [{"from": "human", "value": f"say hi {i}"}, {"from": "gpt", "value": "hi"}],
            "system": "be brief",
        }
        for i in range(4)
    ]
    data = ChatData(source=_write_jsonl(tmp_path / "s.jsonl", sharegpt), tokenizer="char", block_size=64)
    data.setup()
    assert data.tokenizer.decode(data.train_examples[0][0]).startswith("<|bos|><|system|>be brief<|end|><|user|>")
    sharegpt[2]["conversations"].insert(0, {"from": "system", "value": "be long"})
    with pytest.raises(LMError, match='s.jsonl:3: a "system" field and a system turn'):
        ChatData(source=_write_jsonl(tmp_path / "s.jsonl", sharegpt), tokenizer="char", block_size=64).setup()
    sharegpt[2]["system"] = ["be brief"]
    with pytest.raises(LMError, match='s.jsonl:3: "system" is not a string .got list.'):
        ChatData(source=_write_jsonl(tmp_path / "s.jsonl", sharegpt), tokenizer="char", block_size=64).setup()


def test_two_sharegpt_system_turns_without_a_system_field_are_not_blamed_on_the_field(tmp_path):
    """The check for a "system" field given beside a system turn also fired on a record with no such field: two
    system turns of its own were reported as 'a "system" field and a system turn'."""
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"say hi {i}"}, {"from": "gpt", "value": "hi"}]} for i in range(4)
    ]
    sharegpt[2]["conversations"][:0] = [{"from": "system", "value": "be brief"}, {"from": "system", "value": "be kind"}]
    with pytest.raises(LMError, match="s.jsonl:3: turns do not alternate user/assistant: system where user was") as e:
        ChatData(source=_write_jsonl(tmp_path / "s.jsonl", sharegpt), tokenizer="char", block_size=64).setup()
    assert '"system" field' not in str(e.value)


def test_file_suffixes_are_not_case_sensitive_and_jsonl_in_a_json_file_gets_a_hint(tmp_path):
    upper = _write_jsonl(tmp_path / "D.JSONL", [_messages(i) for i in range(4)])
    data = ChatData(source=upper, tokenizer="char", block_size=32)
    data.setup()
    assert len(data.train_examples) + len(data.val_examples) == 4
    lines = _write_jsonl(tmp_path / "d.json", [_messages(i) for i in range(4)])
    with pytest.raises(LMError, match=r"invalid JSON: Extra data.*one record per line is JSONL: name the file \.jsonl"):
        ChatData(source=lines, tokenizer="char", block_size=32).setup()


def test_tokenizing_errors_name_the_file_line_or_the_task_problem(tmp_path):
    CharTokenizer("abcdefghijklmnopqrstuvwxyz ").save(tmp_path / "tok")
    records = [
        {"messages": [{"role": "user", "content": f"q {w}"}, {"role": "assistant", "content": "ok"}]}
        for w in "abcdefgh"
    ]
    records[6]["messages"][1]["content"] = "HERE"  # line 7: not in the tokenizer's vocabulary
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(LMError, match=rf"{path}:7: character 'H'"):
        ChatData(source=path, tokenizer=str(tmp_path / "tok"), val_fraction=0.25).setup()
    with pytest.raises(LMError, match=r"task:addition train problem 1: character"):
        ChatData(source="task:addition", tokenizer=str(tmp_path / "tok"), task_size=10, task_val_size=5).setup()


def test_truncation_is_counted_and_never_leaves_an_example_without_supervised_tokens(tmp_path):
    long_question = {"messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"}]}
    long_answers = [
        {"messages": [{"role": "user", "content": f"a{i}"}, {"role": "assistant", "content": "z" * 40}]}
        for i in range(4)
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", [long_question] * 3 + long_answers + [_messages(i) for i in range(20)])
    data = ChatData(source=path, tokenizer="char", block_size=16, val_fraction=0.2)
    data.setup()
    assert sum(v for k, v in data.counts.items() if k.startswith("dropped")) == 3
    # Cut but kept (the long answers) are counted apart from the dropped ones, per split, so the setup log shows them.
    assert data.counts.get("truncated_train", 0) + data.counts.get("truncated_val", 0) == 4
    for ids, labels in data.train_examples + data.val_examples:
        assert len(ids) == len(labels) <= 16
        assert any(label != IGNORE_INDEX for label in labels)


def test_batches_have_the_one_shape_and_labels_are_next_tokens():
    data = ChatData(source="task:addition", tokenizer="char", block_size=32, batch_size=8, task_size=100)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 8
    ids, labels = batch["input_ids"], batch["labels"]
    keep = (labels[:, :-1] != IGNORE_INDEX) & (ids[:, 1:] != data.tokenizer.eos_id)  # EOS pads the short rows
    assert keep.any() and torch.equal(labels[:, :-1][keep], ids[:, 1:][keep])  # a label is the next input token
    answer_end = data.tokenizer.token_id(END)
    assert (labels == answer_end).sum(dim=1).tolist() == [1] * 8  # one learned END per single-turn conversation


def test_fewer_training_conversations_per_device_than_a_batch_is_an_error():
    data = ChatData(source="task:addition", tokenizer="char", block_size=32, batch_size=32, task_size=20)
    data.setup()
    with pytest.raises(LMError, match=r"20 training conversations per device .* data.batch_size 32.*task_size"):
        data.train_dataloader()  # drop_last would leave no batch and Trainer.fit would silently do nothing
    data = ChatData(source="task:addition", tokenizer="char", block_size=32, batch_size=32, task_size=40)
    data.setup()
    assert len(data.train_dataloader()) == 1
    data.trainer = SimpleNamespace(global_rank=1, world_size=2)  # the same 40 conversations over two devices
    with pytest.raises(LMError, match=r"20 training conversations per device \(40 over 2 device"):
        data.train_dataloader()


def test_training_batches_keep_the_distributed_sampler_order():
    """The resumable sampler draws what DistributedSampler(shuffle, drop_last) + DataLoader(drop_last) drew, so
    results measured before it are still reproducible."""
    from torch.utils.data import DistributedSampler

    from lm.chat_data import ShuffledBatchSampler

    for world_size in (1, 3):
        for rank in range(world_size):
            sampler = ShuffledBatchSampler(50, batch_size=4, seed=7, rank=rank, world_size=world_size)
            reference = DistributedSampler(range(50), world_size, rank, shuffle=True, seed=7, drop_last=True)
            for epoch in (0, 1):
                sampler.set_epoch(epoch)
                reference.set_epoch(epoch)
                order = list(reference)
                expected = [order[i : i + 4] for i in range(0, len(order) - 3, 4)]
                assert [b.tolist() for b in sampler] == expected


def test_chat_training_resumes_mid_epoch_with_the_batches_it_had_not_trained_on(tmp_path):
    """A checkpoint from the middle of an epoch: the resumed run trains on the rest of that epoch, then the next
    ones, exactly as an uninterrupted run (it restarted the epoch before: batches twice, others never)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.test_data import _RecordBatches

    def fit(max_steps, ckpt_path=None):
        data = ChatData(source="task:addition", tokenizer="char", block_size=32, batch_size=4, task_size=40)
        every_step = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1)
        quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[every_step], **quiet)
        module = _RecordBatches()
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module.seen

    uninterrupted = fit(25)  # an epoch is 10 batches: the run crosses two epoch boundaries
    resumed = fit(25, ckpt_path=tmp_path / "step=4.ckpt")
    assert len(set(uninterrupted[:10])) == 10 and resumed == uninterrupted[4:]


def test_validation_shards_every_example_once_whatever_the_number_of_devices():
    """DistributedSampler pads the ranks' shards by repeating examples, which then count twice in val/loss. Here the
    padding is there (the ranks run as many batches) but carries no supervised token."""
    data = ChatData(
        source="task:addition", tokenizer="char", block_size=32, batch_size=4, task_size=20, task_val_size=11
    )
    data.setup()
    for world_size in (1, 2, 3, 4):
        scored, batches = [], []
        for rank in range(world_size):
            data.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
            loader = data.val_dataloader()
            batches.append(len(loader))
            for batch in loader:
                keep = (batch["labels"] != IGNORE_INDEX).any(1)
                scored += [
                    tuple(row[: int((row != data.tokenizer.eos_id).sum())].tolist()) for row in batch["input_ids"][keep]
                ]
        assert len(set(batches)) == 1  # sharded models need the same number of forward passes on every rank
        assert sorted(scored) == sorted(tuple(ids) for ids, _ in data.val_examples)  # each example once


def test_sft_and_dpo_files_of_the_same_conversations_hold_out_the_same_openings(tmp_path):
    """SFT on one file, then DPO from that model on another (sft_hh.yaml, dpo_hh.yaml): each file's own shuffle put
    104 of the shared HH files' 117 DPO val pairs in SFT's training data. The groups are now ordered by a hash of
    their opening, so the same openings are held out whatever the file, its order or its other records."""
    from lm.preference import PreferenceData

    def chat(i):
        return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]

    conversations = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": chat(i)} for i in range(60)])
    pairs = [{"prompt": chat(i)[:1], "chosen": chat(i)[1:], "rejected": [{"role": "assistant", "content": "no"}]}
             for i in reversed(range(60))]  # fmt: skip
    pairs = _write_jsonl(tmp_path / "dpo.jsonl", pairs)

    def openings(examples, first_user):
        return {first_user(example) for _, *example in examples}

    sft_train, sft_val = ChatData(source=conversations, val_fraction=0.1)._conversations()
    dpo_train, dpo_val = PreferenceData(source=pairs, val_fraction=0.1)._conversations()
    held_out = openings(sft_val, lambda e: e[0][0]["content"])
    assert len(held_out) == 6 and openings(dpo_val, lambda e: e[0][0]["content"]) == held_out
    assert openings(dpo_train, lambda e: e[0][0]["content"]) == openings(sft_train, lambda e: e[0][0]["content"])


def test_split_keeps_conversations_with_the_same_opening_on_one_side(tmp_path):
    """HH-style data: several transcripts branch from one opening; val must not share an opening with train."""

    def branch(opening, i):
        turns = [("user", f"open {opening}"), ("assistant", f"reply {opening}"), ("user", f"more {i}")]
        return {"messages": [{"role": r, "content": c} for r, c in turns + [("assistant", f"branch {i}")]]}

    records = [branch(k, i) for k in range(20) for i in range(3)] + [_messages(i) for i in range(10)]
    path = _write_jsonl(tmp_path / "d.jsonl", records)

    def split(**seeds):
        train, val = ChatData(source=path, val_fraction=0.2, **seeds)._conversations()
        return [w for w, _ in train], [w for w, _ in val], train, val

    train_where, val_where, train, val = split()
    train_openings = {c[0]["content"] for _, c in train}
    assert val and not any(c[0]["content"] in train_openings for _, c in val)
    assert len(train) + len(val) == 70 and len(val) >= 14  # round(0.2 * 70)
    assert split()[:2] == (train_where, val_where)  # deterministic
    assert split(seed=7)[:2] == (train_where, val_where)  # a seed sweep (training order) keeps the validation set
    assert split(split_seed=7)[1] != val_where
    one_opening = _write_jsonl(tmp_path / "one.jsonl", [branch(0, i) for i in range(5)])
    with pytest.raises(LMError, match="all 5 usable conversations open with the same user message"):
        ChatData(source=one_opening)._conversations()


def test_openings_that_differ_only_in_case_spacing_or_unicode_form_stay_on_one_side(tmp_path):
    """An editor or a scrape may store "café" composed (é) or decomposed (e + U+0301), and a full-width "ＯＰＥＮ": the
    same words typed again, which must not fall on both sides of the split."""
    spellings = ["open café {k}", "Open CAFÉ {k}", "OPEN  cafe\u0301 {k}", " open café {k}\n", "ＯＰＥＮ café {k}"]
    records = [
        {"messages": [{"role": "user", "content": form.format(k=k)}, {"role": "assistant", "content": f"r{k}"}]}
        for k in range(15)
        for form in spellings
    ]
    train, val = ChatData(source=_write_jsonl(tmp_path / "d.jsonl", records), val_fraction=0.2)._conversations()
    train_groups = {c[0]["content"].split()[-1] for _, c in train}
    assert len(val) == 15 and not any(c[0]["content"].split()[-1] in train_groups for _, c in val)


def test_a_large_group_never_takes_val_past_what_leaves_train_its_share(tmp_path):
    """With 2 x n_val >= n one group could take val whole: 8 of 10 conversations opening "Hi" at val_fraction 0.4
    gave 2 train / 8 val for some seeds, and two conversations with one opening gave none to train (an error blaming
    truncation instead of the opening)."""

    def conv(user, reply):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}

    path = _write_jsonl(
        tmp_path / "g8.jsonl", [conv("Hi", f"r{i}") for i in range(8)] + [conv("q1", "a"), conv("q2", "b")]
    )
    for split_seed in range(6):
        train, val = ChatData(source=path, val_fraction=0.4, split_seed=split_seed)._conversations()
        assert len(val) <= 6 and len(train) >= 4, split_seed
    same = _write_jsonl(tmp_path / "same2.jsonl", [conv("Hi there", "hello"), conv("hi  there", "hey")])
    with pytest.raises(LMError, match="all 2 usable conversations open with the same user message"):
        ChatData(source=same)._conversations()


def test_one_large_group_of_openings_does_not_take_the_validation_set_over(tmp_path):
    hello = [
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": f"hi {i}"}]}
        for i in range(95)
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", hello + [_messages(i) for i in range(5)])
    for split_seed in range(6):  # the 95 used to land in val for some seeds: 2 train / 98 val
        train, val = ChatData(source=path, val_fraction=0.05, split_seed=split_seed)._conversations()
        assert len(val) == 5 and len(train) == 95
    halves = _write_jsonl(
        tmp_path / "h.jsonl",
        hello[:60]
        + [
            {"messages": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(40)
        ],
    )
    with pytest.warns(UserWarning, match="val holds 40 of 100 conversations"):  # every group is too large
        train, val = ChatData(source=halves, val_fraction=0.05)._conversations()
    assert (len(train), len(val)) == (60, 40)


def test_pad_to_multiple_of_rounds_the_length_up_but_never_past_the_context():
    examples = [([1] * 5, [IGNORE_INDEX] * 5), ([2] * 9, [3] * 9)]
    assert ChatData.collate(examples)["input_ids"].shape == (2, 9)
    batch = ChatData.collate(examples, pad_id=7, multiple=16, max_width=32)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)
    assert (batch["input_ids"][1, 9:] == 7).all() and (batch["labels"][:, 9:] == IGNORE_INDEX).all()
    assert ChatData.collate(examples, multiple=16, max_width=12)["input_ids"].shape == (2, 12)
    data = ChatData(
        source="task:addition", tokenizer="char", block_size=32, batch_size=8, task_size=50, pad_to_multiple_of=16
    )
    data.setup()
    assert next(iter(data.train_dataloader()))["input_ids"].shape[1] % 16 == 0


def test_chat_batches_accumulate_like_one_big_batch():
    """ChatData's padded micro-batches with uneven supervised-token counts: 4 x B == one batch of 4B (the module's
    loss normalisation over the optimizer step)."""
    from tests.test_module import _fit_two_steps

    data = ChatData(source="task:addition", tokenizer="char", block_size=16, task_size=64, task_digits=3)
    data.setup()
    examples = data.train_examples[:32]
    # Make supervision uneven across micro-batches: half the examples learn only their END token.
    examples = [
        (ids, lab if i % 3 else [IGNORE_INDEX] * (len(lab) - 1) + [lab[-1]]) for i, (ids, lab) in enumerate(examples)
    ]
    big = [ChatData.collate(examples[i : i + 16]) for i in (0, 16)]
    small = [ChatData.collate(examples[i : i + 4]) for i in range(0, 32, 4)]
    counts = [int((b["labels"] != IGNORE_INDEX).sum()) for b in small]
    assert len(set(counts)) > 1
    a = _fit_two_steps(big).model.state_dict()
    b = _fit_two_steps(small, accumulate=4).model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_tokenizer_spec_can_be_a_checkpoint(tmp_path, monkeypatch):
    import lm.checkpoint

    path = tmp_path / "model.ckpt"
    torch.save({"lm": {"tokenizer": TOK.to_state()}, "state_dict": {}}, path)
    reads, read = [], lm.checkpoint.read_checkpoint
    monkeypatch.setattr(lm.checkpoint, "read_checkpoint", lambda *a, **kw: reads.append(kw) or read(*a, **kw))
    assert build_tokenizer(str(path)).fingerprint == TOK.fingerprint
    assert reads == [{"mmap": True}]  # the weights and optimizer state stay on disk: only the tokenizer is wanted
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(LMError, match="not an lm checkpoint"):
        build_tokenizer(str(tmp_path / "plain.ckpt"))


def test_every_chat_marker_is_reserved():
    ids = [TOK.token_id(t) for t in CHAT_TOKENS]  # raises LMError for a marker that is not a special token
    assert len(set(ids)) == len(CHAT_TOKENS) and not set(ids) & set(TOK.encode("".join(CHAT_TOKENS)))


def test_hh_messages_file_loads():
    data = ChatData(
        source=str(shared_file("hh_rlhf_helpful_base_test.messages.jsonl")), tokenizer="gpt2", block_size=256
    )
    data.setup()
    assert len(data.train_examples) > 2000
    assert data.counts.get("skipped_bad", 0) == 0


@pytest.mark.slow
def test_pretrain_sft_chat_dpo_and_task_eval_through_the_cli(tmp_path):
    """lm fit (pretrain on task text) -> lm fit (SFT from it) -> lm chat --prompt -> lm fit (DPO from the SFT model)
    -> lm tasks eval of the DPO model, via the CLI."""
    from tests.test_cli import lm

    short = [
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "3",
        "--data.init_args.task_size",
        "200",
        "--data.init_args.task_val_size",
        "20",
        "--trainer.callbacks.init_args.num_problems",
        "10",
    ]
    arch = ["--model.init_args.arch.n_layer", "1", "--model.init_args.arch.n_embd", "32"]
    pre = lm("fit", "--config", REPO / "experiments/pretrain_addition.yaml", *arch, *short, cwd=tmp_path)
    assert pre.returncode == 0, pre.stderr[-3000:]
    base = tmp_path / "runs/pretrain_addition/checkpoints/last.ckpt"

    def fine_tune(experiment, ckpt):  # weights and tokenizer from ckpt, as the README's commands do
        start = ["--model.init_args.init_from", ckpt, "--data.init_args.tokenizer", ckpt]
        return lm("fit", "--config", REPO / "experiments" / experiment, *short, *start, cwd=tmp_path)

    sft = fine_tune("sft_addition.yaml", base)
    assert sft.returncode == 0, sft.stderr[-3000:]
    last = tmp_path / "runs/sft_addition/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["lm"]["model_config"]["n_layer"] == 1  # init_from's architecture
    chat = lm("chat", "--ckpt", last, "--prompt", "12+34", "--max_new_tokens", "8", cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert not any(t in chat.stdout for t in (END, BOS))  # stop tokens end the reply and are never printed
    dpo = fine_tune("dpo_addition.yaml", last)
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    preferred = tmp_path / "runs/dpo_addition/checkpoints/last.ckpt"
    sft_state, dpo_ckpt = torch.load(last, weights_only=True)["state_dict"], torch.load(preferred, weights_only=True)
    assert dpo_ckpt["state_dict"].keys() == sft_state.keys()  # one GPT: the reference is not saved
    assert not torch.equal(dpo_ckpt["state_dict"]["model.lm_head.weight"], sft_state["model.lm_head.weight"])
    assert dpo_ckpt["hyper_parameters"]["beta"] == 0.1 and dpo_ckpt["lm"]["model_config"]["n_layer"] == 1
    evaluated = lm("tasks", "eval", "--ckpt", preferred, "--task", "addition", "--num_problems", "20", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stdout.startswith("eval/addition/exact_match ")


def test_a_val_fraction_that_rounds_to_every_conversation_leaves_one_to_train(tmp_path):
    """val_fraction 0.9 of 3 conversations rounds to 3: train was left empty, and the error blamed the context."""
    path = _write_jsonl(tmp_path / "c.jsonl", [_messages(i) for i in range(3)])
    data = ChatData(source=path, tokenizer="char", block_size=32, batch_size=1, val_fraction=0.9)
    data.setup()
    assert (len(data.train_examples), len(data.val_examples)) == (1, 2)


def test_one_usable_record_is_too_few_to_split(tmp_path):
    from lm.preference import PreferenceData

    one_chat = _write_jsonl(tmp_path / "c.jsonl", [_messages(0)])
    with pytest.raises(LMError, match=r"chat data '.*c.jsonl': fewer than 2 usable conversations, nothing to split"):
        ChatData(source=one_chat)._conversations()
    pair = {"prompt": "q?", "chosen": "yes", "rejected": "no"}
    one_pair = _write_jsonl(tmp_path / "p.jsonl", [pair])
    with pytest.raises(LMError, match=r"preference data '.*p.jsonl': fewer than 2 usable pairs, nothing to split"):
        PreferenceData(source=one_pair)._conversations()


def test_a_pad_multiple_that_cannot_divide_the_context_is_warned_about():
    with pytest.warns(UserWarning, match="pad_to_multiple_of 16 does not divide block_size 250"):
        ChatData(source="task:addition", block_size=250, pad_to_multiple_of=16)


def test_fit_history_keeps_what_dropping_one_exchange_at_a_time_keeps_in_one_pass():
    """Same result as re-rendering after each dropped exchange (its first version), which was quadratic: a
    1,600-message request to lm serve took 10 s."""
    import random
    import time

    from lm.chat import render_prompt

    def one_at_a_time(messages, budget):
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system) :]
        while len(render_prompt(system + turns, TOK)) > budget and len(turns) > 1:
            turns = turns[2:]
        return system + turns

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(0, 6) * 2 + 1
        turns = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": "ab"[: rng.randint(1, 2)] * rng.randint(1, 5)}
            for i in range(n)
        ]
        messages = ([{"role": "system", "content": "sys"}] if rng.random() < 0.5 else []) + turns
        budget = rng.randint(5, 80)
        expected = one_at_a_time(messages, budget)
        if len(render_prompt(expected, TOK)) > budget:
            with pytest.raises(LMError):
                fit_history(messages, TOK, budget)
        else:
            kept, prompt = fit_history(messages, TOK, budget)
            assert kept == expected and prompt == render_prompt(expected, TOK)
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "ab"} for i in range(16001)]
    start = time.perf_counter()
    kept, _ = fit_history(long, TOK, budget=60)
    # 0.3 s on an idle 2-core box; quadratic, 16,001 messages would take ~100 x the 10 s of 1,600: the bound is loose
    # enough for a loaded CI box and still that far from the quadratic time
    assert time.perf_counter() - start < 20.0 and kept[-1] is long[-1]


def test_chat_loaders_leave_the_global_rng_alone():
    """Each new iterator drew its seed from torch's global RNG: a resumed run builds one after RNGState restored that
    RNG, which shifted every dropout mask after the resume (losses differed from step 5 on with dropout 0.1)."""
    data = ChatData(source="task:addition", task_size=64, task_val_size=8, batch_size=4, block_size=32)
    data.setup()
    before = torch.get_rng_state()
    for loader in (data.train_dataloader(), data.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)
