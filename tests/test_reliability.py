"""Faults and what docs/reliability.md promises: one-line user errors, atomic checkpoints, skipped NaN steps."""

import argparse
import math
import re

import lightning as L
import pytest
import torch

from lm.__main__ import main
from lm.cli_errors import explain
from lm.config import get_config
from lm.data import PretrainData
from lm.errors import LMError
from lm.module import LanguageModel
from lm.reliability import AtomicCheckpointIO, RNGState
from lm.tokenizer import CharTokenizer
from tests.conftest import OPTIMIZERS, REPO, nan_loss_from_step

DEBUG = str(REPO / "experiments" / "debug.yaml")
EVAL_TASKS = "trainer:\n  callbacks:\n    - class_path: lm.eval.EvalCallback\n      init_args: {{tasks: [{}]}}\n"


def run_cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.init_args.lrr", "1"], "unknown key model.init_args.lrr (did you mean 'lr'?)"),
        (["--model.init_args.arch.n_layr", "3"], "unknown key model.init_args.arch.n_layr (did you mean 'n_layer'?)"),
        (["--trainer.max_stepz", "3"], "unknown key trainer.max_stepz (did you mean 'trainer.max_steps'?)"),
        (["--data.init_args.sourc", "x"], "unknown key data.init_args.sourc (did you mean 'source'?)"),
        (["--model.init_args.lr", "abc"], "bad value for model.init_args.lr: Expected a <class 'float'>"),
        (["--trainer.max_steps", "abc"], "bad value for trainer.max_steps: Expected a <class 'int'>"),
        (["--model.init_args.l", "3"], "unknown key model.init_args.l"),  # no silent abbreviation of `lr`
        # a dashed spelling was cut at the dash: "unknown key trainer.max (did you mean 'trainer.max_time'?)"
        (["--trainer.max-steps", "3"], "unknown key trainer.max-steps (did you mean 'trainer.max_steps'?)"),
        (["--model.init_args.weight-decay", "0"], "unknown key model.init_args.weight-decay (did you mean "
         "'weight_decay'?); lm.module.LanguageModel accepts: "),
        # errors inside a union of types used to come out empty: 'error: Parser key "trainer.precision":.'
        (["--trainer.precision", "17"], "bad value for trainer.precision: 17; expected one of 64, 32, 16 | "),
        (["--model.class_path", "lm.module.LanguageModle"], "module 'lm.module' has no attribute 'LanguageModle'"),
        (
            ["--trainer.callbacks+=lm.callbacks.EMA", "--trainer.callbacks.decay", "abc"],
            "bad value for trainer.callbacks.init_args.decay: Expected a <class 'float'>. Got value: abc",
        ),
        (["--ckpt_path", "hpc"], "no HPC checkpoint was found"),  # Lightning's ValueError, was a traceback
        # an optional argument's union read "Does not validate against any of the Union subtypes", no value nor type
        (["--model.init_args.decay_steps", "abc"], "bad value for model.init_args.decay_steps: abc; expected one of "
         "int | null"),
    ],
)  # fmt: skip
def test_config_errors_are_one_line_naming_the_key(capsys, tmp_path, override, expected):
    code, err = run_cli(capsys, "fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path), *override)
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and expected in err


def test_a_run_bounded_by_max_time_alone_is_refused_in_one_line_before_it_trains(capsys, tmp_path):
    """max_time without max_steps gives the cosine schedule no end to decay towards: the run trained at a constant
    LR and said nothing."""
    override = ("--trainer.max_steps", "-1", "--trainer.max_time", "00:00:00:08")
    code, err = run_cli(capsys, "fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path), *override)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (  # after the data's tokenizing progress
        "error: schedule cosine needs a length: set trainer.max_steps or model.init_args.decay_steps (max_time, "
        "max_epochs -1 and an unsized loader give none)"
    )
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # fabric's CPU accelerator raises a TypeError (was a traceback): ddp.yaml's `devices: -1` with accelerator cpu
        (["--trainer.accelerator", "cpu", "--trainer.devices", "-1"], "should be an int > 0"),
        # Lightning divides by these at the first step (ZeroDivisionError traceback)
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be >= 1, got 0"),
        (["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be >= 1 batch"),
        (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch must be >= 1 (null: count "),
        # trained without a word, every update reversed (gradient ascent)
        (["--trainer.gradient_clip_val=-1.0"], "trainer.gradient_clip_val must be >= 0"),
        # Lightning's seed_everything raised its ValueError ("not in bounds, numpy accepts ...") as a traceback
        (["--seed_everything", "-1"], "seed_everything must be in [0, 4294967295] (numpy's seeds) or true/false"),
    ],
)
def test_trainer_values_lightning_does_not_check_are_one_line_errors(capsys, tmp_path, override, expected):
    code, err = run_cli(capsys, "fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path), *override)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err


def test_unknown_key_lists_the_allowed_ones(capsys):
    _, err = run_cli(capsys, "fit", "--config", DEBUG, "--model.init_args.lrr", "1")
    assert "lm.module.LanguageModel accepts: arch, lr, min_lr_ratio" in err


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("trainer:\n  max_stepz: 3\n", "unknown key trainer.max_stepz"),
        ("model:\n  init_args:\n    lrr: 1\n", "unknown key model.init_args.lrr (did you mean 'lr'?)"),
        # under arch (a dataclass) it was jsonargparse's "Group 'arch' does not accept option 'n_layerz'"
        ("model:\n  init_args:\n    arch:\n      n_layerz: 3\n",
         "unknown key model.init_args.arch.n_layerz (did you mean 'n_layer'?); lm.module.LanguageModel.arch accepts: "
         "vocab_size, block_size, n_layer,"),
        # inside a callback's list of dataclasses (README's EvalCallback tasks) both read "bad value for
        # trainer.callbacks.init_args.tasks: Problem with given class_path 'lm.eval.EvalSpec':", naming neither
        (EVAL_TASKS.format("{task: hellaswag, data: x.jsonl, limt: 5}"),
         "unknown key trainer.callbacks.init_args.tasks.limt (did you mean 'limit'?); lm.eval.EvalSpec accepts: "),
        # a misspelt group had no suggestion, and the root parser's own keys (subcommand, print_shtab) were listed
        ("checkpoints:\n  monitor: val/loss\n", "unknown key checkpoints.monitor (did you mean 'checkpoint.monitor'?); "
         "top level accepts: config, print_config, seed_everything, trainer, model, data, checkpoint, snapshots, "),
        (EVAL_TASKS.format("{task: hellaswag, data: x.jsonl, limit: all}"),
         "bad value for trainer.callbacks.init_args.tasks.limit: all; expected one of int | null"),
    ],
)  # fmt: skip
def test_unknown_key_in_a_yaml_file(capsys, tmp_path, yaml_text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    code, err = run_cli(capsys, "fit", "--config", DEBUG, "--config", str(bad))
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


def test_the_list_of_allowed_keys_names_each_once(capsys):
    _, err = run_cli(capsys, "fit", "--config", DEBUG, "--trainer.max_stepz", "3")
    allowed = err.partition("accepts: ")[2].removesuffix(". See `lm fit --help`.").split(", ")
    assert "max_steps" in allowed and len(allowed) == len(set(allowed))  # fit's and validate's parsers, merged


def test_unknown_yaml_key_under_print_config_names_its_group(capsys, tmp_path):
    """--print_config reports it as "Group 'trainer' does not accept option 'max_stepz'": the group was dropped."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    code, err = run_cli(capsys, "fit", "--config", DEBUG, "--config", str(bad), "--print_config")
    assert code == 2 and "unknown key trainer.max_stepz (did you mean 'trainer.max_steps'?); trainer accepts:" in err
    # a misspelt group: it read "Option 'trainr.max_steps' is not accepted"
    bad.write_text("trainr:\n  max_steps: 3\n")
    code, err = run_cli(capsys, "fit", "--config", DEBUG, "--config", str(bad), "--print_config")
    assert code == 2 and "unknown key trainr.max_steps (did you mean 'trainer.max_steps'?); top level accepts:" in err


def test_a_config_file_that_is_not_text_is_one_line(capsys, tmp_path):
    """jsonargparse's UnicodeDecodeError came out as a traceback with exit code 1: a checkpoint given as --config
    (meant for --ckpt_path), or a YAML saved in Latin-1."""
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("trainer:\n  default_root_dir: runs/café\n".encode("latin-1"))
    for configs in (["--config", str(ckpt)], ["--config", DEBUG, "-c", str(latin1)]):
        code, err = run_cli(capsys, "fit", *configs, "--print_config")
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {configs[-1]}: not UTF-8 text (") and err.endswith(
            "a config is a YAML file (a checkpoint goes to --ckpt_path)"
        )


@pytest.mark.parametrize(
    ("text", "holds"), [("# trainer:\n#   max_steps: 5\n", "nothing (only comments?)"), ("- 1\n- 2\n", "a list")]
)
def test_a_config_file_without_keys_is_named(capsys, tmp_path, text, holds):
    """An overlay left with comments only read "Unexpected config: # trainer:", naming no file."""
    overlay = tmp_path / "overrides.yaml"
    overlay.write_text(text)
    code, err = run_cli(capsys, "fit", "--config", DEBUG, "--config", str(overlay), "--print_config")
    assert code == 2 and err == (
        f"error: {overlay} holds {holds}, not the keys of a config (trainer:, model:, data:, ...). See `lm fit --help`."
    )


def test_a_key_given_twice_in_a_config_file_is_refused(capsys, tmp_path):
    """YAML keeps the last of two equal keys without a word: two configs pasted into one file (debug.yaml, then the
    bf16 overlay's `trainer:`) trained with bf16 but without debug's trainer section: no max_steps, another root."""
    debug, bf16 = (open(path).read().splitlines() for path in (DEBUG, REPO / "experiments/trainer/bf16.yaml"))
    pasted = tmp_path / "pasted.yaml"
    pasted.write_text("\n".join(debug + bf16) + "\n")
    first, again = debug.index("trainer:") + 1, len(debug) + bf16.index("trainer:") + 1
    code, err = run_cli(capsys, "fit", "--config", str(pasted), "--print_config")
    assert code == 2 and err == (
        f"error: {pasted}, line {again}: 'trainer' is given a second time (first on line {first}), and YAML keeps "
        "only the second: merge the two, or put one in another --config file"
    )


def test_a_missing_subcommand_is_one_sentence(capsys):
    code, err = run_cli(capsys, "--config", DEBUG)
    assert code == 2 and "but it was not provided. See `lm fit --help`." in err


def test_validate_without_a_last_checkpoint_is_an_error_not_a_random_model(capsys, tmp_path):
    code, err = run_cli(
        capsys, "validate", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"
    )
    assert code == 2 and err == f"error: --ckpt_path last: no {tmp_path}/checkpoints/last.ckpt to validate"


def test_a_gpu_experiment_on_a_cpu_says_how_to_try_it_there(capsys, tmp_path):
    """experiments/shakespeare_char*.yaml and gpt2_124m.yaml ask for accelerator: gpu; on a CPU Lightning's refusal
    said only "No supported gpu backend found!"."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the experiment would run")
    code, err = run_cli(capsys, "fit", "--config", DEBUG, "--trainer.accelerator", "gpu",
                        "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: No supported gpu backend found! (the config asks for trainer.accelerator gpu; to try")
    assert "--trainer.accelerator cpu --trainer.precision 32-true --model.init_args.compile false)" in err


def test_lightnings_own_refusals_are_one_line():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lm.__main__ import _lightning_user_error

    assert _lightning_user_error(MisconfigurationException("No supported gpu backend found!"))
    assert _lightning_user_error(ValueError('.validate(ckpt_path="best") is set but ModelCheckpoint is not configured'))
    assert not _lightning_user_error(ValueError("math domain error"))  # a bug stays a traceback


def test_explain_falls_back_to_the_first_line():
    assert explain("something new\nand more", []) == "something new"


def test_truncated_checkpoint_for_resume_is_one_line(capsys, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    code, err = run_cli(capsys, "fit", "--config", DEBUG, "--ckpt_path", str(ckpt))
    assert code == 2 and len(err.splitlines()) == 1
    assert str(ckpt) in err and "truncated or corrupted" in err


def test_a_file_that_is_no_checkpoint_is_refused_without_torch_s_advice_to_unpickle_it(capsys, tmp_path):
    """torch's first line said re-running with weights_only=False "will likely succeed": an option lm never takes, and
    wrong for a text file. Its unpickler's reason is shown instead."""
    (tmp_path / "text.ckpt").write_text("garbage\n")
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "object.ckpt")  # a pickled Python object
    for name, reason in [
        ("text.ckpt", "Unsupported operand"),
        ("object.ckpt", "Unsupported global: GLOBAL argparse.Namespace"),
    ]:
        code, err = run_cli(capsys, "generate", "--ckpt", str(tmp_path / name))
        assert code == 2 and len(err.splitlines()) == 1 and "weights_only=False" not in err, err
        assert f"{name}: not a readable checkpoint" in err and f"torch.load(weights_only=True): {reason}" in err


def data(tmp_path, name: str, content: bytes, **kwargs) -> PretrainData:
    path = tmp_path / name
    path.write_bytes(content)
    return PretrainData(source=str(path), block_size=8, batch_size=2, cache_dir=str(tmp_path / "cache"), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "data.seed must be >= 0, got -1"),
        ({"val_windows": 0}, "data.val_windows must be >= 1 (or null for the whole split), got 0"),
        ({"val_windows": -1}, "data.val_windows must be >= 1"),
        ({"num_workers": -2}, "data.num_workers must be >= 0, got -2"),
    ],
)
def test_bad_pretrain_data_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(LMError, match=re.escape(message)):
        PretrainData(**kwargs)


def test_non_utf8_text_names_file_and_line(tmp_path):
    dm = data(tmp_path, "bad.txt", b"first line\nsecond \xff line\n")
    with pytest.raises(LMError, match=r"bad\.txt:2: not UTF-8 \(byte 0xff"):
        dm.prepare_data()


def test_malformed_jsonl_names_file_and_line(tmp_path):
    dm = data(tmp_path, "bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(LMError, match=r"bad\.jsonl:3: not a JSON record"):
        dm.prepare_data()


def test_empty_corpus_is_refused(tmp_path):
    dm = data(tmp_path, "empty.txt", b"")
    with pytest.raises(LMError, match="holds no text"):
        dm.prepare_data()
    assert not list((tmp_path / "cache").glob("*/meta.json"))  # nothing a later run could trust


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path) == {"step": 1}  # the old checkpoint, intact
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_temporary_files_of_writers_killed_mid_write_are_removed(tmp_path):
    """A SIGKILL mid-save left a temporary file the size of a checkpoint, and each kill another; a live writer's (this
    host's running process, or another host's) stays."""
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = tmp_path / f".last.ckpt.tmp@{host}@{gone.stdout.strip()}"
    alive = tmp_path / f".last.ckpt.tmp@{host}@{os.getppid()}"
    elsewhere = tmp_path / ".last.ckpt.tmp@another-host@1"
    before_the_host_was_named = tmp_path / f".last.ckpt.tmp-{gone.stdout.strip()}"
    for leftover in (dead, alive, elsewhere, before_the_host_was_named):
        leftover.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", alive.name, elsewhere.name])


def test_temporary_files_of_killed_writers_of_other_checkpoints_are_removed_too(tmp_path):
    """best-step=N, snapshot-step=N and hpc_ckpt_N are never written under the same name again: a writer killed while
    writing one left its temporary file for good when only the name being saved was looked at."""
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = tmp_path / f".best-step=100.ckpt.tmp@{host}@{gone.stdout.strip()}"
    dead_snapshot = tmp_path / f".snapshot-step=100.ckpt.tmp-{gone.stdout.strip()}"
    alive = tmp_path / f".best-step=90.ckpt.tmp@{host}@{os.getppid()}"
    for leftover in (dead, dead_snapshot, alive):
        leftover.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"step": 200}, tmp_path / "best-step=200.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best-step=200.ckpt", alive.name])


def test_a_temporary_file_of_another_user_s_living_writer_is_kept(tmp_path, monkeypatch):
    """os.kill(pid, 0) on another user's living process raises PermissionError: its writer is alive, the file is not
    stale. Only ProcessLookupError (no such process) makes it one."""
    import os
    import socket

    from lm.reliability import remove_stale_temporary_files

    theirs = tmp_path / f".last.ckpt.tmp@{socket.gethostname()}@4242"
    theirs.write_bytes(b"half a checkpoint")
    signalled = []

    def kill(pid, sig):
        signalled.append((pid, sig))
        raise answer

    monkeypatch.setattr(os, "kill", kill)
    answer = PermissionError(1, "Operation not permitted")
    assert remove_stale_temporary_files(tmp_path / "last.ckpt") == [] and theirs.exists()
    assert signalled == [(4242, 0)]  # only asked whether it lives
    answer = ProcessLookupError(3, "No such process")
    assert remove_stale_temporary_files(tmp_path / "last.ckpt") == [theirs] and not theirs.exists()


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    callback = RNGState()
    state = callback.state_dict()
    torch.save(state, tmp_path / "rng.pt")
    expected = torch.rand(3)
    torch.rand(5)  # move on
    callback.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(
    torch.__version__ < (2, 8), reason="gloo's process group can deadlock in destroy_process_group before torch 2.8"
)
def test_each_rank_gets_its_own_rng_state_back(tmp_path):
    """Rank 0 writes the checkpoint: every rank restored rank 0's states, so on GPUs each rank's dropout masks after a
    resume were not its own (rank 0's process had never used the other devices' generators)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "rng_ranks.py"), str(tmp_path / "rng.pt")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(torch.load(tmp_path / "rng.pt", weights_only=True)["by_rank"]) == 2


def test_rank_0_keeps_its_rng_stream_at_the_start_of_a_fresh_fit():
    """Only the other ranks re-seed: one device trains on the stream seed_everything set, which the weights' init has
    moved on. Re-seeding rank 0 would restart it, and its first dropout masks would repeat the init's draws."""
    import random
    from types import SimpleNamespace

    import numpy as np

    def seeded_and_moved_on():
        torch.manual_seed(3)
        np.random.seed(3)
        random.seed(3)
        torch.rand(4)  # what making the weights draws
        np.random.rand(4)
        random.random()

    def streams():
        return torch.rand(3), np.random.rand(3), random.random()

    seeded_and_moved_on()
    without_callback = streams()
    seeded_and_moved_on()
    RNGState().on_train_start(SimpleNamespace(global_rank=0, global_step=0), None)
    with_callback = streams()
    assert torch.equal(with_callback[0], without_callback[0])
    assert np.array_equal(with_callback[1], without_callback[1]) and with_callback[2] == without_callback[2]

    seeded_and_moved_on()  # rank 1 gets a stream of its own, from the seed and its rank
    RNGState().on_train_start(SimpleNamespace(global_rank=1, global_step=0), None)
    rank_1 = torch.rand(3)
    torch.manual_seed((3 + 0x9E3779B97F4A7C15) % 2**64)
    assert torch.equal(rank_1, torch.rand(3))


def test_last_ckpt_holds_the_final_step_when_the_last_validation_came_before_it(tmp_path):
    """Lightning writes last.ckpt at train end only if it never wrote one: after a validation at step 2, a run of 3
    steps left last.ckpt at step 2, and a resume from it would train step 3 again."""
    from lm.reliability import Checkpoint

    ids = torch.randint(0, 64, (8, 2, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[Checkpoint(dirpath=tmp_path, save_last=True, monitor="val/loss")], logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1), loader, val_dataloaders=loader)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # the best one
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3


class _Validations(L.Callback):
    """Records (step, val/loss) at the end of each validation of a fit."""

    def __init__(self):
        self.scores = []

    def on_validation_end(self, trainer, pl_module):
        self.scores.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


def test_with_periodic_saves_every_validation_s_score_is_ranked_the_last_one_too(tmp_path):
    """With checkpoint.every_n_train_steps Lightning ranked the best checkpoint only at the periodic saves, by the
    previous validation's score: the run's last validation never counted (its step's periodic save came just before
    it), so the best score, which lm sweep ranks a trial by, was an earlier validation's, on a file of other weights.
    A periodic checkpoint that monitors the step (snapshots) still saves at its own steps only."""
    from lm.reliability import Checkpoint

    ids = torch.randint(0, 64, (8, 2, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None)
    validations = _Validations()
    best = Checkpoint(dirpath=tmp_path, save_last=True, monitor="val/loss", every_n_train_steps=2, filename="b-{step}")
    steps = Checkpoint(dirpath=tmp_path / "s", monitor="step", mode="max", every_n_train_steps=4, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[validations, best, steps], logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(LanguageModel(get_config("tiny"), lr=3e-2, warmup_steps=1), loader, val_dataloaders=loader)
    step, score = min(validations.scores, key=lambda s: s[1])
    assert [s for s, _ in validations.scores] == [3, 6] and step == 6  # the last validation is the best
    assert float(best.best_model_score) == pytest.approx(score) and best.best_model_path.endswith(f"b-step={step}.ckpt")
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    recorded = [v["best_model_score"] for v in last["callbacks"].values() if v.get("monitor") == "val/loss"]
    assert last["global_step"] == 6 and [float(r) for r in recorded] == [pytest.approx(score)]
    assert sorted(p.name for p in (tmp_path / "s").glob("*.ckpt")) == ["epoch=0-step=4.ckpt"]


def test_init_from_refuses_a_different_tokenizer(tmp_path):
    theirs = CharTokenizer.train(["abc"])
    ckpt = tmp_path / "pretrained.ckpt"
    config = get_config("tiny")
    model = LanguageModel(config)
    model.configure_model()
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.model.state_dict().items()},
            "lm": {"model_config": vars(config), "tokenizer": theirs.to_state()},
        },
        ckpt,
    )
    fresh = LanguageModel(config, init_from=str(ckpt))
    fresh.tokenizer = CharTokenizer.train(["xyz"])
    with pytest.raises(LMError, match="tokenizer .* differs from the data's"):
        fresh.configure_model()


# ---- non-finite steps ---------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def fit_quietly(module: LanguageModel, steps: int, *, ckpt_path=None, **trainer_kwargs) -> L.Trainer:
    """Train `module` for `steps` steps on seeded random batches of 2 x 16 tokens, on the CPU, without logger,
    checkpoints, progress bar or summary."""
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=g)} for _ in range(steps)]
    for b in batches:
        b["labels"] = b["input_ids"]
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, **quiet, **trainer_kwargs)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def fit_with_nan_steps(
    nan_steps: set[int],
    *,
    max_skipped: int,
    steps: int = 6,
    optimizer: str = "adamw",
    spoil=lambda loss: loss * NAN,
    warning="non-finite loss or gradient",
    **trainer_kwargs,
):
    torch.manual_seed(0)
    module = LanguageModel(
        get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=10, max_skipped_steps=max_skipped, optimizer=optimizer
    )
    snapshots = []
    original_step = module.model_step

    def model_step(batch):
        loss, n = original_step(batch)
        snapshots.append({k: v.clone() for k, v in module.model.state_dict().items()})
        if module.trainer.global_step in nan_steps:
            loss = spoil(loss)
        return loss, n

    module.model_step = model_step
    with pytest.warns(UserWarning, match=warning):
        fit_quietly(module, steps, **trainer_kwargs)
    return module, snapshots


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_nan_step_is_skipped_and_counted(optimizer):
    # global_step 2 is the third step: the warning numbers it as the progress lines and last.ckpt do (it said 2)
    warning = "non-finite loss or gradient at step 3: update skipped"
    module, snapshots = fit_with_nan_steps({2}, max_skipped=5, optimizer=optimizer, warning=warning)
    assert module.skipped_steps == 1 and module.stopped_at_step is None
    # weights before step 2 equal weights before step 3: the NaN step changed nothing
    for name, before in snapshots[2].items():
        assert torch.equal(before, snapshots[3][name]), name
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    # and the steps around it did train
    assert not torch.equal(snapshots[1]["lm_head.weight"], snapshots[2]["lm_head.weight"])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_an_infinite_loss_with_finite_gradients_is_skipped_and_counted_too(optimizer):
    """A label's logit at -inf makes the loss inf and its gradient finite: only the gradient norm was checked, so
    the step was taken and nothing counted."""
    module, snapshots = fit_with_nan_steps({2}, max_skipped=5, optimizer=optimizer, spoil=lambda loss: loss + INF)
    assert module.skipped_steps == 1
    for name, before in snapshots[2].items():
        assert torch.equal(before, snapshots[3][name]), name


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_under_fp16_an_infinite_loss_with_finite_gradients_is_skipped_not_only_counted(optimizer):
    """The GradScaler skips a step for overflowing gradients only: the step was counted as skipped, and taken."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module, snapshots = fit_with_nan_steps(
        {2}, max_skipped=5, optimizer=optimizer, spoil=lambda loss: loss + INF, plugins=[scaler]
    )
    assert module.skipped_steps == 1
    for name, before in snapshots[2].items():
        assert torch.equal(before, snapshots[3][name]), name
    assert not torch.equal(snapshots[3]["lm_head.weight"], snapshots[4]["lm_head.weight"])  # and then it trains on


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_too_many_nan_steps_stop_the_run_naming_the_step(optimizer):
    module, snapshots = fit_with_nan_steps({1, 2, 3, 4, 5}, max_skipped=2, optimizer=optimizer)
    assert module.skipped_steps == 3
    assert module.stopped_at_step == 4  # the 4th step (global_step 3) went over the limit, numbered as logged
    assert len(snapshots) == 4  # steps 0..3 ran; training stopped after the third skipped step
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_fp16_loss_scale_overflows_are_the_scalers_business_not_skipped_steps():
    """Under 16-mixed a GradScaler skips the steps whose scaled gradients overflow and halves its scale: normal, and
    not counted towards max_skipped_steps. Norms and clipping see the unscaled gradients."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=10, max_skipped_steps=1)
    norms = []
    on_before_optimizer_step = module.on_before_optimizer_step

    def record_norm(optimizer):
        on_before_optimizer_step(optimizer)
        norms.append(module._grad_norm.item())

    module.on_before_optimizer_step = record_norm
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**26)  # overflows fp16 gradients in the first steps
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = fit_quietly(module, 12, plugins=[fp16], gradient_clip_val=1.0)
    assert scaler.get_scale() < 2.0**24  # the scaler did skip several steps
    assert module.skipped_steps == 0 and module.stopped_at_step is None and trainer.global_step == 12
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    finite = [n for n in norms if math.isfinite(n)]
    assert len(finite) >= 3 and max(finite) < 100  # unscaled: the tiny model's gradient norm is ~2, not ~2 x 8192


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fp16_with_the_default_loss_scale_skips_no_step_and_keeps_the_token_weighting(accumulate):
    """The backward used to get the token-weighted sum, N times a mean's gradient: with the GradScaler's default first
    scale (2**16) every fp16 run began with skipped steps (here the scale fell to 2**10 in the first 10 steps, at 8 x 64
    tokens a micro-batch). Now it gets about the mean, multiplied back before the norm: the norm matches fp32's."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (8, 64), generator=g)} for _ in range(10 * accumulate)]
    for i, b in enumerate(batches):
        b["labels"] = b["input_ids"].clone()
        b["labels"][: i % 3, :20] = -100  # micro-batches with different token counts: the weighting must stay exact
    norms, scales = {}, []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if module._grad_norm is not None:  # None until the first optimizer step (accumulation)
                norms.setdefault(trainer.precision, []).append(module._grad_norm.item())
            if trainer.precision == "16-mixed":
                scales.append(trainer.precision_plugin.scaler.get_scale())

    for plugins in ([], [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]):
        torch.manual_seed(0)
        module = LanguageModel(get_config("tiny", block_size=64), lr=1e-3, warmup_steps=1, schedule="constant")
        quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=10, plugins=plugins, callbacks=[Record()], accumulate_grad_batches=accumulate,
            **quiet,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert min(scales) == 2.0**16, f"the GradScaler lowered its scale (skipped steps): {scales}"
    # the same weights at the first step: the same gradient norm, to fp16's precision
    assert norms["16-mixed"][0] == pytest.approx(norms["32-true"][0], rel=2e-2)


def test_an_fp16_resume_rescales_a_loss_scale_found_with_another_backward_divisor(tmp_path):
    """A GradScaler's scale restored from a checkpoint was found for that run's gradients: a checkpoint written before
    the backward divisor (gradients 8 x 64 times larger) or with another batch size. Lightning restores it as it was;
    left so, it takes ~2000 clean steps per doubling to get back. The backward takes loss / divisor, so what reaches
    the gradients is scale / divisor: that ratio carries over, i.e. the scale is multiplied by new / old divisor."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (8, 64), generator=g)} for _ in range(4)]
    for b in batches:
        b["labels"] = b["input_ids"]
    scales = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            scales.append(trainer.precision_plugin.scaler.get_scale())

    def fit(steps, ckpt_path=None):
        module = LanguageModel(get_config("tiny", block_size=64), lr=1e-3, warmup_steps=1, schedule="constant")
        fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", growth_interval=10**6))
        trainer = L.Trainer(
            accelerator="cpu", max_steps=steps, plugins=[fp16], callbacks=[Record()], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
        return trainer

    fit(2).save_checkpoint(tmp_path / "new.ckpt")
    assert scales == [2.0**16, 2.0**16]
    fit(3, tmp_path / "new.ckpt")  # the same divisor: the scale goes on as it was
    assert scales[2:] == [2.0**16]

    old = torch.load(tmp_path / "new.ckpt", weights_only=True)
    del old["lm"]["fp16_backward_divisor"]  # as written before it existed, when the scale had fallen to 2**10
    (scaler_state,) = [v for v in old.values() if isinstance(v, dict) and "_growth_tracker" in v]
    scaler_state["scale"] = 2.0**10
    torch.save(old, tmp_path / "old.ckpt")
    scales.clear()
    fit(3, tmp_path / "old.ckpt")
    # found with divisor 1, now 8 rows x 64 positions: the same gradients' scale, not 2**18 times less
    assert scales == [2.0**10 * (8 * 64)]


def test_an_fp16_resume_that_stops_before_its_first_step_keeps_the_scale_s_divisor(tmp_path):
    """The divisor is set by the first fp16 step of a fit; a crash or Ctrl-C before it (a long compile, an OOM in the
    first forward) saved last.ckpt with divisor 1 beside the restored scale, and the next resume multiplied the scale
    by 8 x 64: ~9 steps skipped for overflow."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lm.reliability import Checkpoint

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (8, 64), generator=g)} for _ in range(4)]
    for b in batches:
        b["labels"] = b["input_ids"]

    class Crash(L.Callback):
        def on_train_batch_start(self, *args):
            raise RuntimeError("out of memory in the first step")

    def fit(steps, ckpt_path=None, callbacks=()):
        module = LanguageModel(get_config("tiny", block_size=64), lr=1e-3, warmup_steps=1, schedule="constant")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=steps, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
            callbacks=[Checkpoint(dirpath=tmp_path, save_last=True, save_on_exception=True, monitor=None), *callbacks],
            logger=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
        return trainer

    fit(2)
    with pytest.raises(RuntimeError, match="out of memory"):
        fit(3, tmp_path / "last.ckpt", [Crash()])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["lm"]["fp16_backward_divisor"] == 8 * 64
    assert fit(3, tmp_path / "last.ckpt").precision_plugin.scaler.get_scale() == 2.0**10


@pytest.mark.parametrize("fp16", [False, True])
def test_value_clipping_bounds_every_gradient_also_under_fp16_with_fused_adamw(fp16):
    """gradient_clip_algorithm: value clamps each unscaled gradient entry. Under fp16, Lightning's own clipping refuses
    fused AdamW (it unscales inside its step), so the module clamps after unscaling them itself."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=10)
    largest = []
    clip = module.configure_gradient_clipping

    def record_largest(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip(optimizer, gradient_clip_val, gradient_clip_algorithm)
        largest.append(max(p.grad.abs().max().item() for p in module.model.parameters() if p.grad is not None))

    module.configure_gradient_clipping = record_largest
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))] if fp16 else []
    fit_quietly(module, 4, plugins=plugins, gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    assert largest == [pytest.approx(1e-3)] * 4  # the tiny model's raw gradients reach ~0.1: every step was clamped


def test_fp16_still_counts_a_non_finite_loss():
    """A NaN loss is no overflow a smaller scale would fix: under a GradScaler it still counts and stops the run."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=10, max_skipped_steps=1)
    nan_loss_from_step(module, 2)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        fit_quietly(module, 8, plugins=[fp16])
    assert module.skipped_steps == 2 and module.stopped_at_step == 4


def test_a_resumed_run_keeps_counting_its_skipped_steps(tmp_path):
    """The count travels in the checkpoint: a run that diverges again after each requeue still stops at
    max_skipped_steps, not max_skipped_steps per requeue."""
    torch.manual_seed(0)
    first = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=10, max_skipped_steps=1)
    nan_loss_from_step(first, 2)
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        trainer = fit_quietly(first, 3)
    assert first.skipped_steps == 1 and first.stopped_at_step is None
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1, decay_steps=10, max_skipped_steps=1)
    nan_loss_from_step(resumed, 4)
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        fit_quietly(resumed, 8, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.skipped_steps == 2 and resumed.stopped_at_step == 5  # the first skip after the resume is the 2nd


# ---- configuration errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "model.init_args.lr must be a number > 0, got -1.0"),
        ({"lr": float("nan")}, "model.init_args.lr must be a number > 0"),
        ({"min_lr_ratio": 1.5}, "model.init_args.min_lr_ratio must be in [0, 1], got 1.5"),
        ({"warmup_steps": -5}, "model.init_args.warmup_steps must be >= 0, got -5"),
        ({"decay_steps": 0}, "model.init_args.decay_steps must be >= 1"),
        ({"wsd_decay_fraction": 2.0}, "model.init_args.wsd_decay_fraction must be in [0, 1]"),
        ({"weight_decay": -0.1}, "model.init_args.weight_decay must be >= 0, got -0.1"),
        ({"betas": (0.9, 1.0)}, "model.init_args.betas must be two numbers in [0, 1), got (0.9, 1.0)"),
        ({"max_skipped_steps": -1}, "model.init_args.max_skipped_steps must be >= 0, got -1"),
    ],
)
def test_invalid_hyperparameters_are_one_line_errors_naming_the_key(kwargs, message):
    with pytest.raises(LMError) as error:
        LanguageModel(get_config("tiny"), **kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.init_args.arch.n_head", "3"], "n_embd (64) must be divisible by n_head (3)"),
        (["--model.init_args.lr", "-1"], "model.init_args.lr must be a number > 0, got -1.0"),
        (["--samples.top_k", "-1"], "top_k must be at least 0 (0 = no top-k filter), got -1"),
    ],
)
def test_constructor_errors_on_the_command_line_are_one_line(capsys, tmp_path, override, expected):
    # lm fit makes the run's root and checkpoint folders before the model is built: they must land in tmp_path
    code, err = run_cli(
        capsys, "fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        *override,
    )  # fmt: skip
    assert code == 2 and err == f"error: {expected}"


def test_resuming_with_another_architecture_names_the_fields(tmp_path):
    """Before Lightning loads the weights (a wall of size mismatches): the differing fields, checkpoint vs run."""
    first = fit_quietly(LanguageModel(get_config("tiny"), warmup_steps=1), 1)
    ckpt = tmp_path / "last.ckpt"
    first.save_checkpoint(ckpt)
    # dropout, block_size and rope_theta may change in a continued run
    changed = get_config("tiny", dropout=0.1, block_size=32, rope_theta=5e5)
    fit_quietly(LanguageModel(changed, warmup_steps=1), 2, ckpt_path=ckpt)
    for config, fields in [
        (get_config("tiny", n_embd=64), "n_embd=32 but this run's has n_embd=64"),
        (
            get_config("tiny", n_layer=3, qk_norm=True),
            "n_layer=2, qk_norm=False but this run's has n_layer=3, qk_norm=True",
        ),
        (get_config("tiny", n_head=4), "n_head=2 but this run's has n_head=4"),  # same shapes, other attention
    ]:
        with pytest.raises(LMError) as error:
            fit_quietly(LanguageModel(config, warmup_steps=1), 2, ckpt_path=ckpt)
        assert str(error.value) == (
            f"{ckpt}: its model has {fields}: resume with the checkpoint's model.init_args.arch, or start a new run"
        )


def test_a_sample_prompt_the_tokenizer_cannot_encode_stops_the_run_before_training():
    from lm.callbacks import SampleText

    module = LanguageModel(get_config("tiny"), warmup_steps=1)
    module.tokenizer = CharTokenizer.train(["romeo and juliet: lowercase only"])
    steps = []
    training_step = module.training_step
    module.training_step = lambda batch, batch_idx: steps.append(batch_idx) or training_step(batch, batch_idx)
    samples = SampleText(prompts=["romeo:", "ROMEO:"], max_new_tokens=4)
    with pytest.raises(LMError, match=r"^samples.prompts: 'ROMEO:' cannot be encoded .*character 'R'") as error:
        fit_quietly(module, 2, callbacks=[samples])
    assert "\n" not in str(error.value) and steps == []  # refused before the first step
    # lm validate: it was refused only after the whole pass, whose loss the error then hid
    module.validation_step = lambda batch, batch_idx: steps.append(batch_idx)
    batches = [{"input_ids": torch.zeros(2, 16, dtype=torch.long), "labels": torch.zeros(2, 16, dtype=torch.long)}]
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(LMError, match=r"^samples.prompts: 'ROMEO:' cannot be encoded"):
        L.Trainer(accelerator="cpu", callbacks=[samples], **quiet).validate(
            module, torch.utils.data.DataLoader(batches, batch_size=None)
        )
    assert steps == []


class _SignalDuring(L.Callback):
    """Does what the SIGTERM handler does, at the start of one given batch."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1 == self.batch:
            trainer._signal_connector.received_sigterm = True


def test_a_signal_between_micro_batches_stops_after_the_whole_step_and_resumes_exactly(tmp_path):
    """With accumulate_grad_batches 2, a signal during the first micro-batch of step 3 (batch 4) must let batch 5 run:
    a checkpoint after batch 4 would hold step 2 and a lost half step, and the resumed step 3 would use batch 5 only."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lm.reliability import Checkpoint, PreemptionSignal

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)

    def fit(callbacks, ckpt_path=None, root="a"):
        torch.manual_seed(0)
        dm = PretrainData(source=str(text), block_size=16, batch_size=2, cache_dir=str(tmp_path / "cache"))
        module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1)
        checkpoint = Checkpoint(dirpath=tmp_path / root, save_last=True, save_on_exception=True, save_top_k=0)
        quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=6, accumulate_grad_batches=2, callbacks=[checkpoint, *callbacks], **quiet
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, module

    _, uninterrupted = fit([PreemptionSignal()])
    with pytest.raises(SIGTERMException):
        fit([PreemptionSignal(), _SignalDuring(batch=4)], root="b")
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3  # steps 1-3 (batches 0-5), not step 2 and batch 4
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 6
    _, resumed = fit([PreemptionSignal()], ckpt_path=tmp_path / "b" / "last.ckpt", root="b")
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_signal_during_validation_lets_it_finish_then_stops_and_the_score_is_kept(tmp_path):
    """SIGTERM in the middle of a validation: Lightning stopped after that val batch and saved a checkpoint that
    resumed past the validation, so a trial preempted in its last validation had no score. Now the validation ends,
    its val/loss is logged and kept by the checkpoint callback, then the run stops with last.ckpt at that step."""
    import os
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lm.reliability import Checkpoint, PreemptionSignal
    from tests.conftest import MemoryLogger

    class SignalInValidation(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if trainer.global_step == 4 and batch_idx == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    dm = PretrainData(source=str(text), block_size=16, batch_size=2, cache_dir=str(tmp_path / "cache"))
    checkpoint = Checkpoint(
        dirpath=tmp_path / "ckpt", monitor="val/loss", save_last=True, save_on_exception=True, save_top_k=1
    )
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=8,
        val_check_interval=4,
        limit_val_batches=3,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[checkpoint, PreemptionSignal(), SignalInValidation()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1), datamodule=dm)
    assert [step for step, metrics in logger.by_step().items() if "val/loss" in metrics] == [3]
    assert checkpoint.best_model_score is not None and checkpoint.best_model_path
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert signal.getsignal(signal.SIGTERM) is not None  # the handlers were put back


class _KillAtSanityStart(L.Callback):
    def on_sanity_check_start(self, trainer, pl_module):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)


class _KillAtBatch(L.Callback):
    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import os
        import signal

        if trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1 == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_with_signal(tmp_path, killer, **trainer_args):
    """(trainer, SIGTERMException raised?) of a tiny fit with PreemptionSignal and a callback that sends SIGTERM."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lm.reliability import Checkpoint, PreemptionSignal

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    dm = PretrainData(source=str(text), block_size=16, batch_size=2, cache_dir=str(tmp_path / "cache"))
    checkpoint = Checkpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_exception=True, save_top_k=0)
    callbacks = (
        [killer, PreemptionSignal()] if trainer_args.pop("killer_first", False) else [PreemptionSignal(), killer]
    )
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(accelerator="cpu", callbacks=[checkpoint, *callbacks], **quiet, **trainer_args)
    torch.manual_seed(0)
    try:
        trainer.fit(LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1), datamodule=dm)
    except SIGTERMException:
        return trainer, True
    return trainer, False


@pytest.mark.parametrize("killer_first", [True, False], ids=["lightnings-handler", "ours"])
def test_a_signal_just_before_the_sanity_check_stops_after_the_first_step(tmp_path, killer_first):
    """It used to be lost: the run trained on to its end (on a cluster: until SIGKILL, its progress lost)."""
    trainer, stopped = _fit_with_signal(
        tmp_path,
        _KillAtSanityStart(),
        killer_first=killer_first,
        max_steps=6,
        num_sanity_val_steps=1,
        limit_val_batches=2,
    )
    assert stopped and trainer.global_step == 1
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_a_validation_inside_an_accumulation_window_does_not_cut_the_step(tmp_path):
    """val_check_interval counts batches: with accumulation 4 and a validation every 2, a signal in batch 0 used to
    stop after the validation at batch 1, mid-step (two micro-batches' gradients lost, no checkpoint written)."""
    trainer, stopped = _fit_with_signal(
        tmp_path,
        _KillAtBatch(0),
        max_steps=3,
        accumulate_grad_batches=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    assert stopped and trainer.global_step == 1
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_a_signal_in_the_last_step_lets_the_run_end_as_finished(tmp_path):
    """Lightning stopped with SIGTERMException (exit 143, "resume with --ckpt_path last") after the last step."""
    trainer, stopped = _fit_with_signal(
        tmp_path, _KillAtBatch(5), max_steps=6, limit_val_batches=0, num_sanity_val_steps=0
    )
    assert not stopped and trainer.global_step == 6
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_signal_in_the_last_batch_of_an_epoch_bounded_run_lets_it_end_as_finished(tmp_path):
    """The finished check read max_steps only: with max_epochs the run exited 143 ("resume") after it was complete."""
    trainer, stopped = _fit_with_signal(
        tmp_path, _KillAtBatch(3), max_epochs=1, limit_train_batches=4, limit_val_batches=0, num_sanity_val_steps=0
    )
    assert not stopped and trainer.global_step == 4


def _fit_four_steps_in_windows_of_two(tmp_path, checkpoint, callbacks=(), ckpt_path=None, **trainer_args):
    """The tiny LanguageModel, seeded, 4 optimizer steps of 2 micro-batches each on a small text, with `checkpoint`
    first among the callbacks; trainer_args set the validation. Returns (module, trainer)."""
    text = tmp_path / "text.txt"
    if not text.exists():  # once per test: every fit then reads the same cache
        text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    torch.manual_seed(0)
    dm = PretrainData(source=str(text), block_size=16, batch_size=2, cache_dir=str(tmp_path / "cache"))
    module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, accumulate_grad_batches=2, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, callbacks=[checkpoint, *callbacks], logger=False, enable_progress_bar=False,
        enable_model_summary=False, **trainer_args,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer


def test_a_checkpoint_of_a_validation_inside_an_accumulation_window_holds_whole_steps(tmp_path):
    """val_check_interval counts micro-batches: the checkpoint written at a validation inside a window held half a
    step, and a resume from it (after a crash) lost that half's gradients. It is written at the step's end now."""
    from lm.reliability import Checkpoint

    def fit(root, ckpt_path=None):
        checkpoint = Checkpoint(
            dirpath=tmp_path / root, save_last=True, save_top_k=-1, filename="val-{step}", monitor="val/loss"
        )
        module, _ = _fit_four_steps_in_windows_of_two(
            tmp_path, checkpoint, ckpt_path=ckpt_path, val_check_interval=3, limit_val_batches=1
        )
        return module, checkpoint

    whole, checkpoint = fit("a")
    first = min((tmp_path / "a").glob("val-*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))  # after batch 3
    saved = torch.load(first, weights_only=True)
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 4  # was 3: mid-step
    assert "val/loss" in str(saved["callbacks"])  # its validation's score, kept for the top-k ranking
    resumed, _ = fit("b", ckpt_path=first)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


class _TimeIsUpFromBatch(L.Callback):
    """Asks for a stop on every micro-batch from the nth on (0-based), as max_time's Timer does once time is up."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1 >= self.batch:
            trainer.should_stop = True


def test_a_stop_asked_for_inside_an_accumulation_window_takes_effect_at_the_step_s_end(tmp_path):
    """max_time's Timer stopped the run mid-window: last.ckpt held half a step (a resume lost its gradients), and the
    validation Lightning runs on a stop fell inside the window, so its best checkpoint was never written."""
    from lm.reliability import Checkpoint

    def fit(root, callbacks=(), ckpt_path=None, val=0):
        checkpoint = Checkpoint(
            dirpath=tmp_path / root, save_last=True, save_top_k=1, monitor="val/loss", filename="best-{step}"
        )
        module, trainer = _fit_four_steps_in_windows_of_two(
            tmp_path, checkpoint, callbacks, ckpt_path, val_check_interval=100, limit_val_batches=val
        )
        return module, trainer, checkpoint

    whole, _, _ = fit("a")
    _, stopped, checkpoint = fit("b", [_TimeIsUpFromBatch(2)], val=1)  # asked for in batch 2, inside step 2's window
    assert stopped.global_step == 2  # after the window's last batch (it stopped at 1, batch 3 of 4 unrun)
    assert checkpoint.best_model_path.endswith("best-step=2.ckpt")  # the stop's validation, kept
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 4
    resumed, _, _ = fit("b", ckpt_path=tmp_path / "b" / "last.ckpt")
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


class _StopAtValidation(L.Callback):
    """Asks for a stop when a validation ends, as EarlyStopping does."""

    def on_validation_end(self, trainer, pl_module):
        trainer.should_stop = True


class _CrashAtBatch(L.Callback):
    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            raise RuntimeError("crash")


class _CrashInBackwardAt(L.Callback):
    def __init__(self, batch: int):
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1 == self.batch:
            raise RuntimeError("crash")


def test_early_stopping_and_a_crash_inside_an_accumulation_window_leave_whole_steps(tmp_path):
    """EarlyStopping decides at a validation's end, after the check at the batch's end: a validation inside a window
    stopped the run mid-step (last.ckpt: half a step). A crash (or Ctrl-C) inside a window wrote such a last.ckpt too,
    over the last whole step's."""
    from lm.reliability import Checkpoint

    def fit(root, callbacks=(), ckpt_path=None, val_every=100):
        checkpoint = Checkpoint(dirpath=tmp_path / root, save_last=True, save_top_k=0, save_on_exception=True)
        return _fit_four_steps_in_windows_of_two(
            tmp_path, checkpoint, callbacks, ckpt_path, val_check_interval=val_every, limit_val_batches=1
        )

    whole, _ = fit("a")
    _, stopped = fit("b", [_StopAtValidation()], val_every=3)  # the validation after batch 2, inside step 2's window
    assert stopped.global_step == 2  # it stopped at 1, mid-window
    resumed, _ = fit("b", ckpt_path=tmp_path / "b" / "last.ckpt")
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="crash"):
        fit("c", [_CrashAtBatch(2)])  # batch 2 opens step 2's window; no whole-step checkpoint exists yet
    assert not (tmp_path / "c" / "last.ckpt").exists()
    with pytest.raises(RuntimeError, match="crash"):
        fit("d", [_CrashAtBatch(3)])  # batch 3 ends step 2's window: a whole step to save
    assert torch.load(tmp_path / "d" / "last.ckpt", weights_only=True)["global_step"] == 2
    with pytest.raises(RuntimeError, match="crash"):
        fit("e", [_CrashInBackwardAt(3)])  # in the window's last batch, before its step: batch 2's half is all there is
    assert not (tmp_path / "e" / "last.ckpt").exists()


def test_a_crash_after_an_epoch_s_shorter_last_window_still_saves(tmp_path):
    """5 batches an epoch with accumulation 2: the last window is one batch, and Lightning steps on it. A crash (or
    the SIGTERM a preemption raises there) after it must still save: the processed count (5) closes no window."""
    from lm.reliability import Checkpoint

    ids = torch.randint(0, 64, (5, 2, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=None)
    checkpoint = Checkpoint(dirpath=tmp_path, save_last=True, save_top_k=0, save_on_exception=True)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
        callbacks=[checkpoint, _CrashAtBatch(4)], enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="crash"):
        trainer.fit(LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1), train_dataloaders=loader)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3


def test_slurm_requeue_signal_saves_at_the_next_step_boundary(tmp_path, monkeypatch):
    """Under SLURM auto-requeue Lightning's SIGUSR1 handler saves an HPC checkpoint and requeues; run inside the
    signal handler it saved mid-step. It now runs once the step's last micro-batch is done."""
    import os
    import signal

    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    from lm.reliability import PreemptionSignal

    # (tests/conftest.py has removed any SLURM_* of a job running the tests)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")  # not "bash"/"interactive": Lightning then manages the job
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    calls = []
    monkeypatch.setattr(
        _SignalConnector,
        "_slurm_sigusr_handler_fn",
        lambda self, signum, frame: calls.append(
            (self.trainer.global_step, self.trainer.fit_loop.epoch_loop.batch_progress.total.completed)
        ),
    )

    class SignalAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.fit_loop.epoch_loop.batch_progress.total.ready == 5:  # batch 4: step 3's first micro-batch
                os.kill(os.getpid(), signal.SIGUSR1)

    torch.manual_seed(0)
    module = LanguageModel(get_config("tiny"), lr=1e-2, warmup_steps=1)
    fit_quietly(module, 8, accumulate_grad_batches=2, callbacks=[SignalAt(), PreemptionSignal()])
    # called once, after batch 5 (step 3's last micro-batch) completed; Lightning counts it completed after the hook
    assert calls == [(3, 5)]


def test_cannot_write_names_the_failing_part_once():
    """The part of the path that failed is named when it is not the path itself, however the path was spelled."""
    from lm.errors import cannot_write

    assert str(cannot_write("./tok", OSError(20, "Not a directory", "tok"))) == "cannot write ./tok: Not a directory"
    blocked = cannot_write("a/b/out.json", OSError(17, "File exists", "a/b"))
    assert str(blocked) == "cannot write a/b/out.json: a/b: File exists"


# ---- periodic checkpoints ------------------------------------------------------------------------------------------

SAVES: list[tuple[int, bool]] = []  # (step, inside an accumulation window) of every checkpoint SaveProbe saw written


class SaveProbe(L.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        from lm.callbacks import inside_accumulation_window

        SAVES.append((trainer.global_step, inside_accumulation_window(trainer)))


def test_periodic_checkpoints_hold_whole_steps_and_start_before_the_first_validation(tmp_path, monkeypatch):
    """Three gaps of Lightning's periodic saves, as lm fit configures them:
    - a save put off at an epoch's last step (Lightning expects a validation there; under val_check_interval none
      comes) came a micro-batch later under accumulation, holding half a step, for last.ckpt and the snapshots alike;
    - without accumulation that step's snapshot was missing;
    - every_n_train_steps wrote nothing before the first validation (val/loss did not exist yet)."""
    import random

    from lm.checkpoint import read_checkpoint

    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    # 5,700 characters: with val_fraction 0.1, batch 8 and context 64 an epoch is 10 batches
    (tmp_path / "c.txt").write_text(" ".join(rng.choice(["to", "be", "or", "not"]) for _ in range(2000))[:5700])
    common = ["fit", "--config", DEBUG, "--data.init_args.source", str(tmp_path / "c.txt"), "--trainer.logger", "false"]
    common += ["--trainer.callbacks+=tests.test_reliability.SaveProbe", "--samples.max_new_tokens", "0"]
    common += ["--checkpoint.every_n_train_steps", "1", "--snapshots.every_n_train_steps", "1"]
    common += ["--snapshots.save_top_k", "-1"]

    SAVES.clear()
    main([*common, "--trainer.default_root_dir", "acc", "--trainer.accumulate_grad_batches", "2",
          "--trainer.max_steps", "8", "--trainer.val_check_interval", "4"])  # fmt: skip
    assert SAVES and not any(inside for _, inside in SAVES), SAVES  # never half a step
    snapshots = sorted(int(p.stem.split("=")[1]) for p in (tmp_path / "acc" / "checkpoints").glob("snapshot-*.ckpt"))
    assert snapshots == list(range(1, 9))  # the epoch's last step (5) too

    SAVES.clear()
    main([*common, "--trainer.default_root_dir", "early", "--trainer.max_steps", "3",
          "--trainer.val_check_interval", "1000", "--trainer.limit_val_batches", "0"])  # fmt: skip
    last = read_checkpoint(tmp_path / "early" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and [step for step, _ in SAVES].count(1) >= 2  # last.ckpt from step 1 on


def test_checkpoint_state_key_is_lightning_s_built_once_per_setting(monkeypatch):
    """Lightning reads a callback's state_key for every hook it calls on it (~7 a step); lm's Checkpoint builds
    ModelCheckpoint's key (a repr of its settings) again only when a setting changes, and it is the same key, so
    checkpoints load either way."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lm.reliability import Checkpoint

    callback = Checkpoint(monitor="val/loss", every_n_train_steps=5)
    lightnings = ModelCheckpoint.state_key.fget  # the key as Lightning builds it, on this instance
    expected = lightnings(callback)
    built = []
    generate = Checkpoint._generate_state_key
    monkeypatch.setattr(Checkpoint, "_generate_state_key", lambda self, **kw: built.append(1) or generate(self, **kw))
    assert {callback.state_key for _ in range(10)} == {expected} and len(built) == 1
    callback.monitor = "train/loss"
    assert callback.state_key == lightnings(callback) != expected
    assert len(built) == 3  # one for the new setting, one for lightnings() above


class SigtermToTheWholeProcessGroupAtStep3(L.Callback):
    """At step 3 every process of the run gets SIGTERM, its data-loader workers too: what `scancel`, a Slurm preemption
    and `lm sweep`'s stop send (to the job step, or to the trial's process group)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            import os
            import subprocess
            import sys

            # Sent from another process, as scancel's is: a worker takes one from the run itself (its parent) as the
            # order to exit, quietly
            kill = f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"
            subprocess.run([sys.executable, "-c", kill], start_new_session=True, check=True)


@pytest.mark.slow
def test_sigterm_to_the_run_and_its_data_loader_workers_saves_and_exits_143(tmp_path):
    """A worker took the group's SIGTERM as a crash and died; the run then raised "DataLoader worker (pid N) is killed
    by signal: Terminated" wherever it was, often inside the preemption's own save: exit 1 and no checkpoint of the
    steps since the last validation. The workers now leave the signal to the run, which saves and exits 143."""
    import subprocess
    import sys

    from tests.conftest import cli_env

    root = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "lm", "fit", "--config", str(REPO / "experiments" / "debug.yaml")]
        + ["--trainer.default_root_dir", str(root), "--trainer.logger", "false", "--trainer.max_steps", "50"]
        + ["--trainer.val_check_interval", "50", "--samples.max_new_tokens", "0", "--data.init_args.num_workers", "2"]
        + ["--trainer.callbacks+=tests.test_reliability.SigtermToTheWholeProcessGroupAtStep3"],
        cwd=tmp_path,
        env=cli_env(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,  # its own process group: the signal must not reach pytest
    )
    assert result.returncode == 143, result.stderr[-3000:]
    assert "is killed by signal" not in result.stderr
    assert 3 <= torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < 50


class SigtermAtStep2(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(
    "no_last",
    [["--trainer.enable_checkpointing", "false"], ["--checkpoint.save_last", "false"]],
    ids=["checkpointing-off", "save_last-false"],
)
def test_a_signal_that_saved_no_last_ckpt_says_so_instead_of_how_to_resume(capsys, tmp_path, monkeypatch, no_last):
    """With checkpointing off, lm fit still said "stopped by a signal after saving a checkpoint; resume with ...
    --ckpt_path last", and that resume then trained from scratch."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.logger", "false", "--trainer.max_steps", "20", "--samples.max_new_tokens", "0", *no_last]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--trainer.callbacks+=tests.test_reliability.SigtermAtStep2"])
    out = capsys.readouterr().out
    assert stop.value.code == 143 and not list(tmp_path.rglob("last.ckpt"))
    assert "after saving a checkpoint" not in out
    assert "stopped by a signal; no last.ckpt was written" in out


class SigtermAfterStep4(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 4:  # the run stops after the step this batch starts, step 5
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_that_saved_nothing_after_an_earlier_save_names_that_checkpoint(capsys, tmp_path, monkeypatch):
    """With save_on_exception false and a last.ckpt from step 4's validation, a signal in step 5 said "after saving
    a checkpoint", and a resume trained step 5 again: it says what --ckpt_path last resumes from."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.logger", "false", "--trainer.max_steps", "20", "--samples.max_new_tokens", "0"]
    args += ["--checkpoint.save_on_exception", "false", "--trainer.val_check_interval", "2"]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--trainer.callbacks+=tests.test_reliability.SigtermAfterStep4"])
    out = capsys.readouterr().out
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert stop.value.code == 143 and torch.load(last, weights_only=True)["global_step"] == 4
    assert "after saving a checkpoint" not in out
    assert "stopped by a signal without saving (checkpoint.save_on_exception is false" in out and str(last) in out
