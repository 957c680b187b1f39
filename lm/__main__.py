"""The `lm` command.

    lm fit --config experiments/debug.yaml [--config more.yaml] [--model.init_args.lr 1e-3]   # also validate
    lm generate --ckpt runs/debug/checkpoints/last.ckpt --prompt "ROMEO:"
    lm serve --ckpt runs/debug/checkpoints/last.ckpt --port 8000      # an OpenAI-compatible HTTP API
    lm tokenizer train --source builtin:shakespeare --kind bpe --vocab_size 4096 --out runs/tokenizers/shakespeare

fit and validate are Lightning's own (LightningCLI): every constructor argument of the model, the data module, the
Trainer and the callbacks below is a config key, shown with its doc by `lm fit --help`. User errors (bad config,
data or checkpoint) print one line and exit with code 2.
"""

import ast
import contextlib
import difflib
import inspect
import netrc
import os
import re
import signal
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import jsonargparse
import torch
import torch.distributed
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import lm.chat_data  # noqa: F401 - imported, the data modules are known by name: `lm fit --data.help ChatData`
import lm.data  # noqa: F401
import lm.preference  # noqa: F401
from lm.callbacks import ProgressLines, SampleText, Throughput
from lm.chat import chat_command, undecodable_bytes_pass_through
from lm.checkpoint import read_checkpoint
from lm.cli_errors import OneLineErrorParser, import_class
from lm.config import GPTConfig
from lm.distributed import DestroyProcessGroup
from lm.errors import ArgumentParser, LMError, cannot_write
from lm.module import LanguageModel
from lm.reliability import AtomicCheckpointIO, Checkpoint, PreemptionSignal, RNGState
from lm.serve import serve_command
from lm.sweep import SWEEP_TRIAL
from lm.tasks import tasks_command

# No `test`: lm's modules have one held-out split, and validate scores it (LightningCLI's test would find no test_step)
LIGHTNING_COMMANDS = ("fit", "validate")
# lm's default progress bar: tqdm's, redrawn every this many batches
PROGRESS_BAR_REFRESH_RATE = 10
_MOVED_ASIDE: list[Path] = []  # the earlier run's last.ckpt that this fresh fit moved to last.previous.ckpt
# A resumed run may change these. init_from too: the file may have moved since (the weights come from the resumed
# checkpoint; an architecture that differs is refused, and DPO refuses a reference whose weights changed).
RUNTIME_ARGS = ("compile", "fp8", "activation_checkpointing", "max_skipped_steps", "init_from")


def _plain(value):
    """A config value in a comparable, printable form (tuples and lists alike)."""
    return list(value) if isinstance(value, tuple) else value


def _differences(given: dict, saved: dict, *, skip: str, prefix: str = "", whose: str = "checkpoint") -> list[str]:
    """`key given (checkpoint: saved)` for each key but `skip` whose value given here differs from the saved one (of a
    checkpoint, or of `whose`)."""
    return [
        f"{prefix}{key} {_plain(given[key])} ({whose}: {_plain(saved[key])})"
        for key in saved
        if key in given and key != skip and _plain(given[key]) != _plain(saved[key])
    ]


def _shows_help(argv: list[str]) -> bool:
    # `--model.help=LanguageModel` too: argparse takes an option's value after `=`, and that form showed no field docs
    return any(
        a in ("-h", "--help") or a.partition("=")[0].endswith(".help") or a.startswith("--print_config") for a in argv
    )


class LMCLI(LightningCLI):
    """LightningCLI with lm's defaults: W&B logging, checkpoints and samples, all under trainer.default_root_dir."""

    def __init__(self, args=None):
        no_abbrev = {"allow_abbrev": False}  # LightningCLI otherwise accepts `--model.l` for `--model.lr` silently
        super().__init__(
            LanguageModel,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={
                "default_root_dir": "runs/default",
                "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "lm"}},
                # Our train sampler shards by rank itself; Lightning's DistributedSampler would re-wrap it.
                "use_distributed_sampler": False,
            },
            # Each fit rewrites <root>/config.yaml; the copy inside every checkpoint is the one that matters.
            save_config_callback=_SaveFitConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**no_abbrev, **{c: no_abbrev for c in LIGHTNING_COMMANDS}},
            auto_configure_optimizers=False,  # the module owns its optimizer and schedule
            parser_class=OneLineErrorParser,
            args=args,
        )

    def subcommands(self):
        return {name: spec for name, spec in super().subcommands().items() if name in LIGHTNING_COMMANDS}

    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{step}",
                # SIGTERM/SIGUSR1 (preemption) and crashes finish the step and write a checkpoint + last.ckpt
                "checkpoint.save_on_exception": True,
                # A new run in a used root replaces last.ckpt (Lightning would write last-v1.ckpt beside the earlier
                # run's, and every `--ckpt .../last.ckpt` would silently load the old model).
                "checkpoint.enable_version_counter": False,
            }
        )
        # Snapshots every N steps, keeping the newest K: off until snapshots.every_n_train_steps is set.
        parser.add_lightning_class_args(ModelCheckpoint, "snapshots")
        parser.set_defaults(
            {
                "snapshots.monitor": "step",
                "snapshots.mode": "max",
                "snapshots.save_top_k": 3,
                "snapshots.every_n_train_steps": 0,
                "snapshots.every_n_epochs": 0,
                "snapshots.filename": "snapshot-{step}",
                "snapshots.enable_version_counter": False,
                # saved at once at an epoch's last step too: Lightning puts that save off to a validation it expects
                # there, which under val_check_interval never comes, and the next micro-batch (mid-window under
                # accumulation) saved half a step
                "snapshots.save_on_train_epoch_end": True,
            }
        )
        parser.add_lightning_class_args(SampleText, "samples")
        # One context length for the model and the data windows (init_from's, when the model starts from a file).
        parser.link_arguments(
            "model", "data.init_args.block_size", compute_fn=lambda model: model.context_length, apply_on="instantiate"
        )

    def parse_arguments(self, parser, args):
        for subcommand in self.subcommands():  # before parsing, which prints --help
            _help_where_lm_differs(self._parser(subcommand), subcommand)
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "", None)
        if config is not None:
            # "~/runs/x" (a YAML's): Lightning, ModelCheckpoint and W&B expand it, lm's own paths did not, so
            # `--ckpt_path last` looked for ./~/runs/x/checkpoints/last.ckpt and lm's resume checks were skipped
            for key in ("trainer.default_root_dir", "checkpoint.dirpath", "snapshots.dirpath", "ckpt_path"):
                value = config.get(key)
                if isinstance(value, str) and value.startswith("~"):
                    config[key] = os.path.expanduser(value)
            # Lightning's seed_everything refuses a seed numpy cannot take with a ValueError traceback
            seed = config.get("seed_everything")
            if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
                raise LMError(f"seed_everything must be in [0, {2**32 - 1}] (numpy's seeds) or true/false, got {seed}")
        sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
        if self.config.get("subcommand") == "fit" and sweep_id and run_id:
            # A trial started by `wandb agent` (lm sweep on the W&B server): every trial runs the sweep's one command,
            # so each gets its own folder under that command's root, named after the sweep and the trial's W&B run.
            # Here, before `--ckpt_path last` is looked up and the config is saved: both must see the trial's folder.
            # (lm sweep --local gives each trial its own root itself.)
            trainer = self.config.fit.trainer
            trainer.default_root_dir = str(Path(trainer.default_root_dir) / f"sweep-{sweep_id}" / run_id)

    def before_instantiate_classes(self):
        """Point every writer at trainer.default_root_dir (DESIGN.md: one output root); on resume, check the checkpoint
        and continue its W&B run."""
        config = self.config[self.subcommand]
        _check_trainer_values(config.trainer)
        if self.subcommand == "fit" and config.get("ckpt_path") is None and _rank() == 0:
            _note_arch_replaced_by_init_from(config.model)
            _note_fine_tuning_from_scratch(config)
        # The config as given, before the values below that the root, the login and a resume fill in: what
        # <root>/config.yaml and the checkpoints' run_config record, so that a run started again from them with
        # another root writes there, not into this run's checkpoints, logs and W&B run.
        self._given_config = config.clone()
        # `--ckpt_path last` as given, not the file it found: config.yaml held this root's last.ckpt, so a run started
        # again from it with another root resumed this run's checkpoint (and trained nothing past its max_steps)
        self._given_config["ckpt_path"] = self._ckpt_path_given
        self.save_config_kwargs = {**self.save_config_kwargs, "given": self._given_config}
        root = Path(config.trainer.default_root_dir)
        if self.subcommand == "fit":
            try:  # a root under a file, or not ours to write: one line now, not a traceback from whichever writer
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise cannot_write(root, e) from None
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(_checkpoint_dir(config))
        if config.snapshots.dirpath is None:
            config.snapshots.dirpath = str(root / "checkpoints")
        if self.subcommand == "fit":
            # given elsewhere, they failed with a traceback at the first save, after training up to it
            for folder in dict.fromkeys((config.checkpoint.dirpath, config.snapshots.dirpath)):
                try:
                    Path(folder).expanduser().mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise cannot_write(folder, e) from None
        resume_info = self._resume_info
        fresh_fit = self.subcommand == "fit" and config.get("ckpt_path") is None
        earlier = list(Path(config.checkpoint.dirpath).glob("*.ckpt")) if fresh_fit else []
        if earlier and _rank() == 0:
            # The earlier run's last.ckpt is moved aside now, not replaced at this run's first save: until then a
            # requeue of this run (--ckpt_path last) would have resumed the earlier run
            last = Path(config.checkpoint.dirpath) / "last.ckpt"
            moved = last.is_file() and not os.replace(last, last.with_name("last.previous.ckpt"))
            if moved:
                _MOVED_ASIDE.append(last)  # put back if this run stops before it trains (a typo, a missing file)
            print(
                f"lm: {config.checkpoint.dirpath} holds {len(earlier)} checkpoint(s) of an earlier run; "
                + ("its last.ckpt is now last.previous.ckpt; " if moved else "")
                + "this run replaces any of the same name (best-step=N.ckpt at a step it saves too) and keeps the "
                "others (to resume that run instead, stop this one and pass --ckpt_path with its checkpoint, or give "
                "this run another trainer.default_root_dir)"
            )
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            args = getattr(logger, "init_args", None)
            if args is not None and "save_dir" in args and args.get("save_dir") in (None, "."):
                # W&B, CSV, TensorBoard: logs of a run live under its root, not in whatever directory it started in.
                # A W&B `dir` given is where W&B writes (WandbLogger takes save_dir, "." by default, over it)
                args["save_dir"] = str(args.get("dir") or root)
                # made here: wandb < 0.19.9 does not create a `dir` that is missing, and writes to /tmp instead
                Path(args["save_dir"]).expanduser().mkdir(parents=True, exist_ok=True)
            if getattr(logger, "class_path", "").endswith("WandbLogger"):
                # A sweep's trials would all carry the experiment's run name: W&B names an agent's runs itself, and
                # lm sweep --local names each after its trial
                if os.environ.get("WANDB_SWEEP_ID"):
                    args["name"] = None
                elif os.environ.get(SWEEP_TRIAL):
                    args["name"] = os.environ[SWEEP_TRIAL]
                if "WANDB_MODE" not in os.environ and not args.get("offline") and not _wandb_logged_in():
                    print(f"W&B: no API key found, logging offline under {root}/wandb (`wandb sync` later)")
                    args["offline"] = True
                if resume_info.get("wandb_run_id") and not args.get("id"):
                    # this run's folders: its checkpoints, its snapshots, and the root (Lightning's hpc_ckpt_N.ckpt)
                    folders = (config.checkpoint.dirpath, config.snapshots.dirpath, config.trainer.default_root_dir)
                    ours = Path(resume_info["path"]).resolve().parent in {Path(f).resolve() for f in folders}
                    if ours:
                        args["id"], args["resume"] = resume_info["wandb_run_id"], "allow"
                    elif _rank() == 0:
                        # a branch (a new decay from a snapshot, say) logged into the original W&B run, its steps
                        # going back and its summary overwriting the original's
                        print(f"W&B: {resume_info['path']} is another run's checkpoint: this run logs as a new W&B run")

    def _parse_ckpt_path(self):
        """Read the checkpoint named by --ckpt_path up front: a corrupted file is a one-line error before any work,
        and its W&B run id lets the resumed run log into the same W&B run."""
        self._resume_info = {}
        config = self.config.get(self.config.get("subcommand") or "", None)
        ckpt_path = config.get("ckpt_path") if config is not None else None
        self._ckpt_path_given = ckpt_path  # `last` and `best` are resolved below, for this run only
        if ckpt_path is None and self.config.get("subcommand") == "validate":
            raise LMError("lm validate needs --ckpt_path (a .ckpt or last): without it the weights are untrained")
        if ckpt_path == "last":  # where our Checkpoint callback writes it (`checkpoint.dirpath` is not resolved yet)
            ckpt_path = _checkpoint_dir(config) / "last.ckpt"
            if not ckpt_path.is_file():
                if self.config.get("subcommand") != "fit":  # validating untrained weights: a meaningless loss
                    raise LMError(f"--ckpt_path last: no {ckpt_path} to validate")
                # From scratch: `--ckpt_path last` can be set and forgotten. Not left to Lightning: its "last" is the
                # newest last*.ckpt, so a requeue of a fresh run that died before its first save resumed the earlier
                # run's last.previous.ckpt, past lm's checks of the checkpoint
                config["ckpt_path"] = None
                if _rank() == 0:
                    previous = ckpt_path.with_name("last.previous.ckpt")
                    earlier = (
                        f" ({previous} is an earlier run's: pass it to resume that run)" if previous.is_file() else ""
                    )
                    print(f"lm: --ckpt_path last: no {ckpt_path} yet; training starts from scratch{earlier}")
                return
            config["ckpt_path"] = str(ckpt_path.absolute())  # the file checked below, for Lightning to restore
        if ckpt_path == "best" and self.config.get("subcommand") == "validate":
            # Lightning knows "best" only in the process that trained ("ModelCheckpoint is not configured to save the
            # best model"); the run's last.ckpt records it
            config["ckpt_path"] = ckpt_path = self._best_checkpoint(config)
        if ckpt_path not in (None, "best", "hpc", "registry"):
            ckpt = read_checkpoint(ckpt_path, mmap=True)  # only its keys: Lightning's restore reads it again
            # Lightning's restore reads these two keys and fails with a bare KeyError (e.g. on an exported file).
            missing = [key for key in ("state_dict", "pytorch-lightning_version") if key not in ckpt]
            if missing:
                raise LMError(
                    f"{ckpt_path}: not a Lightning checkpoint (no {' or '.join(missing)}); "
                    "--ckpt_path takes a .ckpt written by lm fit"
                )
            if self.config.get("subcommand") == "fit" and "optimizer_states" not in ckpt:
                # checkpoint.save_weights_only: Lightning's restore fails with a KeyError traceback after the set-up.
                # A new run in this root moves its last.ckpt aside before the model reads init_from: not found there
                this_last = Path(ckpt_path).resolve() == (_checkpoint_dir(config) / "last.ckpt").resolve()
                elsewhere = " and another trainer.default_root_dir" if this_last else ""
                raise LMError(
                    f"{ckpt_path}: holds the weights only (checkpoint.save_weights_only), not the optimizer and "
                    f"schedule a resume continues; start a new run from it with --model.init_args.init_from "
                    f"{ckpt_path}{elsewhere}"
                )
            self._resume_info = {**(ckpt.get("lm") or {}), "path": str(ckpt_path)}
            self._take_model_args_from(ckpt, ckpt_path)

    @staticmethod
    def _best_checkpoint(config) -> str:
        """The best checkpoint by the monitored metric, as the run's last.ckpt records it."""
        last = _checkpoint_dir(config) / "last.ckpt"
        states = read_checkpoint(last, mmap=True).get("callbacks") or {} if last.is_file() else {}
        # lm's Checkpoint on the configured metric; not the snapshots' (monitor "step") nor another ModelCheckpoint's
        best = next(
            (s.get("best_model_path") for key, s in states.items() if key.startswith(f"{Checkpoint.__qualname__}{{")
             and isinstance(s, dict) and s.get("monitor") == config.checkpoint.monitor),
            None,
        )  # fmt: skip
        if best and not Path(best).is_file():  # recorded as an absolute path: the run's folder may have moved since
            best = str(last.parent / Path(best).name)
        if not last.is_file():
            previous = last.with_name("last.previous.ckpt")
            hint = f" ({previous} is an earlier run's)" if previous.is_file() else ""
            raise LMError(
                f"--ckpt_path best: no {last}, which records the run's best checkpoint{hint}; give a checkpoint's path"
            )
        if not best or not Path(best).is_file():
            raise LMError(f"--ckpt_path best: {last} records no best checkpoint that exists; give its path instead")
        return best

    def _take_model_args_from(self, ckpt: dict, ckpt_path) -> None:
        """The model's arguments on resume (and validate) are the checkpoint's, whether --ckpt_path is a file or
        `last`: the restored optimizer and scheduler state holds the run's lr, betas and weight decay anyway, so a new
        value there would be written into the checkpoints without having been used. How to run it (RUNTIME_ARGS) is
        yours. A different value given here is named in one line rather than dropped silently.

        Replaces LightningCLI's own step, which reads the file a second time and applies only to explicit paths."""
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        config = self.config[self.config.subcommand]
        if class_path is None or not hparams:
            return  # not written through this CLI: keep the config's arguments
        if class_path != config.model.class_path:
            raise LMError(
                f"{ckpt_path} is a {class_path.rsplit('.', 1)[-1]} checkpoint but the config's model is "
                f"{config.model.class_path}; resume with the config it was trained with"
            )
        given = config.model.init_args.as_dict() if config.model.get("init_args") else {}
        started_from = hparams.get("init_from")
        if given.get("init_from") is None:
            # init_from only when given: the fine-tuning YAMLs leave it null, and a resume or validate with them had
            # dropped the checkpoint's (a DPO checkpoint then had no reference model, and an SFT one lost its origin)
            given.pop("init_from", None)
            if started_from and not Path(started_from).expanduser().is_file():
                if _needs_its_init_from(class_path):
                    # A relative path is stored as given: run from another folder, it names nothing. Say whose it is
                    raise LMError(
                        f"{ckpt_path}: its reference model, init_from {started_from}, is not found from here: give "
                        f"the file again with --model.init_args.init_from PATH"
                    )
                # SFT resumes from its own weights; only DPO needs the file again (its reference). Moved since: unset.
                hparams["init_from"] = None
        for key in RUNTIME_ARGS:
            if key in given:
                hparams[key] = given[key]
        ignored = _differences(given, hparams, skip="arch")
        if not started_from:  # with init_from the checkpoint's arch is that file's, not the config's
            # vocab_size: set by the tokenizer
            ignored += _differences(
                given.get("arch") or {}, hparams.get("arch") or {}, skip="vocab_size", prefix="arch."
            )
        self.config = self.parser.parse_object(
            {self.config.subcommand: {"model": {"class_path": class_path, "dict_kwargs": hparams}}}, self.config
        )
        if ignored and _rank() == 0:
            print(
                f"lm: {ckpt_path}: the model keeps the checkpoint's arguments (only {', '.join(RUNTIME_ARGS)} may "
                f"change); ignored here: {'; '.join(ignored)}"
            )

    def after_instantiate_classes(self):
        super().after_instantiate_classes()
        config = self.config[self.subcommand]  # as given: the link's value went to the instantiated data module only
        given, linked = _given_unless_default(config.data, "block_size"), getattr(self.datamodule, "block_size", None)
        if given is not None and linked is not None and given != linked:
            # add_arguments_to_parser links it to the model's context, and the link replaced a given value silently
            init_from = getattr(self.model, "hparams", {}).get("init_from")
            whose = f" (init_from {init_from}'s)" if init_from else "; set model.init_args.arch.block_size instead"
            raise LMError(
                f"data.init_args.block_size {given}: the data windows take the model's context, {linked}{whose}"
            )
        self._calm_default_progress_bar()
        if type(self.trainer.profiler) is PassThroughProfiler:  # Lightning's default: no profiler was asked for
            self.trainer.profiler = NoProfiler()
        # Throughput before the checkpoint callbacks, which Lightning has put last: a checkpoint saved at a step's end
        # must hold that step's tokens, and its write must fall outside the step's throughput window
        callbacks = self.trainer.callbacks
        first_save = next((i for i, c in enumerate(callbacks) if isinstance(c, ModelCheckpoint)), len(callbacks))
        callbacks.insert(first_save, Throughput())
        callbacks += [RNGState(), PreemptionSignal(), _TrainingStarted()]
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        self.trainer.callbacks.append(DestroyProcessGroup())  # clean gloo/NCCL exit (lm/distributed.py)
        self.model.run_config = self._parser(self.subcommand).dump(self._given_config, skip_none=False)

    def instantiate_trainer(self, **kwargs):
        """`trainer.enable_checkpointing: false` runs without lm's checkpoint and snapshot callbacks (a benchmark, a
        throwaway trial): Lightning refused them as a ModelCheckpoint the user had not given."""
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        keys = self._parser(self.subcommand).callback_keys
        if trainer_config.get("enable_checkpointing") is False:
            keys = [k for k in keys if k not in ("checkpoint", "snapshots")]
        from lm.eval import refuse_evaluations_sharing_a_name  # (lm.eval stays off the path of the other verbs)

        # Before the Trainer is built: two TaskAccuracy callbacks of one task share a state key, which Lightning
        # refuses there with a RuntimeError traceback
        callbacks = trainer_config.get("callbacks") or []
        refuse_evaluations_sharing_a_name(callbacks if isinstance(callbacks, list) else [callbacks])
        return self._instantiate_trainer(trainer_config, [self._get(self.config_init, k) for k in keys])

    def _calm_default_progress_bar(self) -> None:
        """Lightning's default progress bar (rich's where rich is installed) becomes tqdm's, redrawn every
        PROGRESS_BAR_REFRESH_RATE batches: in a terminal, rich's redraw after every batch cost a small model's CPU step
        ~10% whatever its refresh rate, tqdm's after every batch 6%, tqdm's every 10 batches 1.3% (docs/benchmarks.md,
        "The progress bar's share"). Where the output is not a terminal (a file, a pipe; also a notebook's) it becomes
        lm's ProgressLines, a plain line every trainer.log_every_n_steps steps. A progress bar given in
        trainer.callbacks is left as configured."""
        bar = self.trainer.progress_bar_callback
        if bar is None or type(bar) not in (RichProgressBar, TQDMProgressBar):
            return
        if _names_a_progress_bar(self.config[self.subcommand].trainer.get("callbacks")):
            return
        if _stdout_is_a_terminal():
            calm = TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_RATE)
        else:
            calm = ProgressLines(every=self.trainer.log_every_n_steps or 50)  # 0: nothing logged, a line every 50
        self.trainer.callbacks[self.trainer.callbacks.index(bar)] = calm


class _TrainingStarted(Callback):
    """From the start of training on, the earlier run's last.ckpt stays moved aside (_put_back_the_earlier_last)."""

    def on_train_start(self, trainer, pl_module):
        _MOVED_ASIDE.clear()


def _put_back_the_earlier_last() -> None:
    """A fresh fit moves the earlier run's last.ckpt aside at launch, so that a requeue of this run cannot resume that
    one. A fit that fails before it trains (a typo, a missing data file) has changed nothing: the earlier last.ckpt is
    put back, or the corrected command's --ckpt_path last would have started from scratch."""
    while _MOVED_ASIDE:
        last = _MOVED_ASIDE.pop()
        previous = last.with_name("last.previous.ckpt")
        if previous.is_file() and not last.exists():
            os.replace(previous, last)
            print(f"lm: this run stopped before it trained; {last} is the earlier run's again")


# `lm fit|validate --help` where lm does otherwise than Lightning's docstrings say: --ckpt_path described `last` as
# the previous trainer.fit call's checkpoint (lm reads the run's last.ckpt) and said nothing of lm validate's `best`
LM_HELP = {
    ("fit", "ckpt_path"): "Resume training from this checkpoint: a .ckpt written by lm fit, or `last`, the run's "
    "<checkpoint.dirpath>/last.ckpt (with none there yet, training starts from scratch and says so: a requeued job can "
    "always pass it). The model keeps the checkpoint's model.init_args but for " + ", ".join(RUNTIME_ARGS) + ".",
    ("validate", "ckpt_path"): "The weights to validate (required): a .ckpt written by lm fit; `last`, the run's "
    "<checkpoint.dirpath>/last.ckpt; or `best`, the best checkpoint by checkpoint.monitor that the run's last.ckpt "
    "records.",
    (None, "checkpoint.save_on_exception"): "Whether to save a checkpoint and last.ckpt when training stops on an "
    "exception, or on SIGTERM/SIGUSR1 (preemption: after the step in progress); --ckpt_path last resumes from it.",
}
_DOCUMENTED_DEFAULT = re.compile(r"\s*Default: ``([^`]*)``\.?")


def _help_where_lm_differs(parser, subcommand: str) -> None:
    """lm's help for the arguments whose meaning it changes (LM_HELP), and no "Default: ``X``" from Lightning's
    docstrings where lm sets another default: `--checkpoint.save_on_exception` read "Default: ``False``. (type: bool,
    default: True)". jsonargparse's own "(default: ...)" stays; it shows the value in force."""
    for action in parser._actions:
        help_text = LM_HELP.get((subcommand, action.dest)) or LM_HELP.get((None, action.dest))
        if help_text is not None:
            action.help = help_text
            continue
        documented = _DOCUMENTED_DEFAULT.search(action.help or "")
        default = parser.get_default(action.dest) if documented else None
        # None: a default Lightning leaves to resolve itself (precision, log_every_n_steps), which its docs name
        if documented and default is not None and _literal(documented.group(1)) != default:
            action.help = _DOCUMENTED_DEFAULT.sub("", action.help, count=1)


def _literal(text: str):
    """A docstring's default (``True``, ``"auto"``, ``1.0``) as a value; the text itself if it is code
    (``os.getcwd()``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_trainer_values(trainer) -> None:
    """Trainer values Lightning takes without a check: 0 failed with a ZeroDivisionError at the first step, a negative
    clip value turned every update into gradient ascent."""
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not clip >= 0:
        raise LMError(f"trainer.gradient_clip_val must be >= 0 (0 or null: no clipping), got {clip}")
    if trainer.get("accumulate_grad_batches", 1) < 1:
        raise LMError(f"trainer.accumulate_grad_batches must be >= 1, got {trainer.accumulate_grad_batches}")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool) and interval < 1:
        raise LMError(f"trainer.val_check_interval must be >= 1 batch (or a fraction of an epoch), got {interval}")
    # 0 failed with a ZeroDivisionError as training started (after the data was prepared)
    epochs = trainer.get("check_val_every_n_epoch")
    if epochs is not None and epochs < 1:
        raise LMError(
            f"trainer.check_val_every_n_epoch must be >= 1 (null: count val_check_interval across epochs), got {epochs}"
        )


def _note_arch_replaced_by_init_from(model) -> None:
    """A fresh fine-tuning run takes init_from's architecture (keeping its own dropout): an arch field given here
    that differs from that file's is named in one line, as a resume names them, instead of being dropped silently."""
    args = model.init_args.as_dict() if model.get("init_args") else {}
    init_from, given = args.get("init_from"), args.get("arch")
    if not init_from or given is None:
        return
    theirs = (read_checkpoint(init_from, mmap=True).get("lm") or {}).get("model_config") or {}
    # Fields left at their defaults were not given; dropout is this run's, vocab_size the tokenizer's
    defaults = asdict(GPTConfig())
    given = {k: v for k, v in given.items() if k != "dropout" and _plain(v) != _plain(defaults.get(k))}
    ignored = _differences(given, theirs, skip="vocab_size", prefix="arch.", whose="init_from")
    if ignored:
        print(f"lm: the model takes init_from {init_from}'s architecture; ignored here: {'; '.join(ignored)}")


def _note_fine_tuning_from_scratch(config) -> None:
    """SFT data (loss on the replies) with no init_from trains a new model from random weights: legitimate (a task
    learned from scratch), but a forgotten --model.init_args.init_from silently fine-tuned GPTConfig's default 85M
    model with a char vocabulary. One line says so."""
    data, model = config.get("data") or {}, config.get("model") or {}
    data_args, model_args = data.get("init_args") or {}, model.get("init_args") or {}
    sft = str(data.get("class_path", "")).endswith("ChatData") and data_args.get("supervise") == "assistant"
    if sft and not model_args.get("init_from"):
        print(
            "lm: fine-tuning data without model.init_args.init_from: this trains a new model from random weights "
            "(to fine-tune one, give --model.init_args.init_from CKPT --data.init_args.tokenizer CKPT)"
        )


def _checkpoint_dir(config) -> Path:
    """Where the run's Checkpoint callback writes: checkpoint.dirpath, by default <trainer.default_root_dir>/checkpoints
    (before_instantiate_classes fills it in; --ckpt_path is read before that)."""
    return Path(config.checkpoint.dirpath or Path(config.trainer.default_root_dir) / "checkpoints")


def _needs_its_init_from(class_path: str) -> bool:
    """Whether a model class reads its init_from file again on resume: preference tuning's reference model."""
    from lm.preference import PreferenceModel

    model_class = import_class(class_path)
    return isinstance(model_class, type) and issubclass(model_class, PreferenceModel)


def _stdout_is_a_terminal() -> bool:
    return sys.stdout.isatty()


def _names_a_progress_bar(callbacks) -> bool:
    """Whether the config's trainer.callbacks (one or a list, by class_path) hold a progress bar. Read from the config:
    the instantiated list is the one Lightning adds its default bar to."""
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        cls = import_class(str(getattr(callback, "class_path", "") or ""))
        if isinstance(cls, type) and issubclass(cls, ProgressBar):
            return True
    return False


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler, which records nothing, without its cost. Lightning wraps each hook call in
    `with profiler.profile(name)`, ~70 a step (a step's six callback hooks go to each of lm fit's nine callbacks), and
    the default builds and runs a generator context manager for each: 0.8 us against 0.16 us for a shared no-op
    context, measured on the 2-core CPU, ~0.05 ms a step (docs/benchmarks.md). A profiler given in trainer.profiler
    is kept."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str):
        return self._nothing


def _given_unless_default(group, name: str):
    """group.init_args[name] where it differs from its class's default (the value a config gave), else None."""
    value = (group.get("init_args") or {}).get(name)
    cls = import_class(group.get("class_path") or "")
    try:
        default = inspect.signature(cls).parameters[name].default
    except (TypeError, ValueError, KeyError):  # no class (None), no signature, no such argument
        return None
    return None if value == default else value


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    # Where wandb itself looks: $NETRC (else ~/.netrc), under the host of $WANDB_BASE_URL (a self-hosted server)
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


# ---- the other verbs ---------------------------------------------------------------------------------------------


def generate_command(argv: list[str]) -> None:
    """lm generate: sample text from a checkpoint."""
    p = ArgumentParser(prog="lm generate", description="Sample text from a checkpoint.")
    p.add_argument("--ckpt", required=True, help="path to a .ckpt written by lm fit")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top_k", type=int, default=200, help="0: no top-k filter")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    args = p.parse_args(argv)

    import torch

    from lm.checkpoint import load_for_inference
    from lm.generate import check_sampling, stream_text

    # The engine checks these too, but only once the first sample starts, after its prompt is printed.
    check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    for flag in ("max_new_tokens", "num_samples"):  # 0 or less would print the prompt alone, or nothing, and succeed
        if getattr(args, flag) < 1:
            raise LMError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    model, tokenizer, _, device = load_for_inference(args.ckpt, args.device)
    generator = torch.Generator(device).manual_seed(args.seed)
    undecodable_bytes_pass_through()
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt, end="", flush=True)
        # stop_ids and vocab_size: stream_text's defaults, the tokenizer's EOS and size.
        for piece in stream_text(
            model,
            tokenizer,
            prompt_ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
        ):
            print(piece, end="", flush=True)
        print()


def tokenizer_command(argv: list[str]) -> None:
    """lm tokenizer train: train a tokenizer on a data source and save it (lm_tokenizer.json, and tokenizer.json for
    bpe)."""
    p = ArgumentParser(prog="lm tokenizer", description="Train a tokenizer on a data source.")
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a char or byte-level BPE tokenizer")
    t.add_argument("--source", required=True, help="same forms as data.source: path/glob, hub id, builtin:NAME")
    t.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    t.add_argument(
        "--vocab_size",
        type=int,
        default=None,
        help="bpe only (default 8192); includes the 6 special tokens; a small source may give fewer",
    )
    t.add_argument("--text_field", default="text")
    t.add_argument("--source_config", help="a hub dataset's configuration (e.g. sample-10BT), as data.source_config")
    t.add_argument("--source_split", default="train", help="a hub dataset's split (default: train)")
    t.add_argument("--source_revision", help="a hub dataset's revision (commit, tag or branch)")
    t.add_argument("--source_data_dir", help="a folder of a hub dataset's repository (e.g. helpful-base)")
    t.add_argument("--out", required=True, help="directory to write")
    args = p.parse_args(argv)

    from lm.data import (
        document_texts,
        load_documents,
        refuse_a_source_without_text,
        refuse_hub_options_of_a_local_source,
    )
    from lm.tokenizer import build_tokenizer, trained_tokenizer_size

    refuse_hub_options_of_a_local_source(
        args.source, args.source_config, args.source_split, args.source_revision, args.source_data_dir
    )
    if args.kind == "char" and args.vocab_size is not None:  # refused, not ignored: it trained the source's characters
        raise LMError("--vocab_size is for --kind bpe: a char tokenizer has the source's characters + 6 special tokens")
    spec = "char" if args.kind == "char" else f"bpe:{8192 if args.vocab_size is None else args.vocab_size}"
    asked = trained_tokenizer_size(spec)  # a vocab_size too small is refused now, not after reading the source

    out = Path(args.out)
    created = not out.exists()
    try:  # before training, which can take minutes
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(args.out, e) from None
    try:
        documents = load_documents(
            args.source,
            source_config=args.source_config,
            source_split=args.source_split,
            source_revision=args.source_revision,
            source_data_dir=args.source_data_dir,
            text_field=args.text_field,
        )
        # Refused as PretrainData refuses it: --kind bpe saved a tokenizer of the 256 bytes alone, and exited 0
        refuse_a_source_without_text(documents, args.source, args.text_field)
        # in batches, as PretrainData trains one: documents["text"] made one Python list of the whole column
        tok = build_tokenizer(spec, texts=lambda: document_texts(documents))
    except BaseException:  # a source without the text field, Ctrl-C: no empty folder left behind
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    try:
        tok.save(args.out)
    except OSError as e:
        raise cannot_write(args.out, e) from None
    # HF's BPE trainer stops early, without a word, once every word of the source is a single token
    short = (
        f" (not the {asked} asked: no pair of tokens within a word is left to merge)" if tok.vocab_size < asked else ""
    )
    print(f"saved {tok.kind} tokenizer with {tok.vocab_size} ids to {args.out}{short}")


COMMANDS = {
    "generate": generate_command,
    "tokenizer": tokenizer_command,
    "chat": chat_command,
    "tasks": tasks_command,
    "serve": serve_command,
    # imported when used, so lm.eval / lm.export (and transformers) stay off the path of the other verbs
    "eval": lambda argv: __import__("lm.eval", fromlist=["eval_command"]).eval_command(argv),
    "export": lambda argv: __import__("lm.export", fromlist=["export_command"]).export_command(argv),
    "sweep": lambda argv: __import__("lm.sweep", fromlist=["sweep_command"]).sweep_command(argv),
}


USAGE = """usage: lm COMMAND [ARGS]   (lm COMMAND --help for its arguments)

training (LightningCLI: every model, data and Trainer argument is a config key)
  fit        train: lm fit --config experiments/debug.yaml [--ckpt_path last]
  validate   validate a checkpoint: lm validate --config X.yaml --ckpt_path CKPT
around checkpoints
  generate   continue a prompt
  chat       talk to a fine-tuned checkpoint in the terminal
  serve      an OpenAI-compatible HTTP API
  eval       loss, perplexity and bits per byte of text, HellaSwag, the built-in tasks
  tasks      exact-match accuracy on the built-in chat tasks (addition, reverse, count)
  export     a Hugging Face transformers model directory
other
  tokenizer  train a tokenizer on a data source
  sweep      hyperparameter sweeps (sweeps/*.yaml) on W&B, or locally with Optuna

User errors print one line and exit with code 2; `--debug` anywhere on the command line shows their traceback.
`lm --version` prints the version."""


def _unknown_command(name: str) -> str:
    """A one-line error for a first argument that is no command, with the nearest one."""
    commands = [*LIGHTNING_COMMANDS, *COMMANDS]
    near = difflib.get_close_matches(name, commands, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"unknown command {name!r}{hint}; the commands are {', '.join(commands)} (`lm --help` says what each does)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        print(f"lm {lm.__version__}")
        sys.exit(0)
    if not argv[0].startswith("-") and argv[0] not in (*LIGHTNING_COMMANDS, *COMMANDS):
        print(f"error: {_unknown_command(argv[0])}", file=sys.stderr)
        sys.exit(2)
    debug = "--debug" in argv  # show the traceback of user errors too
    argv = [a for a in argv if a != "--debug"]
    OneLineErrorParser.verbose_errors = debug
    # Attribute docstrings (GPTConfig's fields) become help text. Parsing them reads the classes' source, ~0.7 s of
    # every launch on a 2-core CPU, so only when help (or a commented config) is shown.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=_shows_help(argv))
    _MOVED_ASIDE.clear()  # another main() of this process (tests) moved nothing of this run's
    try:
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
        else:
            # We pass argv explicitly (minus --debug); LightningCLI warns about that when sys.argv is set too.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = LMCLI(args=argv)
            _report_stop(cli)
    except BrokenPipeError:  # `lm generate ... | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        sys.exit(128 + signal.SIGPIPE)
    except Exception as e:
        _put_back_the_earlier_last()
        # jsonargparse wraps an error raised in a constructor (a bad model.init_args value) in its own ValueError,
        # with ours as the cause: look down the chain.
        user_error = e
        while user_error is not None and not isinstance(user_error, LMError):
            user_error = user_error.__cause__
        if user_error is None and _lightning_user_error(e):
            user_error = str(e).strip().splitlines()[0]
            if "No supported gpu backend found" in user_error:  # the GPU experiments name accelerator: gpu
                user_error += (
                    " (the config asks for trainer.accelerator gpu; to try it on a CPU: --trainer.accelerator cpu "
                    "--trainer.precision 32-true --model.init_args.compile false)"
                )
        if user_error is None and _another_rank_failed(e) and not debug:
            # rank 0 has printed the error (a missing data file, say) and left; its peers' collectives then fail
            # one write per line: every rank shares the terminal, and print() writes the text and newline apart
            sys.stderr.write(f"error: rank {_rank()} stopped because another rank did (its error is above)\n")
            sys.exit(1)
        if user_error is None or debug:
            raise
        sys.stderr.write(f"error: {user_error}\n")
        sys.exit(2)
    except SIGTERMException as e:  # (a SystemExit, handled before that): a requeue must not find the earlier last.ckpt
        # SIGTERM/SIGUSR1: the step finished and checkpoint.save_on_exception wrote a checkpoint and last.ckpt
        # (lm.reliability's Checkpoint notes on the exception what it wrote), unless the config turned that off.
        last = getattr(e, "lm_last_checkpoint", "")
        if argv[0] != "fit":  # lm validate or test: nothing to resume
            print("stopped by a signal")
        elif getattr(e, "lm_saved_now", False):
            print("stopped by a signal after saving a checkpoint; resume with the same command and --ckpt_path last")
        elif last:
            print(
                f"stopped by a signal without saving (checkpoint.save_on_exception is false, or the step was not "
                f"whole); --ckpt_path last resumes from the checkpoint written before, {last}"
            )
        else:
            print(
                "stopped by a signal; no last.ckpt was written (trainer.enable_checkpointing, checkpoint.save_last or "
                "checkpoint.save_on_exception is false), so --ckpt_path last has nothing to resume from"
            )
        if os.environ.get("WANDB_SWEEP_ID"):
            # A W&B sweep's trial: its agent stops a run with SIGTERM (early_terminate, the UI's stop) and counts an
            # exit code > 0 as a failed run, shutting itself down after 5 of them (3 in its first minute)
            sys.exit(0)
        sys.exit(128 + signal.SIGTERM)
    except (KeyboardInterrupt, SystemExit) as e:
        # Ctrl-C (which Lightning turns into exit 1 inside fit), say while a corpus is tokenized: nothing trained
        _put_back_the_earlier_last()
        if isinstance(e, KeyboardInterrupt) and not debug:  # lm generate, lm tokenizer train...: the user's stop
            print(file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        raise


def _another_rank_failed(e: Exception) -> bool:
    """A collective that failed on a rank other than 0 because a peer process is gone (gloo says so in its message;
    torch raises its DistError types for the rest)."""
    if _rank() == 0:
        return False
    return isinstance(e, torch.distributed.DistError) or "remote worker" in str(e) or "closed by peer" in str(e)


def _rank() -> int:
    """This process's global rank: the process group's if there is one, else the launcher's environment (torchrun
    sets RANK; Lightning's own launcher LOCAL_RANK in the processes it starts; srun SLURM_PROCID)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _lightning_user_error(e: Exception) -> bool:
    """Lightning's own refusals of a setting: no GPU for accelerator gpu, a --ckpt_path of best/hpc with nothing
    behind it, a strategy the accelerator cannot run (fsdp on a CPU). Their first line says what is wrong; the
    traceback says nothing more to a user."""
    if isinstance(e, MisconfigurationException) or (isinstance(e, ValueError) and "ckpt_path" in str(e)):
        return True
    # The accelerator connector checks devices, accelerator, strategy and precision against each other, itself or
    # through the accelerator it picks (`devices: -1` on the CPU: a TypeError from fabric's CPU accelerator)
    connector = os.path.join("trainer", "connectors", "accelerator_connector.py")
    frame, through_connector = e.__traceback__, False
    while frame is not None:
        through_connector = through_connector or frame.tb_frame.f_code.co_filename.endswith(connector)
        frame = frame.tb_next
    return isinstance(e, (ValueError, TypeError)) and through_connector


class _SaveFitConfig(SaveConfigCallback):
    """Writes <root>/config.yaml for fit only (`lm validate` on a run's root used to overwrite the training config),
    with the config as given (LMCLI.before_instantiate_classes) but the architecture that trains: vocab_size from the
    tokenizer, init_from's shape. So it is written at fit start, once configure_model has resolved those."""

    def __init__(self, parser, config, *, given=None, **kwargs):
        super().__init__(parser, given if given is not None else config, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass

    def on_fit_start(self, trainer, pl_module) -> None:
        arch = getattr(pl_module, "arch", None)
        if arch is not None and self.config.get("model.init_args.arch") is not None:
            self.config = self.config.clone()
            written = self.config.get("model.init_args.arch")
            for key, value in asdict(arch).items():
                if key in written:
                    written[key] = value
        super().setup(trainer, pl_module, "fit")


def _report_stop(cli: LMCLI) -> None:
    """A run stopped by too many non-finite steps exits non-zero, naming the step and the checkpoint kept."""
    if getattr(cli.model, "stopped_at_step", None) is not None:
        last = Path(cli.config[cli.subcommand].checkpoint.dirpath) / "last.ckpt"
        # The steps done, as the progress and validation lines and last.ckpt count them (a count that reached the
        # host late, at a logging step on CUDA, stops the run there: past the module's stopped_at_step)
        step = cli.trainer.global_step
        print(
            f"error: training stopped at step {step}: {cli.model.skipped_steps} steps had a non-finite loss or "
            f"gradient (limit model.max_skipped_steps={cli.model.hparams.max_skipped_steps}); the last good weights "
            f"are in {last}",
            file=sys.stderr,
        )
        sys.exit(3)


if __name__ == "__main__":
    main()
