"""Built-in synthetic tasks: correct answers, seeded draws, train/test splits that never overlap, evaluation."""

import string

import pytest

from lm.errors import LMError
from lm.tasks import TASKS, Problem, TaskAccuracy, evaluate_task, make_problems, split_of
from lm.tokenizer import ASSISTANT, CharTokenizer
from tests.test_chat_replies import scripted_model


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_and_test_never_overlap_whatever_the_seeds(task):
    train = {p.question for seed in (0, 1) for p in make_problems(task, "train", 2000, seed=seed)}
    test = {p.question for seed in (0, 7) for p in make_problems(task, "test", 200, seed=seed)}
    assert train and test and train.isdisjoint(test)
    assert {split_of(p) for p in make_problems(task, "test", 50)} == {"test"}


def test_an_addition_and_its_operands_swapped_share_a_split():
    """ "47+85" in test and "85+47" in train would test a memorised answer (89% of 2-digit test problems had their
    twin in train when the split hashed the text alone)."""
    problems = [Problem(f"{a}+{b}", str(a + b)) for a in range(10, 100) for b in range(a + 1, 100)]
    assert all(
        split_of(p) == split_of(Problem(f"{b}+{a}", p.answer)) for p in problems for a, b in [p.question.split("+")]
    )
    assert 0.05 < sum(split_of(p) == "test" for p in problems) / len(problems) < 0.15
    train = {p.question for p in make_problems("addition", "train", 6000)}
    test = make_problems("addition", "test", 500)
    assert not any("+".join(reversed(p.question.split("+"))) in train for p in test)


def test_an_answer_after_a_foreign_special_token_is_scored_as_lm_chat_shows_it():
    """An HF tokenizer's own special (<pad> here) is not a stop id: chat leaves it out of the text, and so does the
    score (it used to count "<pad>1" as wrong)."""
    import string

    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as Backend

    from lm.tokenizer import ASSISTANT, HFTokenizer
    from tests.test_chat_replies import scripted_model

    backend = Backend(
        models.BPE(vocab={c: i for i, c in enumerate(string.ascii_lowercase + string.digits + " ")}, merges=[])
    )
    backend.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])
    tok = HFTokenizer(backend)
    problems = make_problems("count", "test", 50, seed=0)
    pad = backend.token_to_id("<pad>")
    model = scripted_model(tok, {ASSISTANT: pad, pad: "1"})
    assert (
        evaluate_task(model, tok, "count", num_problems=50)["exact_match"]
        == sum(p.answer == "1" for p in problems) / 50
    )


def test_task_accuracy_checks_its_arguments_when_built():
    for kwargs, message in [
        ({"every_n_validations": 0}, "every_n_validations must be at least 1, got 0"),
        ({"num_problems": 0}, "num_problems must be at least 1, got 0"),
        ({"digits": 0}, "digits must be at least 1, got 0"),
    ]:
        with pytest.raises(LMError, match=message):
            TaskAccuracy(**kwargs)


@pytest.mark.parametrize("task", ["reverse", "count"])
def test_digits_is_refused_for_a_task_of_words_wherever_it_is_given(task, tmp_path, capsys):
    """Their problems have no operands: digits was taken and ignored, by lm tasks eval, TaskAccuracy and chat data."""
    from lm.__main__ import main
    from lm.chat_data import ChatData
    from lm.preference import PreferenceData

    with pytest.raises(SystemExit) as exit_info:  # no checkpoint there: refused before it is read
        main(["tasks", "eval", "--ckpt", str(tmp_path / "none.ckpt"), "--task", task, "--digits", "3"])
    assert exit_info.value.code == 2
    assert f"lm tasks eval: --digits does not apply to task {task}" in capsys.readouterr().err
    with pytest.raises(LMError, match=f"TaskAccuracy: digits does not apply to task {task}"):
        TaskAccuracy(task=task, digits=3)
    for data in (ChatData, PreferenceData):
        with pytest.raises(LMError, match=f"data.task_digits does not apply to task {task}"):
            data(source=f"task:{task}", task_digits=3)
        assert data(source=f"task:{task}").task_digits == 2  # the default is no setting
        assert data(source="task:addition", task_digits=3).task_digits == 3
    assert TaskAccuracy(task=task).digits == 2 and TaskAccuracy(task="addition", digits=3).digits == 3


def test_a_setting_for_another_kind_of_source_is_refused(tmp_path):
    """A task: source takes task_val_size test problems, whatever val_fraction says, and a file reads no task_*
    setting: both were accepted and ignored (val_fraction 0.5 gave 200 val problems, task_size 10 the whole file)."""
    from lm.chat_data import ChatData
    from lm.preference import PreferenceData

    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    for data in (ChatData, PreferenceData):
        with pytest.raises(LMError, match="data.val_fraction does not apply to 'task:addition': its val problems"):
            data(source="task:addition", val_fraction=0.5)
        with pytest.raises(LMError, match="data.task_size and data.task_digits does not apply to .*: not a task"):
            data(source=str(path), task_size=10, task_digits=3)
        with pytest.raises(LMError, match="data.task_val_size does not apply"):
            data(source=str(path), task_val_size=3)
        data(source="task:addition", val_fraction=0.05, task_size=10)  # the default is no setting
        data(source=str(path), task_size=5000, val_fraction=0.5)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_problems_are_seeded_and_distinct(task):
    a = make_problems(task, "train", 300, seed=3)
    assert a == make_problems(task, "train", 300, seed=3)
    assert a != make_problems(task, "train", 300, seed=4)
    assert len({p.question for p in a}) == 300


def test_answers_are_right():
    for p in make_problems("addition", "train", 100, digits=3):
        a, b = map(int, p.question.split("+"))
        assert 100 <= a <= 999 and 100 <= b <= 999 and int(p.answer) == a + b
    for p in make_problems("reverse", "test", 50):
        assert p.answer == p.question.removeprefix("reverse ")[::-1]
    for p in make_problems("count", "train", 50):
        _, letter, _, word = p.question.split()
        assert int(p.answer) == word.count(letter)


def test_count_asks_for_a_letter_of_the_word_half_the_time():
    """A random letter alone is missing from a word of 3-7 letters ~80% of the time: most answers would be "0", and
    a model answering "0" to everything would score ~0.8. Half the questions take a letter of the word: ~40% zeros."""
    answers = [p.answer for p in make_problems("count", "train", 400)]
    assert 0.25 < answers.count("0") / len(answers) < 0.6


def test_asking_for_more_problems_than_exist_is_a_user_error():
    with pytest.raises(LMError, match="fewer than"):
        make_problems("addition", "test", 50, digits=1)  # 100 one-digit pairs, ~10 held out
    with pytest.raises(LMError, match="unknown task"):
        make_problems("division", "train", 5)
    with pytest.raises(LMError, match="at least 1, got 0"):
        make_problems("addition", "test", 0)


def test_evaluate_task_scores_greedy_answers():
    """Exact match per problem, batched (batch 8): a model that always answers "2" scores the share of problems whose
    answer is "2"; one that always answers "10" scores 0 (no count answer is 10). The random model this test used had
    exact_match 0.0 on every run, so its `0 <= exact_match <= 1` could not fail."""
    tok = CharTokenizer.train([string.ascii_lowercase + string.digits + " "])
    problems = make_problems("count", "test", 30, seed=0)
    twos = sum(p.answer == "2" for p in problems)
    assert 0 < twos < 30
    result = evaluate_task(scripted_model(tok, {ASSISTANT: "2"}), tok, "count", num_problems=30, batch_size=8)
    assert result == {"exact_match": twos / 30, "num_problems": 30.0}
    result = evaluate_task(scripted_model(tok, {ASSISTANT: "1", "1": "0"}), tok, "count", num_problems=30, batch_size=8)
    assert result["exact_match"] == 0.0


def test_an_answer_is_scored_as_lm_chat_shows_it():
    """A model that answers "1" and then writes the next user turn itself: chat shows "1", and so does the score."""
    import string

    from lm.tokenizer import ASSISTANT, USER
    from tests.test_chat_replies import scripted_model

    tok = CharTokenizer.train([string.ascii_lowercase + string.digits + " "])
    problems = make_problems("count", "test", 50, seed=0)
    ones = sum(p.answer == "1" for p in problems)
    assert 0 < ones < 50
    model = scripted_model(tok, {ASSISTANT: "1", "1": USER, USER: "2"})
    assert evaluate_task(model, tok, "count", num_problems=50)["exact_match"] == ones / 50


def test_task_accuracy_refuses_a_tokenizer_that_cannot_write_its_problems_before_training():
    """A char vocabulary without digits (Shakespeare's) failed at the first validation, after training had run."""
    from types import SimpleNamespace

    shakespeare = SimpleNamespace(tokenizer=CharTokenizer.train(["To be, or not to be"]))
    with pytest.raises(LMError, match="task addition: the model's char tokenizer cannot write its problems"):
        TaskAccuracy("addition").on_fit_start(None, shakespeare)
    TaskAccuracy("addition").on_fit_start(None, SimpleNamespace(tokenizer=CharTokenizer.train(["0123456789+"])))


def test_task_accuracy_keeps_its_count_of_validations_across_a_resume():
    """every_n_validations counts validations; a resumed run used to count from 0 again."""
    callback = TaskAccuracy(every_n_validations=3)
    callback._validations = 4
    resumed = TaskAccuracy(every_n_validations=3)
    resumed.load_state_dict(callback.state_dict())
    assert resumed._validations == 4
    fresh = TaskAccuracy()
    fresh.load_state_dict({})  # a checkpoint written before the count was saved
    assert fresh._validations == 0


def test_two_task_accuracies_train_together_and_each_resumes_its_own_count():
    """One per task: Lightning refused a second TaskAccuracy (their saved counts shared the class name's key)."""
    import lightning as L

    addition, count = TaskAccuracy("addition", every_n_validations=3), TaskAccuracy("count", every_n_validations=3)
    trainer = L.Trainer(callbacks=[addition, count], logger=False, enable_checkpointing=False)
    addition._validations, count._validations = 4, 2
    saved = {callback.state_key: callback.state_dict() for callback in trainer.callbacks if callback.state_dict()}
    resumed = [TaskAccuracy("addition"), TaskAccuracy("count")]
    for callback in resumed:
        callback.load_state_dict(saved[callback.state_key])
    assert [callback._validations for callback in resumed] == [4, 2]
    # an older lm checkpoint's count, under the class name: tests/test_eval.py::test_an_older_checkpoint_s_counts_...


def test_a_problem_found_on_the_last_allowed_draw_counts(monkeypatch):
    import lm.tasks as tasks

    test_q = next(f"{a}+{a}" for a in range(10, 100) if tasks.split_of(tasks.Problem(f"{a}+{a}", "")) == "test")
    train_q = next(f"{a}+{a}" for a in range(10, 100) if tasks.split_of(tasks.Problem(f"{a}+{a}", "")) == "train")
    draws = []

    def the_test_problem_comes_last(rng, digits):  # of the max(1000, 200 x 1) draws allowed
        draws.append(1)
        return tasks.Problem(test_q if len(draws) == 1000 else train_q, "x")

    monkeypatch.setitem(tasks.TASKS, "addition", the_test_problem_comes_last)
    assert [p.question for p in tasks.make_problems("addition", "test", 1)] == [test_q]


def test_an_answer_that_only_contains_the_right_one_scores_zero():
    """Exact match: a model that always replies "10" is right on no count problem (a word has at most 7 letters),
    although "10" holds the answers "1" and "0"."""
    tok = CharTokenizer.train([string.ascii_lowercase + string.digits + " "])
    problems = make_problems("count", "test", 50, seed=0)
    assert any(p.answer in ("1", "0") for p in problems)
    model = scripted_model(tok, {ASSISTANT: "1", "1": "0"})
    assert evaluate_task(model, tok, "count", num_problems=50)["exact_match"] == 0.0


def test_two_digit_additions_add_two_digit_numbers_from_10_to_99():
    operands = [int(x) for p in make_problems("addition", "train", 2000, digits=2) for x in p.question.split("+")]
    assert min(operands) == 10 and max(operands) == 99


def test_a_wrong_answer_changes_one_digit_and_never_writes_a_leading_zero():
    """A rejected reply of "032" for "132" would teach a preference model that a leading zero is the mistake."""
    import random

    from lm.tasks import wrong_answer

    rng = random.Random(0)
    for answer in ("132", "10", "99", "1000"):
        wrong = [wrong_answer(Problem("q", answer), rng) for _ in range(200)]
        assert all(len(w) == len(answer) and w != answer and not w.startswith("0") for w in wrong), answer
        assert all(sum(a != b for a, b in zip(w, answer, strict=True)) == 1 for w in wrong), answer
    assert "0" in {wrong_answer(Problem("q", "5"), rng) for _ in range(200)}  # a one-digit answer may become 0


def test_a_wrong_word_swaps_two_neighbouring_different_letters():
    """The near miss of a reverse answer: the same letters, two neighbours swapped (never two equal ones, which would
    give the right answer back); a word of one letter repeated gets one more letter instead."""
    import random

    from lm.tasks import wrong_answer

    rng = random.Random(0)
    for answer in ("tolip", "abba", "ab"):
        for _ in range(50):
            wrong = wrong_answer(Problem("q", answer), rng)
            i = next(i for i in range(len(answer)) if wrong[i] != answer[i])
            assert wrong == answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :], (answer, wrong)
    for _ in range(50):
        wrong = wrong_answer(Problem("q", "aaa"), rng)
        assert len(wrong) == 4 and wrong[:3] == "aaa" and wrong[3] != "a"


def test_task_accuracy_evaluates_at_every_n_th_validation(monkeypatch):
    """every_n_validations=3: at validations 3 and 6, as EvalCallback (it was 1, 4, 7); sanity checks aside."""
    import contextlib
    from types import SimpleNamespace

    import lm.tasks

    calls = []
    monkeypatch.setattr(
        lm.tasks, "evaluate_task", lambda *args, **kwargs: calls.append(args[2:]) or {"exact_match": 1.0}
    )
    callback = TaskAccuracy(num_problems=5, every_n_validations=3, seed=4)
    precision = SimpleNamespace(forward_context=contextlib.nullcontext)
    fit = SimpleNamespace(fn="fit")
    trainer = SimpleNamespace(sanity_checking=True, strategy=None, precision_plugin=precision, state=fit)
    logged = []
    module = SimpleNamespace(model=None, tokenizer=object(), log=lambda name, value, **kwargs: logged.append(name))
    callback.on_validation_epoch_end(trainer, module)  # the sanity check counts for nothing
    trainer.sanity_checking = False
    evaluated_at = []
    for validation in range(1, 8):
        callback.on_validation_epoch_end(trainer, module)
        if calls:
            assert calls.pop() == ("addition", 5, 4) and not calls
            evaluated_at.append(validation)
    assert evaluated_at == [3, 6] and logged == ["eval/addition/exact_match"] * 2


# --------------------------------------------------------------------------------------------------------------------
# TaskAccuracy's cadence: when it evaluates, in a fit and in lm validate, as lm.eval.EvalCallback does.


def _tiny_training_on_digits(tmp_path, callbacks, **trainer_kwargs):
    """tests/test_eval.py's tiny char model, on a text whose characters write the addition problems."""
    from tests.test_eval import _tiny_training

    (tmp_path / "t.txt").write_text((string.ascii_lowercase + string.digits + "+ \n") * 200, encoding="utf-8")
    return _tiny_training(tmp_path, tmp_path / "t.txt", callbacks, **trainer_kwargs)


def test_lm_validate_runs_task_accuracy_whatever_the_count_of_validations(tmp_path):
    """With every_n_validations 2, lm validate evaluated or not by the count the checkpoint restored (each validate
    call counted one more validation: the first logged eval/addition/exact_match, the second nothing)."""
    callback = TaskAccuracy(num_problems=2, every_n_validations=2)
    trainer, module, data = _tiny_training_on_digits(tmp_path, [callback], limit_val_batches=1)
    for _ in range(2):  # the counts 0 and 1 of a checkpoint, restored
        metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
        assert "eval/addition/exact_match" in metrics
    assert callback._validations == 0  # validate saves no checkpoint: its pass is not one of the fit's validations


def test_task_accuracy_and_eval_callback_evaluate_at_the_same_validations(tmp_path):
    """With one every_n_validations, TaskAccuracy ran at validations 1, N+1, ... and EvalCallback at N, 2N, ...: never
    together, and a run of k x N validations ended without TaskAccuracy's score of its final weights."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lm.eval import EvalCallback

    addition = TaskAccuracy("addition", num_problems=2, every_n_validations=2)
    count = EvalCallback([{"task": "count", "num_problems": 2}], every_n_validations=2)
    trainer, module, data = _tiny_training_on_digits(
        tmp_path,
        [addition, count],
        max_steps=8,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path / "logs"),
    )
    trainer.fit(module, datamodule=data)
    with (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))

    def steps_logging(key):
        return [int(row["step"]) + 1 for row in rows if row.get(key)]  # the step count after the logged step

    assert steps_logging("val/loss") == [2, 4, 6, 8]
    assert steps_logging("eval/addition/exact_match") == steps_logging("eval/count/exact_match") == [4, 8]


def test_a_checkpoint_monitoring_task_accuracy_that_skips_validations_is_refused_before_training(tmp_path):
    """Lightning keeps the last logged value: a checkpoint at a validation without a new one was ranked and named by
    the score of older weights (and early stopping counted it as no improvement), and a resumed fit stopped at its
    first such validation, after training up to it ("could not find the monitored key")."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from lm.eval import EvalCallback
    from tests.test_eval import VALIDATE_EVERY_2_OF_4_STEPS

    callback = TaskAccuracy(num_problems=2, every_n_validations=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="eval/addition/exact_match", mode="max")
    trainer, module, data = _tiny_training_on_digits(tmp_path, [callback, checkpoint], **VALIDATE_EVERY_2_OF_4_STEPS)
    expected = (
        r"^trainer.callbacks: ModelCheckpoint monitors eval/addition/exact_match, which the TaskAccuracy logs at one "
        "validation in 2: give it every_n_validations: 1"
    )
    with pytest.raises(LMError, match=expected):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0
    stopping = EarlyStopping(monitor="eval/addition/exact_match", mode="max")
    with pytest.raises(LMError, match="^trainer.callbacks: EarlyStopping monitors eval/addition/exact_match"):
        callback._refuse_a_monitor_missing_at_some_validations([callback, stopping])
    # Logged at every validation (by this callback, or the same evaluation in an EvalCallback), or another metric
    # monitored: nothing to refuse
    TaskAccuracy(num_problems=2)._refuse_a_monitor_missing_at_some_validations([stopping])
    every_validation = EvalCallback([{"task": "addition", "num_problems": 2}])
    callback._refuse_a_monitor_missing_at_some_validations([callback, stopping, every_validation])
    callback._refuse_a_monitor_missing_at_some_validations([callback, ModelCheckpoint(monitor="val/loss")])
