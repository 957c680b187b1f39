"""Preference tuning: direct preference optimisation (DPO) of a fine-tuned GPT on pairs of replies to one prompt.

Each pair holds a prompt, a `chosen` reply and a `rejected` one. The policy (the GPT being trained, started from an
SFT checkpoint) is pushed to raise the chosen reply's log-likelihood relative to a frozen copy of itself (the
reference) more than the rejected reply's:

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

    lm fit --config experiments/dpo_hh.yaml --model.init_args.init_from SFT.ckpt --data.init_args.tokenizer SFT.ckpt
    lm chat --ckpt runs/dpo_hh/checkpoints/last.ckpt

`PreferenceData` reads pairs in four formats (detected from the first record, or set with `format`):

    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}        (TRL's, our HH file)
    standard        {"prompt": "text", "chosen": "text", "rejected": "text"}                     (one user turn)
    implicit        {"chosen": [messages], "rejected": [messages]}: whole conversations; the prompt is the turns
                    both share, up to the last user turn before they differ
    hh              {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}   (Anthropic/hh-rlhf)
                    or {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "chosen": " reply", "rejected": " reply"}

from a local .jsonl/.json/.parquet file (JSONL and JSON may be .gz/.bz2/.xz) or a hub dataset id, or makes them from
a built-in task (`task:addition`: the right answer is chosen, a near miss (`lm.tasks.wrong_answer`) rejected). A batch
is the one batch shape of every data module, `{"input_ids": (2B, T), "labels": (2B, T)}`: the B chosen sequences, then
the B rejected ones, with labels -100 everywhere but the reply's tokens.

`PreferenceModel` is a `LanguageModel` (same optimizer, schedule, clipping, non-finite guard, self-contained
checkpoints, so `lm chat|eval|export|serve` take its checkpoints as they are) with the DPO loss instead of next-token
prediction. The reference is the `init_from` checkpoint, rebuilt when a run resumes; it is kept out of the
checkpoint and out of DDP/FSDP wrapping (each rank holds a full copy) and runs without gradients, in eval mode.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchmetrics.aggregation import SumMetric

from lm.chat import Message, check_messages, join_text_parts, render_chat, tidy_messages
from lm.chat_data import IGNORE_INDEX, ChatData
from lm.config import GPTConfig
from lm.distributed import sum_over_ranks
from lm.errors import LMError
from lm.model import GPT
from lm.module import LanguageModel, convert_to_fp8, token_cross_entropy

PREFERENCE_FORMATS = ("conversational", "standard", "implicit", "hh")
HH_TURN = re.compile(r"\n\n(Human|Assistant):(?: |$)")  # the end too: some HH replies are empty ("...Assistant:")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}

Example = tuple[list[int], list[int]]  # (input_ids, labels) of one sequence
Pair = tuple[str, list[Message], list[Message], list[Message]]  # (where, prompt, chosen, rejected)


# ---- reading pairs -------------------------------------------------------------------------------------------------


def detect_preference_format(record: Any) -> str | None:
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        return None
    if isinstance(record["chosen"], str):
        if "prompt" in record:  # an HH transcript as the prompt string (Dahoas/full-hh-rlhf's layout) is hh's turns
            return "hh" if isinstance(record["prompt"], str) and HH_TURN.search(record["prompt"]) else "standard"
        return "hh" if HH_TURN.search(record["chosen"]) else None
    if "prompt" in record and not isinstance(record["prompt"], str):
        return "conversational"
    return "implicit"  # whole conversations (a string prompt beside them, as in UltraFeedback, repeats their start)


def parse_hh(transcript: Any) -> list[Message]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages: split at the turn markers, each
    turn stripped."""
    if not isinstance(transcript, str):
        raise ValueError(f"expected a transcript string, got {type(transcript).__name__}")
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        raise ValueError("text before the first '\\n\\nHuman: ' turn")
    turns = zip(parts[1::2], parts[2::2], strict=True)  # re.split with one group: text, (role, text) * n
    return [{"role": HH_ROLES[role], "content": text.strip()} for role, text in turns]


def _message_list(value: Any, key: str) -> list[Message]:
    if isinstance(value, dict):  # a single message
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f'"{key}" is not a non-empty list of messages')
    return value


def to_pair(record: Any, fmt: str) -> tuple[list[Message], list[Message], list[Message]]:
    """One record in `fmt` -> (prompt, chosen continuation, rejected continuation); ValueError on a wrong shape."""
    if fmt not in PREFERENCE_FORMATS:
        raise LMError(f"unknown preference format {fmt!r}: expected auto or one of {PREFERENCE_FORMATS}")
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    needed = ("prompt", "chosen", "rejected") if fmt in ("standard", "conversational") else ("chosen", "rejected")
    missing = [k for k in needed if k not in record]
    if missing:
        raise ValueError(f"a {fmt} preference record needs {', '.join(map(repr, needed))}; missing {missing}")
    if fmt == "standard":
        if not all(isinstance(record[k], str) for k in needed):
            raise ValueError('"prompt", "chosen" and "rejected" must be strings in the standard format')
        prompt = [{"role": "user", "content": record["prompt"]}]
        return (
            prompt,
            [{"role": "assistant", "content": record["chosen"]}],
            [{"role": "assistant", "content": record["rejected"]}],
        )
    # OpenAI text parts ([{"type": "text", "text": ...}]) read as their joined text, as in ChatData; before the
    # implicit format's shared-prefix comparison, so that a prompt written either way is the same prompt
    if fmt == "conversational":
        return tuple(tidy_messages(join_text_parts(_message_list(record[k], k))) for k in needed)
    if fmt == "hh" and isinstance(record.get("prompt"), str) and not HH_TURN.search(str(record["chosen"])):
        # The prompt's transcript ends with the turn the replies fill in ("...\n\nAssistant:"); they are its text
        prompt = parse_hh(record["prompt"])
        if prompt and prompt[-1] == {"role": "assistant", "content": ""}:
            prompt = prompt[:-1]
        if not (prompt and prompt[-1]["role"] == "user"):
            raise ValueError("an hh prompt must end with a Human turn (and an empty '\\n\\nAssistant:')")
        replies = [record[k] for k in ("chosen", "rejected")]
        if not all(isinstance(r, str) for r in replies):
            raise ValueError('"chosen" and "rejected" must be strings beside an hh prompt string')
        return prompt, *([{"role": "assistant", "content": r.strip()}] for r in replies)
    if fmt == "hh":
        chosen, rejected = parse_hh(record["chosen"]), parse_hh(record["rejected"])
    else:
        chosen = tidy_messages(join_text_parts(_message_list(record["chosen"], "chosen")))
        rejected = tidy_messages(join_text_parts(_message_list(record["rejected"], "rejected")))
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and not (isinstance(chosen[shared - 1], dict) and chosen[shared - 1].get("role") == "user"):
        shared -= 1  # the prompt ends with the user turn that both replies answer
    if shared == 0:
        raise ValueError("chosen and rejected share no user turn: no common prompt")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def pair_problem(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> str | None:
    """Why a pair cannot be trained on, or None."""
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or not isinstance(reply[0], dict) or reply[0].get("role") != "assistant":
            return f"the {name} reply does not start with an assistant turn"
        problem = check_messages([*prompt, *reply])
        if problem is not None:
            return f"prompt + {name}: {problem}"
    if chosen == rejected:
        return "chosen and rejected are the same reply: nothing to prefer"
    return None


# ---- the data module -----------------------------------------------------------------------------------------------


class PreferenceData(ChatData):
    """Preference pairs -> `{"input_ids": (2B, T), "labels": (2B, T)}`: B chosen sequences, then their B rejected ones.

    Both sequences of a pair are the rendered prompt followed by one reply; labels are -100 on the prompt and padding,
    so only the reply's tokens (and its END) are scored. Batches are padded to their longest sequence. A pair longer
    than block_size + 1 tokens keeps BOS and the end of its prompt (at least `max_prompt_fraction` of the context, or
    the whole prompt), then cuts its replies at the end; it is counted (`truncated_train`, `truncated_val`). The
    train/val split keeps pairs that open with the same user message on one side, as ChatData does.

    Args:
        source: A local .jsonl/.json/.parquet file (.jsonl and .json may be .gz/.bz2/.xz), a Hugging Face hub dataset
            id, or task:addition / task:reverse / task:count (right answer chosen, a near miss rejected).
        format: Record format: conversational, standard, implicit, hh, or auto (detected from the first record that
            is valid JSON); see the module docstring.
        source_config: Hub dataset config name; ignored for local and task sources, as PretrainData's.
        source_split: Hub dataset split to read (e.g. train_prefs for HuggingFaceH4/ultrafeedback_binarized); the
            train/val split is made afterwards by val_fraction.
        source_revision: Hub dataset revision (a commit sha, tag or branch) to read; None: the hub's default branch.
            Ignored for local and task sources.
        source_data_dir: Folder of a hub dataset's repository to read (datasets' data_dir; e.g. helpful-base for
            Anthropic/hh-rlhf: without it every folder is read). Ignored for local and task sources.
        tokenizer: Tokenizer spec: the fine-tuned checkpoint's `.ckpt` path (its tokenizer is used).
        block_size: Context length: longest sequence, in tokens. None: the model's context under the CLI, which sets
            it from the model and refuses any other value given (256 where the data module is built in Python).
        batch_size: Pairs per batch B, per device (the batch holds 2B sequences).
        val_fraction: Share of the pairs held out for validation; not for a task: source.
        on_bad_record: A malformed pair (bad roles or turns, empty content, identical replies) stops the run with its
            file and line (error), or is logged and counted (skip).
        max_prompt_fraction: Share of the context a too-long pair's prompt keeps, at least (its replies get the rest).
        task_size: Training pairs drawn from a task: source; the task_* settings are refused for other sources.
        task_val_size: Validation pairs drawn from the task's test split.
        task_digits: Operand digits of the addition task (another value for task:reverse or task:count is refused).
        seed: Seed of the shuffling of training batches.
        split_seed: Seed of the train/val split, the task problems and their wrong answers (apart from `seed`).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Pad each batch's length up to a multiple of this (at most block_size).
        pin_memory: Pin batches in page-locked memory for the copy to the GPU (only used on CUDA).
    """

    kind, item = "preference data", "pair"
    batch_holds_pairs = True

    def __init__(
        self,
        source: str = "task:addition",
        format: Literal["auto", "conversational", "standard", "implicit", "hh"] = "auto",
        source_config: str | None = None,
        source_split: str = "train",
        source_revision: str | None = None,
        source_data_dir: str | None = None,
        tokenizer: str = "char",
        block_size: int | None = None,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        on_bad_record: Literal["error", "skip"] = "error",
        max_prompt_fraction: float = 0.5,
        task_size: int = 5000,
        task_val_size: int = 200,
        task_digits: int = 2,
        seed: int = 1337,
        split_seed: int = 1337,
        num_workers: int = 0,
        pad_to_multiple_of: int = 1,
        pin_memory: bool = True,
    ):
        super().__init__(
            source=source,
            source_config=source_config,
            source_split=source_split,
            source_revision=source_revision,
            source_data_dir=source_data_dir,
            tokenizer=tokenizer,
            block_size=block_size,
            batch_size=batch_size,
            val_fraction=val_fraction,
            on_bad_record=on_bad_record,
            task_size=task_size,
            task_val_size=task_val_size,
            task_digits=task_digits,
            seed=seed,
            split_seed=split_seed,
            num_workers=num_workers,
            pad_to_multiple_of=pad_to_multiple_of,
            pin_memory=pin_memory,
        )
        if not 0 < max_prompt_fraction < 1:
            raise LMError(f"data.max_prompt_fraction must be between 0 and 1 (exclusive), got {max_prompt_fraction}")
        self.format, self.max_prompt_fraction = format, max_prompt_fraction
        self.train_examples: list[tuple[Example, Example]] = []
        self.val_examples: list[tuple[Example, Example]] = []

    # ---- reading -------------------------------------------------------------------------------------------------

    def _conversations(self) -> tuple[list[Pair], list[Pair]]:
        """Validated (train, val) pairs, each with where it came from."""
        if self.source.startswith("task:"):
            from lm.tasks import make_problems, wrong_answer

            task = self.source[len("task:") :]
            rng = random.Random(f"{self.source}-rejected-{self.split_seed}")
            kw = dict(seed=self.split_seed, digits=self.task_digits)
            splits = []
            for split, size in (("train", self.task_size), ("test", self.task_val_size)):
                pairs = []
                for i, p in enumerate(make_problems(task, split, size, **kw)):
                    prompt, chosen = p.messages()[:1], p.messages()[1:]
                    rejected = [{"role": "assistant", "content": wrong_answer(p, rng)}]
                    pairs.append((f"{self.source} {split} problem {i + 1}", prompt, chosen, rejected))
                splits.append(pairs)
            return splits[0], splits[1]

        def parse(record: Any, fmt: str) -> tuple[list[Message], list[Message], list[Message]]:
            prompt, chosen, rejected = to_pair(record, fmt)
            problem = pair_problem(prompt, chosen, rejected)
            if problem is not None:
                raise ValueError(problem)
            return tuple(
                [{"role": m["role"], "content": m["content"]} for m in part] for part in (prompt, chosen, rejected)
            )

        why = (
            "not a preference pair (no chosen and rejected keys, or text replies with no prompt and no HH transcript: "
            "lm does not split prompt-less text pairs); preference data needs chosen/rejected replies, in one of the "
            f"formats {PREFERENCE_FORMATS}"
        )
        return self._split(self._read_valid(detect_preference_format, why, parse))

    # ---- tokenizing ----------------------------------------------------------------------------------------------

    def _example(
        self, prompt: list[Message], chosen: list[Message], rejected: list[Message]
    ) -> tuple[tuple[Example, Example] | None, bool]:
        """((chosen, rejected) examples with the same prompt, cut to the context, or None when a reply has no token
        left to score or the cut left both replies the same; whether it was cut)."""
        prompt_ids, _ = render_chat(prompt, self.tokenizer)
        replies = []
        for reply in (chosen, rejected):
            ids, mask = render_chat([*prompt, *reply], self.tokenizer)
            replies.append((ids[len(prompt_ids) :], mask[len(prompt_ids) :]))  # the rendering extends the prompt's
        limit = self.block_size + 1
        longest = max(len(ids) for ids, _ in replies)
        cut = len(prompt_ids) + longest > limit
        if cut:
            keep = max(limit - longest, min(len(prompt_ids), int(limit * self.max_prompt_fraction)), 1)
            if keep < len(prompt_ids):  # BOS, then the prompt's last turns: what the replies answer
                prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep + 1 :]
        examples = []
        for reply_ids, reply_mask in replies:
            ids = (prompt_ids + reply_ids)[:limit]
            mask = ([0] * len(prompt_ids) + reply_mask)[:limit]
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
            if all(label == IGNORE_INDEX for label in labels):
                return None, cut
            examples.append((ids[:-1], labels))
        if examples[0] == examples[1]:  # cut where the replies still agree: a margin of 0, and no gradient, for ever
            return None, cut
        return (examples[0], examples[1]), cut

    def _summary(self) -> str:
        tokens = sum(len(c[0]) + len(r[0]) for c, r in self.train_examples)
        return (
            f"lm.preference: {len(self.train_examples):,} train / {len(self.val_examples):,} val pairs from "
            f"{self.source}, {tokens:,} train tokens; vocab {self.tokenizer.vocab_size:,}; "
            f"{self.counts or 'nothing skipped or dropped'}"
        )

    @staticmethod
    def unscored(pair: tuple[Example, Example]) -> tuple[Example, Example]:
        """The pair with nothing scored: a rank's validation padding, which PreferenceModel gives no weight."""
        return ChatData.unscored(pair[0]), ChatData.unscored(pair[1])

    @staticmethod
    def collate(
        pairs: list[tuple[Example, Example]], pad_id: int = 0, multiple: int = 1, max_width: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The chosen sequences of the batch, then the rejected ones, padded together (ChatData.collate)."""
        return ChatData.collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id, multiple, max_width)


# ---- the loss ------------------------------------------------------------------------------------------------------


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens (fp32, (N,)) and how many there are, for logits (N, T, V)
    and labels (N, T) with -100 where nothing is scored."""
    nll = token_cross_entropy(logits.flatten(0, 1), labels.flatten())
    return -nll.view(labels.shape).sum(1), (labels != IGNORE_INDEX).sum(1)


def preference_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    n_tokens: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards of the chosen and rejected replies (B,), detached.

    logps, ref_logps, n_tokens: (2B,), the B chosen sequences first. The reward of a reply is beta times its
    log-likelihood ratio, policy over reference; with loss_type ipo the ratios are per token. (The IPO paper writes
    them for whole sequences; its authors advised averaging over the tokens, as TRL does, so that beta's target
    margin does not depend on the replies' lengths.)
    """
    log_ratios = logps - ref_logps
    if loss_type == "ipo":
        log_ratios = log_ratios / n_tokens.clamp(min=1)
    chosen, rejected = log_ratios.chunk(2)
    margin = chosen - rejected
    if loss_type == "sigmoid":
        # label_smoothing = the share of pairs assumed mislabelled (conservative DPO): a target of 1 - eps, not 1
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise LMError(f"unknown loss_type {loss_type!r}: expected sigmoid or ipo")
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


REWARD_METRICS = ("chosen", "rejected", "accuracy", "margin")


class Unregistered:
    """Holds a module outside its owner's module tree: not in state_dict (checkpoints stay one GPT), not wrapped by
    DDP/FSDP, not moved or cast by Lightning; a deep copy of the owner (EMA's average) shares it instead of copying."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __deepcopy__(self, memo):
        return self


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair values of REWARD_METRICS, (4, B): the two rewards, whether chosen's is higher (a tie counts as
    wrong, so a policy equal to its reference scores 0), and their difference."""
    return torch.stack([chosen, rejected, (chosen > rejected).float(), chosen - rejected])


class PreferenceModel(LanguageModel):
    """Direct preference optimisation of a fine-tuned GPT against a frozen reference copy of it.

    Logs `train/loss`, `train/rewards/{chosen,rejected,accuracy,margin}` (means over the step's pairs), the same
    under `val/`, and LanguageModel's other training metrics. `train/mfu` counts the reference's forward pass too.
    The other arguments are LanguageModel's (`lm fit --help`); the defaults here are for fine-tuning.

    Args:
        beta: Strength of the pull towards the reference (DPO's beta): higher keeps the policy closer to it.
        loss_type: sigmoid: DPO's loss (Rafailov et al., 2023). ipo: the squared distance of the per-token
            log-ratio margin to 1 / (2 beta) (Azar et al., 2023), which does not push margins to infinity.
        label_smoothing: Share of pairs assumed to be labelled the wrong way round (conservative DPO; sigmoid loss
            only), in [0, 0.5).
        sft_weight: Add this times each chosen reply's per-token cross-entropy, averaged over pairs (as in RPO): keeps
            the chosen replies' likelihood from falling while the margin grows. 0 is plain DPO.
        init_from: The fine-tuned checkpoint to start from; also the reference. Required.
    """

    trains_on_pairs = True

    def __init__(
        self,
        arch: GPTConfig = GPTConfig(),  # noqa: B008 - a dataclass default; jsonargparse copies it
        *,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        lr: float = 1e-5,
        warmup_steps: int = 10,
        weight_decay: float = 0.0,
        init_from: str | None = None,
        **kwargs,
    ):
        if not beta > 0:
            raise LMError(f"model.init_args.beta must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise LMError(f"model.init_args.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type != "sigmoid":
            raise LMError(f"model.init_args.label_smoothing applies to loss_type sigmoid only, not {loss_type}")
        if sft_weight < 0:
            raise LMError(f"model.init_args.sft_weight must be >= 0, got {sft_weight}")
        if not init_from:
            raise LMError(
                "model.init_args.init_from: preference tuning starts from a fine-tuned lm checkpoint (also the "
                "reference model); set it to the SFT run's .ckpt"
            )
        super().__init__(
            arch, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, init_from=init_from, **kwargs
        )
        # Sums over the val pairs, and their count: the means are taken at the end. (MeanMetric's weights would
        # need a NaN check, a host sync per batch: with nan_strategy "disable" torchmetrics 1.9 drops the weights.)
        self.val_rewards = torch.nn.ModuleDict({name: SumMetric(nan_strategy="disable") for name in REWARD_METRICS})
        self.val_pairs = SumMetric(nan_strategy="disable")
        self._reference: Unregistered | None = None  # set in configure_model
        self._reference_placement: tuple | None = None  # (device, dtype) the reference was last moved to
        self._reference_checksum: float | None = None  # sum of |weights|, saved in checkpoints, checked on resume
        self._init_state: dict[str, torch.Tensor] | None = None
        self._rewards: tuple[torch.Tensor, ...] | None = None  # (chosen, rejected, scored) of the last model_step
        self._step_reward_sums: torch.Tensor | None = None  # REWARD_METRICS summed over the step's micro-batches
        self._step_rewards: torch.Tensor | None = None  # the step's sums and its pair count, for _log_train_metrics

    # ---- the reference -------------------------------------------------------------------------------------------

    def _read_init_checkpoint(self) -> dict[str, torch.Tensor]:
        self._init_state = super()._read_init_checkpoint()
        return self._init_state

    def configure_model(self):
        if self.model is not None:
            return
        super().configure_model()
        # From the file's own tensors, not the built reference: under bf16-true that is built in bf16, so a resume
        # under another precision would take the unchanged file for a changed one.
        self._reference_checksum = sum(float(t.double().abs().sum()) for t in self._init_state.values())
        reference = GPT(replace(self.arch, dropout=0.0))
        reference.load_state_dict(self._init_state)
        if self.hparams.fp8:  # as the policy (LanguageModel.configure_model): at step 0 both give the same numbers
            convert_to_fp8(reference, self.trainer.strategy.root_device if self._trainer is not None else self.device)
        if self.hparams.compile:  # as the policy: faster, and at step 0 both give the same numbers (a tie)
            reference.compile()
        self._init_state = None
        self._reference = Unregistered(reference.requires_grad_(False).eval())

    @property
    def reference(self) -> GPT:
        """The frozen starting model the policy is measured against (None before configure_model)."""
        return self._reference.model if self._reference is not None else None

    def _reference_for(self, input_ids: torch.Tensor) -> GPT:
        """The reference on the input's device, in the policy's parameter dtype: under bf16-true Lightning has cast the
        policy's parameters and buffers (RoPE tables) to bf16, and `.to` casts the reference's both alike."""
        placement = (input_ids.device, next(self.model.parameters()).dtype)
        if placement != self._reference_placement:
            self.reference.to(device=placement[0], dtype=placement[1])
            self._reference_placement = placement
        return self.reference

    def on_train_start(self):
        super().on_train_start()
        self._step_reward_sums = None  # as the loss sums: a previous fit may have stopped inside an accumulation window
        self._step_rewards = None

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["lm"]["reference_checksum"] = self._reference_checksum

    def on_load_checkpoint(self, checkpoint):
        """Resuming rebuilds the reference from init_from: refuse a file whose weights changed since the run began
        (an SFT run's last.ckpt written again), which would silently move the target of every step."""
        super().on_load_checkpoint(checkpoint)
        saved = (checkpoint.get("lm") or {}).get("reference_checksum")
        if saved is not None and self._reference is not None and not math.isclose(saved, self._reference_checksum):
            raise LMError(
                f"{self.hparams.init_from}: not the weights this run started from (its reference): the file changed "
                "since; resume with the checkpoint the run began with"
            )

    def train_flops_per_token(self, seq_len: int) -> float:
        """The policy's forward and backward (6N) plus the reference's forward (2N): 4/3 of a plain step."""
        return super().train_flops_per_token(seq_len) * 4 / 3

    # ---- steps ---------------------------------------------------------------------------------------------------

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean preference loss over the batch's pairs, and the number of pairs (the weight of this batch in a step
        and in val/loss)."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        with torch.no_grad():  # first: its logits are freed before the policy's exist
            ref_logps, _ = sequence_logprobs(self._reference_for(input_ids)(input_ids), labels)
        logps, n_tokens = sequence_logprobs(self.model(input_ids), labels)
        hp = self.hparams
        losses, chosen, rejected = preference_loss(
            logps, ref_logps, n_tokens, beta=hp.beta, loss_type=hp.loss_type, label_smoothing=hp.label_smoothing
        )
        if hp.sft_weight:  # per pair, so that a step's loss is a mean over its pairs like the rest
            chosen_logps, chosen_tokens = logps.chunk(2)[0], n_tokens.chunk(2)[0]
            losses = losses - hp.sft_weight * chosen_logps / chosen_tokens.clamp(min=1)
        # Validation pads the ranks' shards with unscored pairs (ValidationBatchSampler): they weigh nothing
        scored = n_tokens.chunk(2)[0] > 0
        self._rewards = (chosen, rejected, scored)
        n_pairs = scored.sum()
        return (losses * scored).sum() / n_pairs.clamp(min=1), n_pairs

    def training_step(self, batch, batch_idx):
        loss_sum = super().training_step(batch, batch_idx)
        chosen, rejected, _ = self._rewards  # training batches are all scored
        sums = reward_metrics(chosen, rejected).sum(1)
        self._step_reward_sums = sums if self._step_reward_sums is None else self._step_reward_sums + sums
        return loss_sum

    def _loss_units_per_batch(self, batch) -> float:
        return float(batch["input_ids"].shape[0] // 2)  # the loss sums over pairs: chosen rows, then rejected rows

    def on_before_optimizer_step(self, optimizer):
        # Kept before LanguageModel's hook clears the step's pair count, and logs on a logging step. A step that stops
        # the run logs too (LanguageModel.on_train_batch_end): with these, not the last logging step's rewards.
        self._step_rewards = torch.cat([self._step_reward_sums, self._step_tokens.detach().float()[None]])
        self._step_reward_sums = None
        super().on_before_optimizer_step(optimizer)

    def _log_train_metrics(self):
        super()._log_train_metrics()
        sums = self._step_rewards
        if self.trainer.world_size > 1:
            # Every rank gets here: on logging steps, and on the step that stops the run, which the ranks agree on
            sums = sum_over_ranks(sums.clone())  # over all ranks' pairs; a copy: a second log of the step sums once
        means = sums[:-1] / sums[-1].clamp(min=1)
        for name, value in zip(REWARD_METRICS, means, strict=True):
            self.log(f"train/rewards/{name}", value)

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        chosen, rejected, scored = self._rewards
        for name, values in zip(REWARD_METRICS, reward_metrics(chosen, rejected) * scored, strict=True):
            self.val_rewards[name].update(values.sum())
        self.val_pairs.update(scored.sum())

    def on_validation_epoch_end(self):
        self.log("val/loss", self._val_loss(), prog_bar=True, sync_dist=True)  # no val/ppl: not a likelihood
        pairs = self.val_pairs.compute().clamp(min=1)  # over all ranks, like the sums
        for name in REWARD_METRICS:
            self.log(f"val/rewards/{name}", self.val_rewards[name].compute() / pairs, sync_dist=True)
            self.val_rewards[name].reset()
        self.val_pairs.reset()
