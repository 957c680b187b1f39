"""Chat (supervised fine-tuning) data: conversations -> rendered token ids with a loss mask -> padded (B, T) batches.

`ChatData` reads conversations in three formats (detected from the first parsable record, or set with `format`):

    messages   {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}   (OpenAI; a
               content may also be a list of text parts [{"type": "text", "text": ...}], read as their text joined)
    alpaca     {"instruction": ..., "input": ..., "output": ...}   (optional "system", and "history": [[question,
               answer], ...] of earlier exchanges, oldest first, as LLaMA-Factory writes multi-turn data)
    sharegpt   {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]}   (optional "system",
               as LLaMA-Factory writes it, or a first {"from": "system"} turn)

from a local .jsonl/.json/.parquet file (JSONL and JSON may be compressed: .gz, .bz2, .xz), a Hugging Face hub
dataset id (source_config, source_split, source_revision and source_data_dir pick its config, split, revision and
folder, as for PretrainData), or a built-in task (`task:addition`, `task:reverse`, `task:count`; see lm.tasks). OpenAI's
"developer" role is read as "system", and a system message with blank content is left out. An assistant message or
"gpt" turn with `"weight": 0` is shown but not learned. Each conversation is rendered by `lm.chat.render_chat`; labels
are the next token where the mask is 1 and -100 elsewhere, so only the assistant's words (and their END) carry loss.

    lm fit --config experiments/sft_hh.yaml --model.init_args.init_from runs/hh_base/checkpoints/last.ckpt \
        --data.init_args.tokenizer runs/hh_base/checkpoints/last.ckpt

Conversations are tokenized in `setup()` (seconds for thousands of conversations), not cached on disk.
"""

from __future__ import annotations

import codecs
import hashlib
import inspect
import io
import json
import re
import unicodedata
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lm.chat import CHAT_TEMPLATE_VERSION, Message, check_messages, join_text_parts, render_chat, tidy_messages
from lm.data import (
    DECOMPRESSION_ERRORS,
    DEFAULT_BLOCK_SIZE,
    IGNORE_INDEX,
    OPENERS,
    ResumableBatchSampler,
    ResumableDataLoader,
    format_suffix,
    hub_config_and_revision,
    leave_sigterm_to_the_run,
    open_data_file,
    rank_and_world_size,
    trained_batches,
)
from lm.errors import LMError
from lm.tokenizer import Tokenizer, build_tokenizer

FORMATS = ("messages", "alpaca", "sharegpt")
NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

Sourced = tuple[str, list[Message]]  # (where: "file:line" or "task:addition train problem 5", conversation)


class ShuffledBatchSampler(ResumableBatchSampler):
    """Training batches of examples: each epoch a seeded shuffle, dealt out to the ranks, in full batches only; the
    order of `DistributedSampler(shuffle=True, drop_last=True)` batched by a `DataLoader(drop_last=True)`, but
    resumable mid-epoch (a run resumed from a checkpoint goes on with the batches it had not trained on)."""

    def __init__(self, num_examples: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        self.num_examples, self.batch_size = num_examples, batch_size
        self.per_rank = num_examples // world_size
        self.num_batches = self.per_rank // batch_size

    def rank_batches(self, epoch: int) -> np.ndarray:
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return mine[: self.num_batches * self.batch_size].reshape(self.num_batches, self.batch_size)

    def __len__(self) -> int:
        return self.num_batches


class ValidationBatchSampler(DistributedSampler):
    """Validation batches in order, dealt out to the ranks as DistributedSampler does (rank::world_size), with every
    rank given as many examples (sharded models need the same number of forward passes on every rank). The padding
    indices are past the end (n + i): `ExampleBatches` makes them copies that carry no loss, so no example counts
    twice and val/loss does not depend on the number of devices."""

    def __init__(self, num_examples: int, *, batch_size: int, rank: int = 0, world_size: int = 1):
        per_rank = -(-num_examples // world_size)
        mine = np.arange(per_rank * world_size)[rank::world_size]
        self.batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass  # the same examples every epoch


class ExampleBatches(Dataset):
    """`dataset[indices]` -> one collated batch of those examples. An index past the end is a rank's padding: a copy
    of example `index % n` with nothing scored (`unscored`)."""

    def __init__(self, examples: list, collate: Callable, unscored: Callable):
        self.examples, self.collate, self.unscored = examples, collate, unscored

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        n = len(self.examples)
        return self.collate([self.examples[i] if i < n else self.unscored(self.examples[i % n]) for i in indices])


def detect_format(record: Any) -> str | None:
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
    return None


def to_messages(record: Any, fmt: str) -> list[Message]:
    """One record in `fmt` -> a list of {"role", "content"}; raises ValueError (with the reason) on a wrong shape."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise ValueError('no "messages" list')
        return messages
    if fmt == "alpaca":
        if "instruction" not in record or "output" not in record:
            raise ValueError('an alpaca record needs "instruction" and "output"')
        for key in ("instruction", "input", "output", "system"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise ValueError(f'"{key}" is not a string (got {type(record[key]).__name__})')
        # the instruction, then a blank line and the input; an empty one of the two leaves no blank line behind (a
        # question put in "input" alone trained as "\n\nquestion", which no one types at inference)
        question = "\n\n".join(
            part for part in (record["instruction"] or "", record.get("input") or "") if part.strip()
        )
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        # Multi-turn Alpaca (LLaMA-Factory's): the earlier exchanges as [question, answer] pairs, oldest first
        history = record.get("history") or []
        if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(t, str) for t in h) for h in history
        ):
            raise ValueError('"history" must be a list of [question, answer] string pairs')
        earlier = [{"role": role, "content": t} for q, a in history for role, t in (("user", q), ("assistant", a))]
        return [
            *system,
            *earlier,
            {"role": "user", "content": question},
            {"role": "assistant", "content": record["output"]},
        ]
    if fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise ValueError('no "conversations" list')
        # LLaMA-Factory's ShareGPT keeps the system prompt in a "system" field beside the turns, as its Alpaca does
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f'"system" is not a string (got {type(system).__name__})')
        system_from_field = bool(system and system.strip())
        messages = [{"role": "system", "content": system}] if system_from_field else []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise ValueError(f'turn {i} is not a {{"from", "value"}} object')
            if not isinstance(t["from"], str) or t["from"] not in SHAREGPT_ROLES:  # a list is no key: a TypeError
                raise ValueError(f"turn {i} has unknown role {t['from']!r} (expected one of {list(SHAREGPT_ROLES)})")
            messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
            # A turn's "weight", as in the messages format (0: a reply shown, not learned). On a human or system turn
            # a 0 is what lm does anyway: some exports mark every turn not to learn, so it is no error there.
            # SlimOrca and its kin store weights as floats (0.0 on human turns, 1.0 on gpt ones): read as 0 and 1.
            weight = t.get("weight")
            if isinstance(weight, float) and weight in (0.0, 1.0):
                weight = int(weight)
            if weight is not None and not (messages[-1]["role"] != "assistant" and weight == 0):
                messages[-1]["weight"] = weight
        # Both, each saying something: which one was meant is not ours to guess (a blank turn is left out, as ever).
        # Only with the field: two system turns of their own are check_messages' to refuse, as they were
        if system_from_field and len(messages) > 1 and messages[1]["role"] == "system":
            turn = messages[1]["content"]
            if isinstance(turn, str) and turn.strip():
                raise ValueError('a "system" field and a system turn: give the system message once')
        return messages
    raise LMError(f"unknown chat format {fmt!r}: expected auto or one of {FORMATS}")


def read_records(
    source: str,
    *,
    split: str = "train",
    config: str | None = None,
    revision: str | None = None,
    data_dir: str | None = None,
    kind: str = "chat data",
) -> list[tuple[str, Any]]:
    """(where, raw record) pairs: `file:line` for local JSONL, `file:record N` for JSON/Parquet/hub rows. `split`,
    `config`, `revision` and `data_dir` are a hub dataset's (as PretrainData's source_split, source_config,
    source_revision, source_data_dir); `kind` names the data in errors (PreferenceData reads its pairs here too)."""
    path = Path(source).expanduser()
    # The format past a compression's, as PretrainData reads files: "chat.jsonl.gz" is JSONL, read through gzip (it
    # was taken for a hub id, and failed as one)
    suffix = format_suffix(path)
    unsupported = LMError(
        f"unsupported {kind} file {path}: expected .jsonl, .json or .parquet (JSON and JSONL may be compressed, "
        f"{'/'.join(OPENERS)}; Parquet compresses inside)"
    )
    if path.suffix.lower() in OPENERS and suffix not in (".jsonl", ".json"):
        raise unsupported
    if suffix == ".jsonl":
        if not path.is_file():
            raise LMError(f"{kind} file not found: {path}")
        records = []
        # -sig: a byte-order mark (Notepad, Excel) is not text. surrogateescape: a byte that is not UTF-8 (a Latin-1
        # export) comes through as a lone surrogate, which only such a byte can give, and makes its line a bad record
        # instead of a UnicodeDecodeError traceback for the whole file.
        try:
            with io.TextIOWrapper(open_data_file(path), encoding="utf-8-sig", errors="surrogateescape") as f:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    if bad := NOT_UTF8.search(line):
                        byte = ord(bad.group()) - 0xDC00
                        problem = f"not UTF-8 (byte {byte:#04x} at column {bad.start() + 1}); save the file as UTF-8"
                        records.append((f"{path}:{n}", ValueError(problem)))
                        continue
                    try:
                        records.append((f"{path}:{n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        records.append((f"{path}:{n}", ValueError(f"invalid JSON: {e}")))
        except DECOMPRESSION_ERRORS as e:  # not (or not all of) the compressed file its name says
            raise LMError(f"{path}: could not read it: {e}") from None
        return records
    if suffix == ".json":
        if not path.is_file():
            raise LMError(f"{kind} file not found: {path}")
        try:
            with open_data_file(path) as f:
                raw = f.read().removeprefix(codecs.BOM_UTF8)  # a byte-order mark (Notepad, Excel) is not text
        except DECOMPRESSION_ERRORS as e:
            raise LMError(f"{path}: could not read it: {e}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise LMError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
        except json.JSONDecodeError as e:
            hint = " (one record per line is JSONL: name the file .jsonl)" if e.msg == "Extra data" else ""
            raise LMError(f"{path}: invalid JSON: {e}{hint}") from None
        if not isinstance(data, list):
            raise LMError(f"{path}: expected a JSON list of records")
        return [(f"{path}:record {i + 1}", r) for i, r in enumerate(data)]
    if suffix == ".parquet" and not path.is_file():
        raise LMError(f"{kind} file not found: {path}")
    if (
        suffix != ".parquet" and path.is_file()
    ):  # a local .txt or .csv is no hub id ("Couldn't reach 'x.txt' on the Hub")
        raise unsupported
    import datasets

    try:
        if suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, name=config, split=split, revision=revision, data_dir=data_dir)
    except Exception as e:  # datasets raises many types for a missing/unreachable dataset
        hub_options = f" (config={config}, split={split}, revision={revision}, data_dir={data_dir})"
        options = "" if suffix == ".parquet" else hub_options
        raise LMError(f"could not load {source!r}{options}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return [(f"{source}:record {i + 1}", r) for i, r in enumerate(ds)]


class ChatData(L.LightningDataModule):
    """Supervised fine-tuning data: conversations rendered with the chat template; loss on the assistant's turns.

    Batches are `{"input_ids": (B, T) int64, "labels": (B, T) int64}`, padded to the longest example of the batch
    (T <= block_size) with labels -100 on padding and on everything but assistant content and its END token.
    Conversations longer than block_size + 1 tokens are cut at the end and counted (`truncated_train`,
    `truncated_val`); one left with no assistant token is dropped instead and counted apart (`dropped_*_truncated`).

    The train/val split of a file or hub source keeps conversations that open with the same user message (ignoring case,
    spacing and Unicode form: NFKC) on the same side: HH-style data holds several transcripts branching from one opening
    exchange, and splitting them apart would put val replies' histories (and often the replies) in train. The groups,
    ordered by a hash of their opening and split_seed, fill val until it holds at least round(val_fraction * n)
    conversations (at least 1, and at most n - 1), skipping any group that would take it past twice that, so val may be
    a little larger than the fraction. The order is the same in every file, so SFT data and DPO pairs of the same
    conversations hold out the same openings, but for a few at the margin (1 of 117 val pairs on the HH-RLHF files of
    ../shared/data). When every group is larger, val is the smallest group, with a warning. `task:` sources draw their
    val problems from the task's own test split instead.

    In the messages format, an assistant message with `"weight": 0` (OpenAI's fine-tuning format) carries no loss;
    `"weight": 1` is the default. A conversation with nothing left to learn is dropped and counted
    (`dropped_unsupervised`).

    Args:
        source: A local .jsonl/.json/.parquet file (.jsonl and .json may be .gz/.bz2/.xz), a Hugging Face hub dataset
            id, or task:addition / task:reverse / task:count (built-in synthetic problems, see lm.tasks).
        format: Record format: messages (OpenAI), alpaca, sharegpt, or auto (detected from the first record that is
            valid JSON and has one of their shapes).
        source_config: Hub dataset config name (e.g. all for HuggingFaceTB/smoltalk); ignored for local and task
            sources, as PretrainData's.
        source_split: Hub dataset split to read (e.g. train_sft for HuggingFaceH4/ultrachat_200k); the train/val split
            is made afterwards by val_fraction.
        source_revision: Hub dataset revision (a commit sha, tag or branch) to read; None: the hub's default branch.
            Ignored for local and task sources.
        source_data_dir: Folder of a hub dataset's repository to read (datasets' data_dir), for a repository
            organised by folders rather than configs: without it every folder is read. Ignored for local and task
            sources.
        tokenizer: Tokenizer spec; for fine-tuning the pretrained checkpoint's `.ckpt` path (its tokenizer is used).
            Also char, gpt2, bpe:N (trained on the conversations' text) or a tokenizer.json / saved directory.
        block_size: Context length: longest example, in tokens. None: the model's context under the CLI, which sets
            it from the model and refuses any other value given (256 where the data module is built in Python).
        batch_size: Conversations per batch B, per device.
        val_fraction: Share of the conversations held out for validation (whole groups of conversations with the
            same first user message at a time, in an order seeded by split_seed); not for a task: source.
        on_bad_record: A malformed record (unknown role, empty content, turns not alternating, no assistant reply)
            stops the run with its file and line (error), or is logged and counted (skip).
        supervise: Which tokens carry loss: the assistant turns (SFT), or all tokens after BOS (pretraining on the
            same text, e.g. the task transcripts).
        task_size: Training conversations drawn from a task: source (distinct problems of its train split); the task_*
            settings are refused for other sources.
        task_val_size: Validation conversations drawn from the task's test split.
        task_digits: Operand digits of the addition task (another value for task:reverse or task:count is refused).
        seed: Seed of the shuffling of training batches.
        split_seed: Seed of the train/val split and of the task problems; apart from `seed`, so that a sweep over
            `seed` keeps one validation set and its val/loss values compare.
        num_workers: DataLoader worker processes (batches are padded lists: 0 is usually enough).
        pad_to_multiple_of: Pad each batch's length up to a multiple of this (at most block_size); 16 for
            `model.fp8`, whose float8 matmuls need batch x length to be a multiple of 16.
        pin_memory: Pin batches in page-locked memory, so that the copy to the GPU runs beside its work (only used on
            CUDA; Lightning copies with non_blocking=True).
    """

    kind, item = "chat data", "conversation"  # in messages; PreferenceData says "preference data", "pair"
    batch_holds_pairs = False  # PreferenceData's batches are (chosen, rejected) rows, for PreferenceModel only

    def __init__(
        self,
        source: str = "task:addition",
        format: Literal["auto", "messages", "alpaca", "sharegpt"] = "auto",
        source_config: str | None = None,
        source_split: str = "train",
        source_revision: str | None = None,
        source_data_dir: str | None = None,
        tokenizer: str = "char",
        block_size: int | None = None,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        on_bad_record: Literal["error", "skip"] = "error",
        supervise: Literal["assistant", "all"] = "assistant",
        task_size: int = 5000,
        task_val_size: int = 200,
        task_digits: int = 2,
        seed: int = 1337,
        split_seed: int = 1337,
        num_workers: int = 0,
        pad_to_multiple_of: int = 1,
        pin_memory: bool = True,
    ):
        super().__init__()
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if block_size < 2 or batch_size < 1:
            raise LMError(f"data.block_size must be >= 2 and data.batch_size >= 1, got {block_size}, {batch_size}")
        if not 0 < val_fraction < 1:
            raise LMError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        source_config, source_revision, source_data_dir = hub_config_and_revision(
            source, source_config, source_split, source_revision, source_data_dir
        )
        # Refused rather than ignored: a task: source takes its val problems from the task's test split (task_val_size
        # of them), not a val_fraction of its train problems, and a file or hub source has no task problems to size.
        # A value equal to the default is no setting, as for digits.
        task = source.startswith("task:")
        unread = (
            {"val_fraction": val_fraction}
            if task
            else {"task_size": task_size, "task_val_size": task_val_size, "task_digits": task_digits}
        )
        defaults = {name: p.default for name, p in inspect.signature(ChatData.__init__).parameters.items()}
        if given := [f"data.{name}" for name, value in unread.items() if value != defaults[name]]:
            why = (
                "its val problems come from the task's test split (data.task_val_size)"
                if task
                else "not a task: source"
            )
            raise LMError(f"{' and '.join(given)} does not apply to {source!r}: {why}")
        if task:
            from lm.tasks import refuse_digits_of_a_word_task

            refuse_digits_of_a_word_task(source.removeprefix("task:"), task_digits, "data.task_digits")
        self.source, self.format, self.source_split = source, format, source_split
        self.source_config, self.source_revision, self.source_data_dir = source_config, source_revision, source_data_dir
        self.tokenizer_spec, self.block_size, self.batch_size = tokenizer, block_size, batch_size
        self.val_fraction, self.on_bad_record, self.supervise = val_fraction, on_bad_record, supervise
        self.task_size, self.task_val_size, self.task_digits = task_size, task_val_size, task_digits
        self.seed, self.split_seed, self.num_workers, self.pin_memory = seed, split_seed, num_workers, pin_memory
        if num_workers < 0:
            raise LMError(f"data.num_workers must be >= 0, got {num_workers}")
        if pad_to_multiple_of < 1:
            raise LMError(f"data.pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if block_size % pad_to_multiple_of:
            rank_zero_warn(
                f"data.pad_to_multiple_of {pad_to_multiple_of} does not divide block_size {block_size}: a batch whose "
                f"longest conversation comes near the context is {block_size} long, not a multiple of it (float8 "
                "matmuls then refuse it mid-run unless the batch size makes up for it)"
            )
        self.pad_to_multiple_of = pad_to_multiple_of
        self.chat_template_version = CHAT_TEMPLATE_VERSION
        self.tokenizer: Tokenizer | None = None
        self.train_examples: list[tuple[list[int], list[int]]] = []
        self.val_examples: list[tuple[list[int], list[int]]] = []
        self.counts: dict[str, int] = {}

    # ---- reading -------------------------------------------------------------------------------------------------

    def _conversations(self) -> tuple[list[Sourced], list[Sourced]]:
        """Validated (train, val) conversations, each with where it came from (for error messages)."""
        if self.source.startswith("task:"):
            from lm.tasks import make_problems

            task = self.source[len("task:") :]
            kw = dict(seed=self.split_seed, digits=self.task_digits)
            train = make_problems(task, "train", self.task_size, **kw)
            val = make_problems(task, "test", self.task_val_size, **kw)
            return (
                [(f"{self.source} train problem {i + 1}", p.messages()) for i, p in enumerate(train)],
                [(f"{self.source} test problem {i + 1}", p.messages()) for i, p in enumerate(val)],
            )

        def parse(record: Any, fmt: str) -> tuple[list[Message]]:
            messages = tidy_messages(join_text_parts(to_messages(record, fmt)))
            problem = check_messages(messages)
            if problem is not None:
                raise ValueError(problem)
            kept = []
            for i, m in enumerate(messages):
                kept.append({"role": m["role"], "content": m["content"]})
                # OpenAI's fine-tuning format: 0 = show this reply, do not learn it. Through Arrow (parquet, the Hub,
                # Dataset.to_json) the messages without one get "weight": null: absent, as in plain JSONL.
                if m.get("weight") is not None:
                    if m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], float):
                        raise ValueError(f"message {i} ({m['role']}): weight must be 0 or 1, on assistant messages")
                    kept[-1]["weight"] = m["weight"]
            return (kept,)

        why = (
            "cannot tell the chat format (no messages / conversations / instruction+output keys); set "
            f"data.init_args.format to one of {FORMATS}"
        )
        conversations = self._read_valid(detect_format, why, parse)
        if self.supervise == "assistant":
            # Every reply shown, none learned (weight 0): dropped before the split, which would otherwise count them
            # into val and could leave it with nothing to score
            learnable = [c for c in conversations if any(m["role"] == "assistant" and m.get("weight", 1) for m in c[1])]
            if len(learnable) < len(conversations):
                self.counts["dropped_unsupervised"] = len(conversations) - len(learnable)
            conversations = learnable
        return self._split(conversations)

    def _read_valid(self, detect: Callable[[Any], str | None], unknown: str, parse: Callable) -> list[tuple]:
        """(where, *parse(record, fmt)) for each record of a file or hub source. fmt is `format`, or detected from the
        first record that is valid JSON; a record whose parse raises ValueError goes to _bad (error, or skip and
        count), with the reason."""
        records = read_records(
            self.source,
            split=self.source_split,
            config=self.source_config,
            revision=self.source_revision,
            data_dir=self.source_data_dir,
            kind=self.kind,
        )
        if not records:
            raise LMError(f"{self.source!r} holds no records")
        fmt = self.format
        # Invalid JSON or a record of no known shape says nothing about the format: detect from the first record
        # that shows one, and leave the others to _bad below like any other bad record (so on_bad_record: skip
        # applies to them too).
        parsed = [(where, r) for where, r in records if not isinstance(r, Exception)]
        if fmt == "auto" and parsed:
            fmt = next((f for f in (detect(r) for _, r in parsed) if f is not None), None)
            if fmt is None:
                raise LMError(f"{parsed[0][0]}: {unknown}")
        items = []
        for where, record in records:
            try:
                if isinstance(record, Exception):
                    raise record
                items.append((where, *parse(record, fmt)))
            except ValueError as e:
                self._bad(where, str(e))
        return items

    def _split(self, conversations: list[Sourced]) -> tuple[list[Sourced], list[Sourced]]:
        """(train, val) in file order; conversations with the same first user message stay on one side (see the
        class docstring)."""
        if len(conversations) < 2:
            raise LMError(f"{self.kind} {self.source!r}: fewer than 2 usable {self.item}s, nothing to split")
        groups: dict[str, list[int]] = {}  # in file order: each group's conversations in the order of the file
        for i, (_, messages, *_) in enumerate(conversations):  # preference pairs: (where, prompt, chosen, rejected)
            opening = next(m["content"] for m in messages if m["role"] == "user")  # check_messages ensures one
            # the same opening typed again: "Hi there", "hi  there" and "Hi there\n" are one group, and so are a
            # composed and a decomposed "é" or a full-width "Ｈｉ" (NFKC)
            key = " ".join(unicodedata.normalize("NFKC", opening).split()).casefold()
            groups.setdefault(key, []).append(i)
        # Groups in the order of a hash of their opening and split_seed, not a shuffle of this file's groups: every
        # file's val is then the start of one order, so SFT on one HH file and DPO on another (sft_hh.yaml, then
        # dpo_hh.yaml) hold out the same openings, but for a few at the margin. With a shuffle, 104 of DPO's 117 val
        # pairs were in SFT's training data. (surrogatepass: a lone surrogate, a JSON "\ud800", is hashed too)
        seeded = lambda key: f"{self.split_seed}:{key}".encode("utf-8", "surrogatepass")  # noqa: E731
        keys = sorted(groups, key=lambda key: hashlib.sha256(seeded(key)).digest())
        n = len(conversations)
        # at least 1, and at most n - 1: a fraction that rounds to all of them (0.9 of 3) left train empty, and the
        # error then blamed the context ("no train conversation has a supervised token within the context")
        n_val = min(n - 1, max(1, round(self.val_fraction * n)))
        val: set[int] = set()
        # A group may take val a little past n_val, never past twice it, nor past what leaves train n - n_val: one
        # large group (many conversations opening with "Hi") would otherwise put most of the data, or all of it, in val.
        cap = max(n_val, min(2 * n_val, n - n_val))
        for key in keys:
            if len(val) >= n_val:
                break
            if len(val) + len(groups[key]) <= cap:
                val.update(groups[key])
        if not val:  # every group is larger than that: the smallest one that leaves something to train on
            fits = [key for key in keys if len(groups[key]) < n]
            if not fits:
                raise LMError(
                    f"{self.kind} {self.source!r}: all {n} usable {self.item}s open with the same user message, so "
                    f"they cannot be split into train and val without sharing it; add {self.item}s with other openings"
                )
            val.update(groups[min(fits, key=lambda key: len(groups[key]))])
            rank_zero_warn(
                f"{self.kind} {self.source!r}: val holds {len(val)} of {n} {self.item}s (val_fraction "
                f"{self.val_fraction}): {self.item}s with the same opening user message stay on one side, and the "
                "smallest such group is that large"
            )
        return (
            [c for i, c in enumerate(conversations) if i not in val],
            [c for i, c in enumerate(conversations) if i in val],
        )

    def _bad(self, where: str, problem: str) -> None:
        if self.on_bad_record == "error":
            raise LMError(f"{where}: {problem} (set data.init_args.on_bad_record: skip to skip such records)")
        self._count("skipped_bad")
        if self.counts["skipped_bad"] <= 5:  # the first few, so the log says what is wrong without flooding
            rank_zero_warn(f"{self.kind}: skipping {where}: {problem}")

    # ---- tokenizing ----------------------------------------------------------------------------------------------

    def _example(self, conversation: list[Message]) -> tuple[tuple[list[int], list[int]] | None, bool]:
        """((input_ids, labels) of one conversation cut to the context, or None when nothing is left to learn;
        whether it was cut)."""
        ids, mask = render_chat(conversation, self.tokenizer)
        if self.supervise == "all":
            mask = [0] + [1] * (len(ids) - 1)
        cut = len(ids) > self.block_size + 1
        ids, mask = ids[: self.block_size + 1], mask[: self.block_size + 1]
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
        if all(label == IGNORE_INDEX for label in labels):
            return None, cut
        return (ids[:-1], labels), cut

    def _examples(self, items: list[tuple], split: str) -> tuple[list, list[str]]:
        """The `_example` of each (where, *parts) item of a split, bad, dropped and cut ones counted; and the items the
        tokenizer could not encode."""
        examples, unencodable = [], []
        for where, *parts in items:  # parts: (conversation,), or (prompt, chosen, rejected) for PreferenceData
            try:
                example, cut = self._example(*parts)
            except LMError as e:  # e.g. a character outside a char tokenizer's vocabulary
                unencodable.append(f"{where}: {e}")
                self._bad(where, str(e))
                continue
            if example is None:  # cut before its first reply, or every reply has weight 0
                self._count(f"dropped_{split}_{'truncated' if cut else 'unsupervised'}")
                continue
            if cut:  # kept, but the model never sees its end: worth knowing when choosing block_size
                self._count(f"truncated_{split}")
            examples.append(example)
        return examples, unencodable

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def setup(self, stage: str | None = None) -> None:
        """Read, validate, split and tokenize the conversations (on every rank: cheap and deterministic)."""
        if self.tokenizer is not None and self.train_examples:
            return
        self.counts = {}
        train, val = self._conversations()
        # Every message of every item (a conversation, or a pair's prompt and replies); only char/bpe specs read them.
        texts = lambda: (m["content"] for item in train + val for part in item[1:] for m in part)  # noqa: E731
        self.tokenizer = build_tokenizer(self.tokenizer_spec, texts=texts)
        self.train_examples, unencodable = self._examples(train, "train")
        self.val_examples, more = self._examples(val, "val")
        unencodable += more
        if len(unencodable) * 2 > len(train) + len(val):
            # on_bad_record: skip is for the odd broken record; most of them is the wrong tokenizer (a char vocabulary
            # from Shakespeare skipped 1,784 of HH-RLHF's 2,344 conversations), and training on the rest misleads.
            raise LMError(
                f"{self.kind} {self.source!r}: the tokenizer ({self.tokenizer_spec}) cannot encode "
                f"{len(unencodable):,} of the {len(train) + len(val):,} {self.item}s, the first {unencodable[0]}; use "
                "a tokenizer that can spell this data: a byte-level one (gpt2, bpe:N, or a checkpoint trained with one)"
            )
        for split, examples in (("train", self.train_examples), ("val", self.val_examples)):
            if not examples:
                raise LMError(
                    f"{self.kind} {self.source!r}: no {split} {self.item} has a supervised token within the context"
                )
        rank_zero_info(self._summary())

    def _summary(self) -> str:
        supervised = sum(sum(label != IGNORE_INDEX for label in ex[1]) for ex in self.train_examples)
        tokens = sum(len(ex[0]) for ex in self.train_examples)
        return (
            f"lm.chat_data: {len(self.train_examples):,} train / {len(self.val_examples):,} val conversations from "
            f"{self.source}, {tokens:,} train tokens of which {supervised:,} supervised; "
            f"vocab {self.tokenizer.vocab_size:,}; {self.counts or 'nothing skipped or dropped'}"
        )

    # ---- batches -------------------------------------------------------------------------------------------------

    @staticmethod
    def collate(
        examples: list[tuple[list[int], list[int]]], pad_id: int = 0, multiple: int = 1, max_width: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example, rounded up to a multiple of `multiple` (but not past max_width): pad ids
        are never attended by real tokens (causal) and carry no loss."""
        longest = max(len(ids) for ids, _ in examples)
        width = max(longest, min(-(-longest // multiple) * multiple, max_width or longest))
        input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(examples):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "labels": labels}

    @staticmethod
    def unscored(example: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
        """The example with no supervised token: padding that counts for nothing (see ValidationBatchSampler)."""
        ids, labels = example
        return ids, [IGNORE_INDEX] * len(labels)

    def _loader(self, examples: list, *, shuffle: bool) -> DataLoader:
        rank, world_size = rank_and_world_size(self.trainer)
        # Our own samplers (the CLI turns Lightning's DistributedSampler off): they shard by rank; training reshuffles
        # per epoch (Lightning calls set_epoch) and its position travels in checkpoints.
        if shuffle:
            sampler = ShuffledBatchSampler(
                len(examples), batch_size=self.batch_size, seed=self.seed, rank=rank, world_size=world_size
            )
        else:
            sampler = ValidationBatchSampler(
                len(examples), batch_size=self.batch_size, rank=rank, world_size=world_size
            )
        per_device = len(examples) // world_size
        if shuffle and per_device < self.batch_size:  # no full batch: fit would silently not train
            more = "raise data.init_args.task_size" if self.source.startswith("task:") else f"add {self.item}s"
            lower = f"lower data.init_args.batch_size to at most {per_device} or " if per_device else ""
            raise LMError(
                f"{self.kind} {self.source!r}: {per_device} training {self.item}s per device ({len(examples)} over "
                f"{world_size} device(s)) is fewer than data.batch_size {self.batch_size}, so there is no training "
                f"batch; {lower}{more}"
            )
        collate = partial(
            self.collate, pad_id=self.tokenizer.eos_id, multiple=self.pad_to_multiple_of, max_width=self.block_size
        )
        # training's position is saved in checkpoints and restored on resume
        loader = partial(ResumableDataLoader, trained_batches=partial(trained_batches, self)) if shuffle else DataLoader
        return loader(
            ExampleBatches(examples, collate, self.unscored),
            batch_size=None,  # the sampler yields whole batches of indices; the dataset collates them
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=leave_sigterm_to_the_run,
            # Each new iterator draws a seed from this generator instead of torch's global RNG (as PretrainData's):
            # a resume builds a fresh iterator after RNGState restored that RNG, which shifted every dropout mask
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_examples, shuffle=False)
