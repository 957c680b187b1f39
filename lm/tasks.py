"""Built-in synthetic chat tasks: skill you can measure on a tiny CPU model, with no download.

    addition   "47+85"        -> "132"    (two `digits`-digit numbers)
    reverse    "reverse pilot" -> "tolip"  (a pseudo-word of 3-7 letters, spelled backwards)
    count      "count l in hello" -> "2"   (how often a letter occurs in a pseudo-word)

Train and test problems never overlap: a problem belongs to the test split when a hash of what it asks falls in the
first `TEST_PERCENT` buckets, whatever the seed ("47+85" and "85+47" ask the same, so they share a split). The seed
only picks which problems of a split (and in which order).
`ChatData(source="task:addition")` trains on the train split; `TaskAccuracy` (a callback) and `lm tasks eval` score
exact-match greedy answers on the test split:

    lm fit --config experiments/pretrain_addition.yaml
    lm tasks eval --ckpt runs/sft_addition/checkpoints/last.ckpt --task addition --num_problems 500
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lm.distributed import root_weights_gathered
from lm.errors import ArgumentParser, LMError

TEST_PERCENT = 10  # share of each task's problem space held out for testing


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


def _word(rng: random.Random) -> str:
    # Pseudo-words (random letters) rather than a word list: an unlimited problem space, so the test split stays
    # large and a tiny model cannot memorise its way to the answers.
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7)))


def _addition(rng: random.Random, digits: int) -> Problem:
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return Problem(f"{a}+{b}", str(a + b))


def _reverse(rng: random.Random, digits: int) -> Problem:
    word = _word(rng)
    return Problem(f"reverse {word}", word[::-1])


def _count(rng: random.Random, digits: int) -> Problem:
    word = _word(rng)
    # Half the time ask for a letter that is in the word, so the answers are not mostly "0".
    letter = rng.choice(word) if rng.random() < 0.5 else rng.choice(string.ascii_lowercase)
    return Problem(f"count {letter} in {word}", str(word.count(letter)))


TASKS: dict[str, Callable[[random.Random, int], Problem]] = {
    "addition": _addition,
    "reverse": _reverse,
    "count": _count,
}
DEFAULT_DIGITS = 2
DIGIT_TASKS = ("addition",)  # the tasks that read `digits`; reverse and count draw pseudo-words


def refuse_digits_of_a_word_task(task: str, digits: int, option: str) -> None:
    """LMError when `option` sets digits (other than the default) for a task that has none to set: refused rather than
    ignored, as a score or a run would otherwise record digits that shaped none of its problems."""
    if task in TASKS and task not in DIGIT_TASKS and digits != DEFAULT_DIGITS:
        raise LMError(f"{option} does not apply to task {task}: its problems are words; only addition has digits")


def _asks(question: str) -> str:
    """What a question asks, whatever the order of an addition's operands: "47+85" and "85+47" are one problem."""
    operands = question.split("+")
    return "+".join(sorted(operands, key=int)) if len(operands) == 2 and all(map(str.isdigit, operands)) else question


def split_of(problem: Problem) -> str:
    """The split ("test" or "train"), by a hash of what the question asks: a problem always lands in the same split.

    Only the question: two problems that ask the same thing are the same problem, and so are an addition and its
    operands swapped (with the question's text alone, 89% of the 2-digit test problems had their twin in train)."""
    bucket = int.from_bytes(hashlib.sha256(_asks(problem.question).encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A near miss, as a model that almost knows would write it: one digit of a number changed (addition, count), or
    two neighbouring letters of a word swapped (reverse). The rejected replies of `task:` preference pairs."""
    answer = problem.answer
    if answer.isdigit():
        i = rng.randrange(len(answer))
        digits = [d for d in "0123456789" if d != answer[i] and not (i == 0 and d == "0" and len(answer) > 1)]
        return answer[:i] + rng.choice(digits) + answer[i + 1 :]
    swappable = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if not swappable:  # "aaa": no swap changes it
        return answer + rng.choice([c for c in string.ascii_lowercase if c != answer[-1]])
    i = rng.choice(swappable)
    return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]


def make_problems(task: str, split: str, num: int, *, seed: int = 0, digits: int = DEFAULT_DIGITS) -> list[Problem]:
    """`num` distinct problems of one split of a task, drawn by a seeded RNG (same arguments, same list)."""
    if task not in TASKS:
        raise LMError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
    if split not in ("train", "test"):
        raise LMError(f"unknown split {split!r}: expected train or test")
    if digits < 1:
        raise LMError(f"digits must be at least 1, got {digits}")
    if num < 1:
        raise LMError(f"the number of problems must be at least 1, got {num}")
    rng = random.Random(f"{task}-{split}-{seed}")  # a string seed: stable across Python versions and processes
    problems: dict[str, Problem] = {}
    for _ in range(max(1000, 200 * num)):  # bounded: a small problem space cannot loop forever
        problem = TASKS[task](rng, digits)
        if split_of(problem) == split:
            problems.setdefault(problem.question, problem)
            if len(problems) == num:  # checked after the draw: the last allowed draw counts too
                return list(problems.values())
    raise LMError(f"task {task!r} has fewer than {num} distinct {split} problems (digits={digits}); ask for fewer")


def check_tokenizer_writes(tokenizer, task: str, problems: list[Problem]) -> None:
    """LMError when the tokenizer cannot encode these problems of `task` (a char vocabulary learned from other text)."""
    try:
        for problem in problems:
            tokenizer.encode(problem.question + problem.answer)
    except LMError as e:
        raise LMError(
            f"task {task}: the model's {tokenizer.kind} tokenizer cannot write its problems ({e}); train on the task "
            "(experiments/pretrain_addition.yaml does) or use a byte-level tokenizer"
        ) from None


def check_tokenizer_writes_task(tokenizer, task: str, num_problems: int, *, seed: int, digits: int) -> None:
    """check_tokenizer_writes on the test problems an evaluation of `task` draws: before a fit trains or a validation
    runs (TaskAccuracy, lm.eval's chat tasks), not at the first evaluation."""
    check_tokenizer_writes(tokenizer, task, make_problems(task, "test", num_problems, seed=seed, digits=digits))


def evaluate_task(
    model,
    tokenizer,
    task: str,
    num_problems: int = 200,
    seed: int = 0,
    *,
    digits: int = DEFAULT_DIGITS,
    batch_size: int = 64,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on test problems: {"exact_match": fraction, "num_problems": n}."""
    from lm.chat import render_prompt, reply_stop_ids
    from lm.generate import generate_texts

    problems = make_problems(task, "test", num_problems, seed=seed, digits=digits)
    check_tokenizer_writes(tokenizer, task, problems)  # before any generation
    stop_ids = reply_stop_ids(tokenizer)  # the answer is the reply `lm chat` would show
    max_new = max(len(tokenizer.encode(p.answer)) for p in problems) + 4  # enough to be wrong, but not much more
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompts = [render_prompt([{"role": "user", "content": p.question}], tokenizer) for p in chunk]
            answers = generate_texts(
                model, tokenizer, prompts, max_new_tokens=max_new, temperature=0, stop_ids=stop_ids, skip_special=True
            )
            correct += sum(a.strip() == p.answer for a, p in zip(answers, chunk, strict=True))
    finally:  # an error (out of memory, a stop) inside a training run must not leave it training in eval mode
        model.train(was_training)
    return {"exact_match": correct / len(problems), "num_problems": float(len(problems))}


class EveryNValidations(L.Callback):
    """Base of the evaluations that run at the end of a validation (TaskAccuracy here, lm.eval.EvalCallback): the
    one rule of when they run, so that one `every_n_validations` means the same in both.

    In a fit, after the Nth, 2Nth, 3Nth, ... validation (sanity checks aside), so that a run of k x N validations
    ends on an evaluation of its final weights; the count is saved in checkpoints, and a resumed run keeps the
    rhythm. In lm validate, its one pass, whatever the count (not counted: validate saves no checkpoint)."""

    every_n_validations: int | None  # None: never at validation
    _validations: int  # validations of fits so far, this run's and those of the checkpoint it resumed

    def logged_names(self) -> list[str]:
        """The names its metrics are logged under, eval/<name>/..."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        return {"validations": self._validations}  # a resumed run keeps every_n_validations' rhythm

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._validations = int(state_dict.get("validations", 0))

    def due_at_this_validation(self, trainer: L.Trainer) -> bool:
        """Whether to evaluate at the end of the validation that is ending (counting it, in a fit)."""
        if trainer.sanity_checking or not self.every_n_validations:
            return False
        if trainer.state.fn == "validate":
            # lm validate's one pass is the evaluation asked for: counted, it ran or not by the parity of the count
            # that the checkpoint restored (every_n_validations 2: a checkpoint after 1 validation ran it, after 2 not)
            return True
        self._validations += 1
        return self._validations % self.every_n_validations == 0

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            self._refuse_a_monitor_missing_at_some_validations(trainer.callbacks)

    def _refuse_a_monitor_missing_at_some_validations(self, callbacks: Sequence[L.Callback]) -> None:
        """LMError for a checkpoint or early stopping that monitors one of these metrics while they are not logged at
        every validation. Lightning keeps a fit's last logged value among the metrics it monitors: at a validation
        without a new one, the checkpoint ranked (and named) its weights by the score of older ones, and early
        stopping counted the stale score as no improvement; before the first value (a fresh run's first validation, a
        resumed run's) it stopped the run, after training up to it ("could not find the monitored key ... Did you call
        log(...)?"). Evaluations between steps (EvalCallback's every_n_steps) do not make up for it: they leave a value
        there only after the first of them, and of the weights of their step. Fine where another evaluation of that
        name (the same one, see lm.eval.refuse_evaluations_sharing_a_name) logs it at every validation."""
        if self.every_n_validations == 1:
            return
        at_every_validation = {
            name
            for c in callbacks
            if isinstance(c, EveryNValidations) and c.every_n_validations == 1
            for name in c.logged_names()
        }
        for callback in callbacks:
            monitor = (
                getattr(callback, "monitor", None) if isinstance(callback, ModelCheckpoint | EarlyStopping) else None
            )
            name = next((n for n in self.logged_names() if monitor and monitor.startswith(f"eval/{n}/")), None)
            if name is not None and name not in at_every_validation:
                cadence = (
                    f"one validation in {self.every_n_validations}" if self.every_n_validations else "no validation"
                )
                raise LMError(
                    f"trainer.callbacks: {type(callback).__name__} monitors {monitor}, which the {type(self).__name__} "
                    f"logs at {cadence}: give it every_n_validations: 1, or monitor another metric (val/loss)"
                )


class TaskAccuracy(EveryNValidations):
    """Logs `eval/<task>/exact_match`: greedy answers to held-out problems of a built-in task, at validation end.

    Every rank computes the same (deterministic) number, so logging needs no synchronisation.

    Args:
        task: Built-in task to score: addition, reverse or count.
        num_problems: Test problems per evaluation.
        every_n_validations: Evaluate after every Nth validation of a fit (the Nth, 2Nth, ..., as EvalCallback), and
            in lm validate's pass (generation is slower than a validation batch). A checkpoint or early stopping that
            monitors eval/<task>/exact_match needs 1.
        digits: Operand digits of the addition task (another value for reverse or count is refused).
        seed: Seed choosing the test problems (the same ones at every evaluation).
    """

    def __init__(
        self,
        task: str = "addition",
        num_problems: int = 200,
        every_n_validations: int = 1,
        digits: int = DEFAULT_DIGITS,
        seed: int = 0,
    ):
        if task not in TASKS:
            raise LMError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
        for name, value in (("num_problems", num_problems), ("every_n_validations", every_n_validations)):
            if value < 1:  # checked here, not at the first validation after training has run
                raise LMError(f"TaskAccuracy: {name} must be at least 1, got {value}")
        if digits < 1:
            raise LMError(f"TaskAccuracy: digits must be at least 1, got {digits}")
        refuse_digits_of_a_word_task(task, digits, "TaskAccuracy: digits")
        self.task, self.num_problems, self.every_n_validations = task, num_problems, every_n_validations
        self.digits, self.seed = digits, seed
        self._validations = 0

    @property
    def state_key(self) -> str:
        # One per task, as its metric eval/<task>/exact_match is: under the class name alone, a second TaskAccuracy
        # (addition and count) made Lightning refuse to build the Trainer, since their saved counts would collide. An
        # older lm checkpoint's count, under the class name, is moved to this key by LanguageModel.on_load_checkpoint
        return self._generate_state_key(task=self.task)

    def logged_names(self) -> list[str]:
        return [self.task]

    def on_fit_start(self, trainer, pl_module):
        # A tokenizer that cannot write the problems (a char vocabulary from Shakespeare has no digits) stops the run
        # before training, not at its first validation, val_check_interval steps later
        self._check_tokenizer(pl_module)

    def on_validation_start(self, trainer, pl_module):
        # lm validate: before its pass, not after it (whose loss the error then hid)
        if trainer.state.fn == "validate":
            self._check_tokenizer(pl_module)

    def _check_tokenizer(self, pl_module) -> None:
        if pl_module.tokenizer is not None:
            check_tokenizer_writes_task(
                pl_module.tokenizer, self.task, self.num_problems, seed=self.seed, digits=self.digits
            )

    def on_validation_epoch_end(self, trainer, pl_module):
        if pl_module.tokenizer is None or not self.due_at_this_validation(trainer):
            return
        # Every rank, as each forward is a collective under FSDP (root_weights_gathered); in the run's precision, as
        # validation and EvalCallback: under FSDP with bf16-mixed the gathered root's fp32 output met bf16 Blocks.
        with (
            torch.compiler.set_stance("force_eager"),  # generation: a new shape each step
            trainer.precision_plugin.forward_context(),
            root_weights_gathered(trainer),
        ):
            result = evaluate_task(
                pl_module.model, pl_module.tokenizer, self.task, self.num_problems, self.seed, digits=self.digits
            )
        pl_module.log(f"eval/{self.task}/exact_match", result["exact_match"], prog_bar=True, sync_dist=False)


def tasks_command(argv: list[str]) -> None:
    """lm tasks eval: exact-match accuracy of a checkpoint's greedy answers on a built-in task's test problems."""
    p = ArgumentParser(prog="lm tasks", description="Built-in synthetic chat tasks.")
    sub = p.add_subparsers(dest="action", required=True)
    e = sub.add_parser("eval", help="score greedy answers on held-out problems")
    e.add_argument("--ckpt", required=True, help="path to a .ckpt written by lm fit")
    e.add_argument("--task", required=True, choices=sorted(TASKS))
    e.add_argument("--num_problems", type=int, default=200)
    e.add_argument("--digits", type=int, default=DEFAULT_DIGITS, help="addition only: operand digits")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    args = p.parse_args(argv)
    refuse_digits_of_a_word_task(args.task, args.digits, "lm tasks eval: --digits")  # before loading the checkpoint

    from lm.checkpoint import load_for_inference

    model, tokenizer, _, _ = load_for_inference(args.ckpt, args.device)
    result = evaluate_task(model, tokenizer, args.task, args.num_problems, args.seed, digits=args.digits)
    print(f"eval/{args.task}/exact_match {result['exact_match']:.4f} ({int(result['num_problems'])} problems)")
