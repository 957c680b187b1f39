"""Evaluation: language modelling (loss, perplexity, bits per byte), HellaSwag-style multiple choice (acc, acc_norm)
and the synthetic chat tasks, from the command line (`lm eval`) or during training (`EvalCallback`).

    lm eval --ckpt runs/x/checkpoints/last.ckpt --task lm --data ../shared/data/tinyshakespeare.txt
    lm eval --ckpt runs/x/checkpoints/last.ckpt --task hellaswag --data ../shared/data/hellaswag_val_every5th.jsonl
    lm eval --ckpt runs/x/checkpoints/last.ckpt --task addition --num_problems 200      # needs lm.tasks

What is scored, exactly:

- `lm` (any source `lm.data.load_documents` reads: path/glob/hub id/builtin:NAME). The token stream is
  `EOS doc_1 EOS doc_2 EOS ... doc_n EOS`, the same packing as training with one EOS in front so that the first token
  of the first document is predicted too (from the "start of a document" state, as `lm generate` starts). Every token
  after that leading EOS is scored exactly once, the EOS after each document included (the model is charged for
  knowing where a document ends, as in `val/loss`). Windows of `block_size` tokens; with `stride` S < block_size
  each window after the first scores only its last S positions, so every token sees at least block_size - S tokens
  of context (S = block_size, the default: non-overlapping windows, like validation). Documents run into each
  other across a window, as in training. `loss` = nats / scored tokens, `ppl` = exp(loss),
  `bpb` = nats / (ln 2 x UTF-8 bytes of the documents' text), an EOS counting zero bytes. bpb is comparable across
  tokenizers; loss and ppl are not.
- `hellaswag` (JSONL rows `{"activity_label", "ctx", "endings": [4], "label"}`), zero-shot, as
  lm-evaluation-harness' `hellaswag` task: query = preprocess(activity_label + ": " + ctx), where ctx is
  ctx_a + " " + ctx_b.capitalize() if the row has them (the hub dataset's rows do), choices =
  preprocess(ending), each scored as the continuation " " + choice of the query (encode query + continuation once,
  the continuation's tokens are those after the query's own encoding). `acc`: argmax of the summed log-likelihood;
  `acc_norm`: argmax of log-likelihood / len(choice) in characters (lm-eval's `completion_len`, which counts
  characters too: a few rows hold "°" or "¾", where bytes would differ). Log-probabilities are a softmax over all
  embedding rows, padding included, as the exported HF model computes them.
- `addition`, `reverse`, `count`: exact match of greedy answers, by `lm.tasks.evaluate_task`.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy

import lm
from lm.callbacks import EMA, ProgressLines, Throughput
from lm.distributed import root_weights_gathered, sum_over_ranks
from lm.errors import ArgumentParser, LMError, cannot_write
from lm.model import GPT
from lm.tasks import DEFAULT_DIGITS, DIGIT_TASKS, EveryNValidations, TaskAccuracy, check_tokenizer_writes_task
from lm.tokenizer import Tokenizer

# --------------------------------------------------------------------------------------------------------------------
# Scoring primitives (shared with the lm-evaluation-harness adapter).


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness' split of (context, continuation) into token ids: trailing spaces of the context move
    to the continuation, the whole text is encoded once and the continuation is what follows the context's tokens.
    An empty context becomes the EOS token (the start-of-document state)."""
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def score_continuations(
    model: GPT, requests: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16
) -> list[tuple[float, bool]]:
    """For each (context_ids, continuation_ids): the summed log-probability of the continuation given the context,
    and whether greedy decoding would have produced it. Contexts are cut from the left to fit block_size (as
    lm-eval's HF model does); a continuation longer than block_size is scored in pieces, an empty one is (0.0, True)
    (nothing to predict; lm-eval's ONNX model says the same, its HF model fails an assert). Batched longest first,
    right-padded (causal attention never sees the padding)."""
    block_size = model.config.block_size
    if any(len(continuation) > block_size for _, continuation in requests):
        # lm-eval's HF model refuses these; we score them in pieces of block_size tokens, each piece with the
        # context (and the earlier pieces) before it, and add the pieces up.
        pieces, owner = [], []
        for i, (context, continuation) in enumerate(requests):
            for a in range(0, len(continuation), block_size):
                pieces.append((context + continuation[:a], continuation[a : a + block_size]))
                owner.append(i)
        totals = [(0.0, True) for _ in requests]
        for i, (logprob, greedy) in zip(owner, score_continuations(model, pieces, batch_size=batch_size), strict=True):
            totals[i] = (totals[i][0] + logprob, totals[i][1] and greedy)
        return totals
    device = next(model.parameters()).device
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    sequences = []
    for i, (context, continuation) in enumerate(requests):
        if not context:
            raise ValueError("score_continuations needs a non-empty context")
        if not continuation:  # an empty choice under lm-eval's --apply_chat_template (its delimiter is then "")
            results[i] = (0.0, True)
        sequences.append((context + continuation)[-(block_size + 1) :][:-1])  # (<= block_size) inputs
    order = sorted((i for i, result in enumerate(results) if result is None), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(sequences[rows[0]])
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
        # The batch's continuations in one tensor, copied to the device with the inputs, and the results read back
        # once per batch: a copy or a read per request made the host wait for the device at each of them (on a GPU,
        # HellaSwag's four endings of every item ran one after another)
        targets = torch.tensor([token for i in rows for token in requests[i][1]], dtype=torch.long).to(device)
        logits = model(ids.to(device))  # (B, T, V)
        totals, greedy, first = [], [], 0
        for r, i in enumerate(rows):
            end, n = len(sequences[i]), len(requests[i][1])
            target = targets[first : first + n]
            first += n
            logprobs = F.log_softmax(logits[r, end - n : end].float(), dim=-1)  # (n, V)
            totals.append(logprobs.gather(-1, target[:, None]).sum())
            greedy.append((logprobs.argmax(-1) == target).all())
        read = torch.stack([torch.stack(totals), torch.stack(greedy).float()]).tolist()  # (2, B): the one read
        for i, total, all_greedy in zip(rows, *read, strict=True):
            results[i] = (total, bool(all_greedy))
    return results  # type: ignore[return-value]


def stream_windows(num_inputs: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) windows over input positions [0, num_inputs) (position i predicts token i + 1):
    the model reads positions [begin, end) and positions [score_from, end) are scored. Every position is scored
    exactly once; after the first window, each scored position has at least block_size - stride positions before
    it in its window."""
    if not 0 < stride <= block_size:
        raise LMError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    windows, scored_until = [], 0
    for begin in range(0, max(num_inputs, 1), stride):
        end = min(begin + block_size, num_inputs)
        if end <= scored_until:
            break
        windows.append((begin, end, scored_until))
        scored_until = end
        if end == num_inputs:
            break
    return windows


@torch.no_grad()
def stream_nats(
    model: GPT, tokens: np.ndarray, windows: Sequence[tuple[int, int, int]], *, batch_size: int = 16
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats, float64) and number of scored tokens over the given windows."""
    device = next(model.parameters()).device
    nats, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, (begin, end, score_from) in enumerate(batch):
            inputs[r, : end - begin] = torch.from_numpy(tokens[begin:end].astype(np.int64))
            scored = slice(score_from - begin, end - begin)
            targets[r, scored] = torch.from_numpy(tokens[score_from + 1 : end + 1].astype(np.int64))
        logits = model(inputs.to(device)).float()  # (B, T, V)
        targets = targets.to(device)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        nats += float(loss.double())
        count += int((targets != -100).sum())
    return nats, count


# --------------------------------------------------------------------------------------------------------------------
# Tasks. Each task prepares its data once (tokenized), scores a shard of its items and turns summed counts into
# metrics, so the callback can split the work over ranks and add the sums with one all-reduce.


@dataclass
class EvalSpec:
    """One evaluation: which task, on which data, how much of it.

    Args:
        task: "lm" (loss/ppl/bpb on a text source), "hellaswag" (multiple choice), or a synthetic chat task
            ("addition", "reverse", "count").
        data: Text source for "lm" (path/glob/hub id/builtin:NAME), HellaSwag-format JSONL for "hellaswag".
        name: Name in the metric keys (`eval/<name>/<metric>`); defaults to the task.
        limit: Evaluate only the first N documents (lm; only they are read, from local files or a hub dataset's plain
            split; a sliced one such as train[90%:] is read whole, then cut) or items (hellaswag).
        text_field: Column holding the text in JSONL/Parquet/hub sources (lm).
        source_config: A hub dataset's configuration (lm), as data.source_config in training (e.g. sample-10BT).
        source_split: A hub dataset's split (lm); a held-out metric wants the split training did not read.
        source_revision: A hub dataset's revision (lm): a commit, tag or branch.
        source_data_dir: A folder of a hub dataset's repository (lm), as data.source_data_dir in training (e.g.
            helpful-base for Anthropic/hh-rlhf).
        stride: Sliding-window stride in tokens for lm; None: block_size (non-overlapping windows).
        num_problems: Problems per synthetic chat task.
        seed: Seed of the synthetic chat problems.
        digits: Operand digits of the synthetic addition task (as the model was trained: data.task_digits).
        batch_size: Sequences per forward pass (lm, hellaswag; None: 16), or problems per generated batch (chat tasks;
            None: 64, as lm tasks and TaskAccuracy generate).
    """

    task: str
    data: str | None = None
    name: str | None = None
    limit: int | None = None
    text_field: str = "text"
    source_config: str | None = None
    source_split: str = "train"
    source_revision: str | None = None
    source_data_dir: str | None = None
    stride: int | None = None
    num_problems: int = 100
    seed: int = 0
    digits: int = DEFAULT_DIGITS
    batch_size: int | None = None


class Task:
    """Base of the evaluation tasks; `build_task` picks the subclass from `TASKS`."""

    primary: str  # the metric reported as the result's "metric"/"value"
    shardable = True  # items can be split over ranks and their sums added
    unread: tuple[str, ...] = ()  # EvalSpec fields this task does not read: refused when set to other than the default
    default_batch_size = 16  # where EvalSpec.batch_size is None

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size or self.default_batch_size

    def __init__(self, spec: EvalSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name or self.spec.task

    def prepare(self, tokenizer: Tokenizer, block_size: int) -> None:
        """Load and tokenize the data (once)."""

    def num_items(self) -> int:
        raise NotImplementedError

    def score(self, model: GPT, tokenizer: Tokenizer, *, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """Summed counts over this rank's share of the items."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Item indices of one rank: rank::world_size."""
    return list(range(rank, n, world_size))


def continuation_passes(requests: Sequence[tuple[list[int], list[int]]], block_size: int, batch_size: int) -> int:
    """How many forward passes `score_continuations` runs for these requests (pieces included; an empty continuation
    runs none)."""
    if any(len(continuation) > block_size for _, continuation in requests):
        rows = sum(math.ceil(len(continuation) / block_size) for _, continuation in requests)
    else:
        rows = sum(1 for _, continuation in requests if continuation)
    return math.ceil(rows / batch_size)


def even_out_passes(model: GPT, mine: int, most: int) -> None:
    """Run throw-away forward passes until this rank has run as many as the busiest: under FSDP every forward pass
    gathers the weights from all ranks, so one rank running fewer would leave the others waiting for good. Every rank
    knows every rank's count (all hold all the items), so this needs no communication."""
    device = next(model.parameters()).device
    for _ in range(most - mine):
        model(torch.zeros(1, 1, dtype=torch.long, device=device))


_HUB_OPTIONS = ("text_field", "source_config", "source_split", "source_revision", "source_data_dir")  # lm's source
_CHAT_OPTIONS = ("num_problems", "seed", "digits")  # the synthetic chat tasks' problems


class LanguageModelling(Task):
    primary = "bpb"
    unread = _CHAT_OPTIONS

    def prepare(self, tokenizer: Tokenizer, block_size: int) -> None:
        from lm.data import load_documents, naming_the_document, refuse_hub_options_of_a_local_source

        spec = self.spec
        if not spec.data:
            raise LMError("task lm needs a text source (--data PATH | glob | hub id | builtin:shakespeare)")
        refuse_hub_options_of_a_local_source(
            spec.data, spec.source_config, spec.source_split, spec.source_revision, spec.source_data_dir
        )
        documents = load_documents(
            spec.data,
            source_config=spec.source_config,
            source_split=spec.source_split,
            source_revision=spec.source_revision,
            source_data_dir=spec.source_data_dir,
            text_field=spec.text_field,
            limit=spec.limit,
        )
        texts = [t for t in documents["text"] if t]
        if not texts:
            raise LMError(f"data source {self.spec.data!r}: no non-empty documents to evaluate")
        ids = [tokenizer.eos_id]
        try:
            encoded = tokenizer.encode_batch(texts, eos=True)
        except LMError as e:  # a char vocabulary without one of the text's characters: say which document
            raise naming_the_document(e, self.spec.data, tokenizer, texts) from None
        for doc in encoded:
            ids.extend(doc)
        self.tokens = np.asarray(ids, dtype=np.int64)
        self.num_bytes = sum(len(t.encode("utf-8")) for t in texts)
        self.num_documents = len(texts)
        stride = block_size if self.spec.stride is None else self.spec.stride
        self.windows = stream_windows(len(self.tokens) - 1, block_size, stride)

    def num_items(self) -> int:
        return self.num_documents

    def score(self, model, tokenizer, *, rank=0, world_size=1):
        windows = [self.windows[i] for i in shard(len(self.windows), rank, world_size)]
        nats, count = stream_nats(model, self.tokens, windows, batch_size=self.batch_size)
        passes = [math.ceil(len(shard(len(self.windows), r, world_size)) / self.batch_size) for r in range(world_size)]
        even_out_passes(model, passes[rank], max(passes))
        return {"nats": nats, "tokens": count}

    def metrics(self, sums):
        loss = sums["nats"] / max(sums["tokens"], 1)
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 700.0)),
            "bpb": sums["nats"] / (math.log(2) * self.num_bytes),
            "tokens": sums["tokens"],
            "bytes": self.num_bytes,
        }


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness' HellaSwag text cleaning (tasks/hellaswag/utils.py): WikiHow bracket artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Items {"query", "choices", "gold"} of a HellaSwag-format JSONL file (activity_label, ctx, endings, label).

    As lm-evaluation-harness builds the context: `ctx_a + " " + ctx_b.capitalize()` where a row has both (the hub
    dataset's rows do), else `ctx` (a slice that kept only it).
    """
    path = Path(path).expanduser()  # EvalCallback's path comes from a YAML, which no shell expanded
    if not path.is_file():
        raise LMError(f"{path}: HellaSwag file not found")
    items = []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is then an error naming it, not a traceback
        for line_no, raw in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                has_parts = isinstance(row.get("ctx_a"), str) and isinstance(row.get("ctx_b"), str)
                ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize() if has_parts else row["ctx"]
                endings, label = row["endings"], row["label"]
                # A string of endings would be scored as one-character choices, a label of 1.7 or true as 1
                if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
                    raise ValueError("endings must be a list of strings")
                if isinstance(label, bool) or not (
                    isinstance(label, int) or (isinstance(label, str) and label.isdigit())
                ):
                    raise ValueError(f"label must be an integer, got {label!r}")
                item = {
                    "query": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                    "choices": [hellaswag_preprocess(e) for e in endings],
                    "gold": int(label),
                    "line": line_no,
                }
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:  # e.g. a list row
                raise LMError(
                    f"{path}:{line_no}: not a HellaSwag row with activity_label, ctx, endings, label ({e})"
                ) from None
            if not 0 <= item["gold"] < len(item["choices"]):
                raise LMError(f"{path}:{line_no}: label {item['gold']} is not an index into endings")
            items.append(item)
    if not items:
        raise LMError(f"{path}: no items")
    return items


class MultipleChoice(Task):
    """HellaSwag-format multiple choice by log-likelihood (acc, acc_norm), as lm-evaluation-harness scores it."""

    primary = "acc_norm"
    unread = ("stride", *_HUB_OPTIONS, *_CHAT_OPTIONS)

    def prepare(self, tokenizer, block_size):
        if not self.spec.data:
            raise LMError("task hellaswag needs a JSONL file (--data ../shared/data/hellaswag_val_every5th.jsonl)")
        self.items = read_hellaswag(self.spec.data, self.spec.limit)
        self.requests = []
        for item in self.items:
            try:
                self.requests.append([encode_pair(tokenizer, item["query"], " " + c) for c in item["choices"]])
            except LMError as e:  # a char vocabulary without one of its characters
                raise LMError(f"{self.spec.data}:{item['line']}: {e}") from None

    def num_items(self):
        return len(self.items)

    def score(self, model, tokenizer, *, rank=0, world_size=1):
        def requests(r: int) -> list[tuple[list[int], list[int]]]:
            return [req for i in shard(len(self.items), r, world_size) for req in self.requests[i]]

        mine = shard(len(self.items), rank, world_size)
        scores = score_continuations(model, requests(rank), batch_size=self.batch_size)
        block_size, batch_size = model.config.block_size, self.batch_size
        passes = [continuation_passes(requests(r), block_size, batch_size) for r in range(world_size)]
        even_out_passes(model, passes[rank], max(passes))
        correct = correct_norm = 0.0
        first = 0  # items may have different numbers of endings
        for i in mine:
            item, n = self.items[i], len(self.items[i]["choices"])
            lls = np.array([s for s, _ in scores[first : first + n]])
            first += n
            lengths = np.array([float(len(c)) for c in item["choices"]])
            correct += float(np.argmax(lls) == item["gold"])
            correct_norm += float(np.argmax(lls / lengths) == item["gold"])
        return {"correct": correct, "correct_norm": correct_norm, "items": float(len(mine))}

    def metrics(self, sums):
        n = max(sums["items"], 1.0)
        return {"acc": sums["correct"] / n, "acc_norm": sums["correct_norm"] / n}


class ChatTask(Task):
    """Synthetic chat tasks (exact match of greedy answers), implemented by `lm.tasks.evaluate_task`."""

    primary = "exact_match"
    shardable = False  # evaluate_task runs the whole set; the callback runs it on rank 0 and broadcasts
    unread = ("data", "limit", "stride", *_HUB_OPTIONS)  # the problems are generated: num_problems of them
    default_batch_size = 64

    def num_items(self):
        return self.spec.num_problems

    def prepare(self, tokenizer, block_size):
        # A tokenizer that cannot write the problems (a char vocabulary without digits) stops a fit before training,
        # as lm.tasks.TaskAccuracy does, not at its first evaluation
        check_tokenizer_writes_task(
            tokenizer, self.spec.task, self.spec.num_problems, seed=self.spec.seed, digits=self.spec.digits
        )

    def score(self, model, tokenizer, *, rank=0, world_size=1):
        try:
            tasks = importlib.import_module("lm.tasks")
        except ModuleNotFoundError as e:
            if e.name != "lm.tasks":
                raise
            raise LMError(f"task {self.spec.task!r} needs lm.tasks (the synthetic chat tasks), not installed") from None
        result = tasks.evaluate_task(
            model,
            tokenizer,
            task=self.spec.task,
            num_problems=self.spec.num_problems,
            seed=self.spec.seed,
            digits=self.spec.digits,
            batch_size=self.batch_size,
        )
        numbers = {k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        numbers.pop("num_problems", None)  # that is num_items, not a metric
        return numbers

    def metrics(self, sums):
        metrics = dict(sums)
        if self.primary not in metrics:  # name the main number whatever lm.tasks calls it
            for alias in ("accuracy", "acc", "exact_match_rate", "score"):
                if alias in metrics:
                    metrics[self.primary] = metrics[alias]
                    break
        return metrics


# The registry of task names. The chat tasks are wired to lm.tasks.evaluate_task through ChatTask.
TASKS: dict[str, type[Task]] = {
    "lm": LanguageModelling,
    "hellaswag": MultipleChoice,
    "addition": ChatTask,
    "reverse": ChatTask,
    "count": ChatTask,
}


def build_task(spec: EvalSpec) -> Task:
    if spec.task not in TASKS:
        raise LMError(f"unknown eval task {spec.task!r}; choose one of {', '.join(TASKS)}")
    for key in ("batch_size", "num_problems", "limit", "stride"):  # counts; limit and stride may be None
        value = getattr(spec, key)
        if value is not None and value < 1:
            raise LMError(f"eval {spec.task}: {key} must be at least 1, got {value}")
    # Refused rather than ignored: a chat task's --limit 50 scored all num_problems and recorded limit 50 beside them
    defaults = {f.name: f.default for f in fields(EvalSpec)}
    chat = issubclass(TASKS[spec.task], ChatTask)
    unread = TASKS[spec.task].unread
    if chat and spec.task not in DIGIT_TASKS:  # reverse, count: words, no operands
        unread = (*unread, "digits")
    given = [key for key in unread if getattr(spec, key) != defaults[key]]
    if given:
        hint = "; it takes num_problems" if chat else ""
        raise LMError(f"eval {spec.task}: {' and '.join(given)} does not apply to this task{hint}")
    return TASKS[spec.task](spec)


def evaluate(model: GPT, tokenizer: Tokenizer, spec: EvalSpec) -> tuple[dict[str, float], int]:
    """Run one task on one process: (metrics, number of items)."""
    task = build_task(spec)
    task.prepare(tokenizer, model.config.block_size)
    was_training = model.training
    model.eval()
    try:
        sums = task.score(model, tokenizer)
    finally:
        model.train(was_training)
    return task.metrics(sums), task.num_items()


# --------------------------------------------------------------------------------------------------------------------
# In-training evaluation.


def refuse_evaluations_sharing_a_name(callbacks: Sequence[L.Callback]) -> None:
    """LMError for two evaluations of a run that log under one name, eval/<name>/..., but are not the same evaluation
    (another file, num_problems, digits): their numbers mixed there (two EvalCallbacks' lm tasks on different files
    logged the mean of both losses; a second task of one EvalCallback replaced the first's). And for two TaskAccuracy
    callbacks of one task, or two EvalCallbacks of the same tasks, whose saved counts share a state key: Lightning
    refused the Trainer with a RuntimeError traceback. The same evaluation in two places (an EvalCallback between
    steps beside a TaskAccuracy at validation) logs the same numbers, and may."""
    logged: dict[str, tuple[EvalSpec, str]] = {}
    keys: set[str] = set()
    for callback in callbacks:
        if isinstance(callback, TaskAccuracy):
            spec = EvalSpec(
                callback.task, num_problems=callback.num_problems, seed=callback.seed, digits=callback.digits
            )
            evaluations = [(callback.task, spec, f"TaskAccuracy(task={callback.task})")]
        elif isinstance(callback, EvalCallback):
            evaluations = [(task.name, task.spec, f"an EvalCallback's task {task.name}") for task in callback.tasks]
        else:
            continue
        if callback.state_key in keys and isinstance(callback, TaskAccuracy):
            raise LMError(
                f"trainer.callbacks: two TaskAccuracy callbacks of task {callback.task}: keep one per task (another "
                f"setting of it goes in an EvalCallback task with a name of its own, as {{task: {callback.task}, "
                f"num_problems: 500, name: {callback.task}_500}})"
            )
        if callback.state_key in keys:
            raise LMError(
                f"trainer.callbacks: two EvalCallbacks of the tasks {', '.join(name for name, _, _ in evaluations)}: "
                "keep one (it can run both every_n_validations and every_n_steps)"
            )
        keys.add(callback.state_key)
        for name, spec, what in evaluations:
            spec = replace(spec, name=None, batch_size=None)  # neither changes the numbers
            other, other_what = logged.setdefault(name, (spec, what))
            differ = [f.name for f in fields(EvalSpec) if getattr(other, f.name) != getattr(spec, f.name)]
            if differ:
                values = ", ".join(f"{key} {getattr(other, key)} vs {getattr(spec, key)}" for key in differ)
                raise LMError(
                    f"trainer.callbacks: {other_what} and {what} both log eval/{name}/... but differ ({values}), so "
                    "their numbers would mix there: give the EvalCallback's a name of its own (name: ... in its task)"
                )


class EvalCallback(EveryNValidations):
    """Runs evaluation tasks during training and logs `eval/<name>/<metric>` (so W&B and every other logger get
    them): at validation through `pl_module.log`, and between steps (`every_n_steps`) straight to the loggers, once,
    at the step it ran.

    Shardable tasks (lm, hellaswag) split their items over the ranks and add the counts with one sum all-reduce;
    the chat tasks run on rank 0 (on every rank under FSDP, where each forward pass is a collective) and rank 0's
    result is broadcast, so each number is logged once, the same on every rank.

        trainer:
          callbacks:
            - class_path: lm.eval.EvalCallback
              init_args:
                tasks:
                  - {task: hellaswag, data: ../shared/data/hellaswag_val_every5th.jsonl, limit: 500}
                  - {task: lm, data: ../shared/data/tinyshakespeare.txt, name: tinyshakespeare}
                every_n_validations: 1

    Args:
        tasks: The evaluations to run (task, data, limit, ... per entry).
        every_n_validations: Run after every Nth validation of a fit, and in lm validate's pass (None: never at
            validation). A checkpoint or early stopping that monitors these metrics needs 1, every_n_steps or not.
        every_n_steps: Also run every N optimizer steps during training (None: only at validation).
    """

    def __init__(
        self, tasks: list[EvalSpec], every_n_validations: int | None = 1, every_n_steps: int | None = None
    ) -> None:
        for name, value in (("every_n_validations", every_n_validations), ("every_n_steps", every_n_steps)):
            if value is not None and value < 1:  # -1 would pass every "step % n == 0" test: an eval every step
                raise LMError(f"EvalCallback: {name} must be at least 1 (or null), got {value}")
        self.specs = [spec if isinstance(spec, EvalSpec) else EvalSpec(**spec) for spec in tasks]
        self.tasks = [build_task(spec) for spec in self.specs]
        refuse_evaluations_sharing_a_name([self])
        self.every_n_validations = every_n_validations
        self.every_n_steps = every_n_steps
        self._validations = 0
        self._last_step = -1
        self._prepared = False

    @property
    def state_key(self) -> str:
        # One per set of tasks, as their metrics eval/<name>/... are: under the class name alone, a second
        # EvalCallback (another cadence for other tasks) made Lightning refuse to build the Trainer. An older lm
        # checkpoint's count, under the class name, is moved to this key by LanguageModel.on_load_checkpoint
        return self._generate_state_key(tasks=[task.name for task in self.tasks])

    def logged_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def setup(self, trainer, pl_module, stage):
        refuse_evaluations_sharing_a_name(trainer.callbacks)  # with another EvalCallback or a TaskAccuracy
        # a monitor of a metric logged at some validations only is refused, every_n_steps or not: a validation before
        # the first evaluation between steps found no value, and a later one the value of older weights
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module):
        # a missing or malformed data file stops the run before training, not at its first evaluation
        self._prepare(pl_module)

    def on_validation_start(self, trainer, pl_module):
        # lm validate: before its pass, not after it (whose loss the error then hid); not if it runs only between steps
        if trainer.state.fn == "validate" and self.every_n_validations:
            self._prepare(pl_module)

    def on_train_start(self, trainer, pl_module):
        # A resumed fit starts at the checkpoint's step, whose evaluation (if one was due) ran before the checkpoint
        # was written: under accumulation the next micro-batches end at that step too, and would run it again
        self._last_step = trainer.global_step

    def _prepare(self, pl_module: L.LightningModule) -> None:
        if not self._prepared:
            for task in self.tasks:
                task.prepare(pl_module.tokenizer, pl_module.model.config.block_size)
            self._prepared = True

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.due_at_this_validation(trainer):
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        # Called once per micro-batch: run once per optimizer step.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            # Between steps the model holds the live weights; under lm.callbacks.EMA the numbers logged under these
            # keys at validation are the average's, so these must be too (one model behind each curve)
            ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
            # Not training time: train/tokens_per_sec and train/mfu leave it out, as they leave out validation, and so
            # do the plain progress lines' speed and time left (a dip to a fraction of the speed at every evaluation)
            throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
            lines = trainer.progress_bar_callback
            with (
                ema.average_in(trainer, pl_module) if ema is not None else contextlib.nullcontext(),
                throughput.paused(pl_module) if throughput is not None else contextlib.nullcontext(),
                lines.paused() if isinstance(lines, ProgressLines) else contextlib.nullcontext(),
            ):
                self.run(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate every task now and log the metrics; returns them (keys `eval/<name>/<metric>`)."""
        model, tokenizer = pl_module.model, pl_module.tokenizer
        self._prepare(pl_module)
        rank, world_size = trainer.global_rank, trainer.world_size
        was_training = model.training
        model.eval()
        logged = {}
        # Under FSDP every forward pass is a collective: each rank runs every task, the chat tasks too (greedy
        # answers, the same on every rank), and rank 0's chat result is the one broadcast and logged.
        fsdp = isinstance(trainer.strategy, FSDPStrategy)
        try:
            with trainer.precision_plugin.forward_context(), root_weights_gathered(trainer):
                for task in self.tasks:
                    if task.shardable:
                        sums = task.score(model, tokenizer, rank=rank, world_size=world_size)
                        if world_size > 1:
                            keys = sorted(sums)
                            packed = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=pl_module.device)
                            sums = dict(zip(keys, sum_over_ranks(packed).tolist(), strict=True))
                    else:  # the chat tasks generate: a new shape each step, so a compiled model runs eager (as
                        # lm.tasks.TaskAccuracy and the text samples do) rather than recompiling to its limit
                        with torch.compiler.set_stance("force_eager"):
                            sums = task.score(model, tokenizer) if rank == 0 or fsdp else None
                        if world_size > 1:
                            sums = trainer.strategy.broadcast(sums, src=0)
                    for metric, value in task.metrics(sums).items():
                        logged[f"eval/{task.name}/{metric}"] = value
        finally:
            model.train(was_training)
        if trainer.training:  # between steps (every_n_steps)
            self._log_between_steps(trainer, logged)
        else:
            for key, value in logged.items():
                # Every rank holds the same reduced value, so no further sync.
                pl_module.log(key, float(value), sync_dist=False)
        return logged

    @staticmethod
    def _log_between_steps(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        """Written to the loggers now, at the step Lightning's own metrics of this step get. (pl_module.log makes a
        step metric here, which Lightning writes only at a logging step, and again at each one after until it
        changes: an evaluation reached the logger late, then as copies, and not at all with logging off.)"""
        metrics = {key: float(value) for key, value in metrics.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})


# --------------------------------------------------------------------------------------------------------------------
# `lm eval`


def result_record(spec: EvalSpec, metrics: dict[str, float], num_items: int, tokenizer: Tokenizer, info: dict) -> dict:
    """The JSON written by `lm eval`."""
    primary = build_task(spec).primary
    return {
        "task": spec.name or spec.task,
        "metric": primary,
        "value": metrics.get(primary),
        "metrics": metrics,
        "num_items": num_items,
        "spec": asdict(spec),
        "checkpoint": {"path": str(info.get("path")), "global_step": info.get("global_step")},
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lm_version": lm.__version__,
    }


def format_table(record: dict) -> str:
    rows = [("task", "metric", "value", "items")]
    for metric, value in record["metrics"].items():
        shown = f"{int(value)}" if float(value).is_integer() else f"{value:.4f}"
        rows.append((record["task"], metric, shown, str(record["num_items"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def default_out(ckpt: str | Path, task_name: str) -> Path:
    """Next to the checkpoint: runs/x/checkpoints/last.ckpt -> runs/x/checkpoints/last.eval-<task>.json."""
    ckpt = Path(ckpt)
    return ckpt.with_name(f"{ckpt.stem}.eval-{task_name}.json")


def check_writable(path: Path) -> None:
    """Raise LMError unless `path` can be written, creating its parent directories; a file made for the check is
    removed. An evaluation can take hours: an unwritable --out must stop it before it starts, not after."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):  # "a": an existing file is left as it is
            pass
    except OSError as e:
        raise cannot_write(path, e) from None
    if not existed:
        path.unlink()


def eval_command(argv: list[str]) -> None:
    """lm eval: evaluate a checkpoint on one task, print a table and write a JSON result."""
    p = ArgumentParser(prog="lm eval", description="Evaluate a checkpoint on one task.")
    p.add_argument("--ckpt", required=True, help="path to a .ckpt written by lm fit")
    p.add_argument("--task", required=True, choices=list(TASKS), help="what to evaluate")
    p.add_argument("--data", help="lm: a text source (path/glob/hub id/builtin:shakespeare); hellaswag: a JSONL file")
    p.add_argument("--name", help="task name in the result (default: the task)")
    p.add_argument("--limit", type=int, help="only the first N documents (lm) / items (hellaswag)")
    p.add_argument("--text_field", default="text", help="lm: the text column of JSONL/Parquet/hub sources")
    p.add_argument("--source_config", help="lm: a hub dataset's configuration (e.g. sample-10BT)")
    p.add_argument("--source_split", default="train", help="lm: a hub dataset's split (default: train)")
    p.add_argument("--source_revision", help="lm: a hub dataset's revision (commit, tag or branch)")
    p.add_argument("--source_data_dir", help="lm: a folder of the hub dataset to read (e.g. helpful-base)")
    p.add_argument("--stride", type=int, help="lm: sliding-window stride in tokens (default: block_size)")
    p.add_argument("--num_problems", type=int, default=100, help="chat tasks: problems to generate")
    p.add_argument("--seed", type=int, default=0, help="chat tasks: seed of the problems")
    p.add_argument(
        "--digits",
        type=int,
        default=DEFAULT_DIGITS,
        help="addition only: operand digits (as trained: data.task_digits)",
    )
    p.add_argument(
        "--batch_size", type=int, help="sequences per forward pass (default 16), or chat problems per batch (64)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--out", help="JSON result file (default: next to the checkpoint, <stem>.eval-<task>.json)")
    args = p.parse_args(argv)

    from lm.checkpoint import load_for_inference

    spec = EvalSpec(
        task=args.task,
        data=args.data,
        name=args.name,
        limit=args.limit,
        text_field=args.text_field,
        source_config=args.source_config,
        source_split=args.source_split,
        source_revision=args.source_revision,
        source_data_dir=args.source_data_dir,
        stride=args.stride,
        num_problems=args.num_problems,
        seed=args.seed,
        digits=args.digits,
        batch_size=args.batch_size,
    )
    build_task(spec)  # unknown task: fail before loading anything
    out = Path(args.out) if args.out else default_out(args.ckpt, spec.name or spec.task)
    check_writable(out)
    model, tokenizer, info, _ = load_for_inference(args.ckpt, args.device)
    metrics, num_items = evaluate(model, tokenizer, spec)
    record = result_record(spec, metrics, num_items, tokenizer, info)
    print(format_table(record))  # first: should the write still fail (a full disk), the results are on the screen
    try:
        out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise cannot_write(out, e) from None
    print(f"wrote {out}")
