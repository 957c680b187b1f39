"""What keeps long runs safe: atomic checkpoint files, RNG state in checkpoints, and SIGUSR1 as a preemption signal.

The LightningCLI in `lm.__main__` installs all three on every run; `docs/reliability.md` lists every fault and the
test that covers it.
"""

import glob
import os
import random
import signal
import socket
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lm.callbacks import inside_accumulation_window
from lm.checkpoint import read_checkpoint
from lm.distributed import sum_over_ranks


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A process killed mid-write (SIGKILL, a full disk) leaves the previous checkpoint intact instead of a truncated
    one. Loading goes through `read_checkpoint`: weights_only=True, and a one-line error naming a corrupted file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporary_files(path)
        tmp = path.with_name(f".{path.name}.tmp@{socket.gethostname()}@{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu")


def remove_stale_temporary_files(path: Path) -> list[Path]:
    """Remove the temporary files that writers killed mid-write (SIGKILL, out of memory) left beside `path`: each
    is a checkpoint's size, and every kill left another. Those of every checkpoint in the folder, not only of
    `path`'s name: a top-k, snapshot or HPC checkpoint is never written under the same name again. Only this host's,
    of processes that are gone: another host's writer may still be running (a pid means nothing here)."""
    removed = []
    # The older name, without the host (.last.ckpt.tmp-PID), is taken for this host's: two hosts writing one
    # checkpoint file at once is no working set-up anyway
    host = glob.escape(socket.gethostname())
    for pattern, separator in ((f".*.tmp@{host}@*", "@"), (".*.tmp-*", ".tmp-")):
        removed += _remove_if_writer_gone(path.parent.glob(pattern), separator)
    return removed


def _remove_if_writer_gone(files, separator: str) -> list[Path]:
    removed = []
    for tmp in files:
        pid = tmp.name.rsplit(separator, 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except OSError:  # it exists, under another user: alive
            pass
    return removed


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that `last.ckpt` always holds the final step when training ends, that
    every checkpoint holds whole optimizer steps, and that with periodic saves each validation's score is ranked when
    the validation ends (see _save_after_validation).

    (Lightning writes last.ckpt at train end only if it never wrote one before, so a run whose last validation came
    before its last step would leave a stale last.ckpt. And val_check_interval counts micro-batches, so a validation
    can fall inside an accumulation window: the checkpoint Lightning writes there holds half a step, whose gradients a
    resume from it loses. Such a validation's checkpoints are written at the step's end instead, with its scores, and a
    stop asked for inside a window (max_time's Timer, a callback's should_stop) takes effect at the step's end.)
    """

    _save_at_step_end = False  # a validation inside an accumulation window: its checkpoints wait for the step's end
    _stop_at_step_end = False  # a stop asked for inside a window (max_time, a callback): held until the step's end

    _state_key: tuple[tuple, str] | None = None  # (the settings it was built from, the key)

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key (its settings' repr), built again only when they change: Lightning reads it for every
        hook it calls on this callback, ~7 times a step."""
        settings = (self.monitor, self.mode, self._every_n_train_steps, self._every_n_epochs, self._train_time_interval)
        if self._state_key is None or self._state_key[0] != settings:
            self._state_key = (settings, super().state_key)
        return self._state_key[1]

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self._save_at_step_end = self._stop_at_step_end = False

    def on_validation_start(self, trainer, pl_module):
        super().on_validation_start(trainer, pl_module)
        if self.monitor is not None and self._saves_periodically():
            self._score_before_validation = self._monitor_candidates(trainer).get(self.monitor)

    def _saves_periodically(self) -> bool:
        return self._every_n_train_steps >= 1 or self._train_time_interval is not None

    def _save_after_validation(self, trainer, pl_module) -> None:
        """Lightning's saves at a validation's end, and with periodic saves (every_n_train_steps, train_time_interval)
        the top-k ranking of the validation's score.

        Lightning ranks such a checkpoint's top-k only at the periodic saves, by the score of the validation before
        them: a validation's score counted only when a save came after it, at weights it had not scored, and a save
        at the validation's own step, made just before it, kept Lightning from saving after it. So the run's last
        validation never counted: the best score (what lm sweep ranks a trial by) and `best-*.ckpt` were an earlier
        validation's."""
        deferred = getattr(self, "_defer_save_until_validation", False)  # then Lightning ranks at this end itself
        super().on_validation_end(trainer, pl_module)
        if deferred or self.monitor is None or not self._saves_periodically() or self._every_n_epochs >= 1:
            return
        if trainer.fast_dev_run or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if self._should_save_on_train_epoch_end(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        score = candidates.get(self.monitor)
        before = self.__dict__.pop("_score_before_validation", None)
        if score is None or (before is not None and torch.equal(score, before)):
            return  # not a score this validation produced (a `step` or train metric): the periodic saves rank it
        self._save_topk_checkpoint(trainer, candidates)
        if self._last_global_step_saved == trainer.global_step:  # saved now, or last.ckpt just before: its best is old
            self._save_last_checkpoint(trainer, candidates)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking and inside_accumulation_window(trainer):
            self._save_at_step_end = True
            if trainer.should_stop:  # EarlyStopping decides here, after this batch's on_train_batch_end below
                trainer.should_stop, self._stop_at_step_end = False, True
            return
        self._save_after_validation(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning runs checkpoint callbacks after the others, so a stop a callback (max_time's Timer) asked for in
        # this micro-batch is seen here: stopped mid-window, last.ckpt would hold half a step
        if trainer.should_stop and inside_accumulation_window(trainer):
            trainer.should_stop, self._stop_at_step_end = False, True
        if inside_accumulation_window(trainer):
            # Lightning's periodic save (every_n_train_steps, train_time_interval) looks at the step count only, which
            # stays put through the next window: a save it put off at an epoch's end came a micro-batch later,
            # holding half a step
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._save_last_before_any_validation(trainer)
        if self._save_at_step_end:
            self._save_at_step_end = False
            self._save_after_validation(trainer, pl_module)  # the validation's scores are still the monitored ones
        if self._stop_at_step_end:
            self._stop_at_step_end, trainer.should_stop = False, True

    def _save_last_before_any_validation(self, trainer) -> None:
        """Lightning puts off every save, last.ckpt's too, while the monitored metric (val/loss) does not exist yet:
        `every_n_train_steps` wrote nothing before the first validation, and a run killed before it resumed from
        nothing. last.ckpt is written now; the step is not marked saved, so a validation at this step still writes
        the best checkpoint (and last.ckpt again)."""
        every = self._every_n_train_steps
        if not (self.save_last and every >= 1 and trainer.global_step % every == 0):
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            return
        saved = self._last_global_step_saved
        self._save_last_checkpoint(trainer, candidates)
        self._last_global_step_saved = saved

    def on_train_end(self, trainer, pl_module):
        if self._save_at_step_end:  # the run ended inside the window after all (the data ran out): save what it has
            self._save_at_step_end = False
            self._save_after_validation(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        """On SIGTERM/SIGUSR1 or a crash, refresh last.ckpt only: a top-k file named "best" would be misleading. Not
        inside an accumulation window (a crash or Ctrl-C there): that last.ckpt would hold half a step, so the one
        from the last whole step is kept."""
        # For lm fit's closing line: the last.ckpt a `--ckpt_path last` would resume from ("" for none), and whether
        # it was written now, at this step, or before
        exception.lm_last_checkpoint = self.last_model_path if self.save_last else ""
        exception.lm_saved_now = (
            bool(exception.lm_last_checkpoint) and self._last_global_step_saved == trainer.global_step
        )
        if not (self._should_save_on_exception(trainer) and self.save_last):
            return
        name = type(exception).__name__
        # Where a resume starts is the count of processed micro-batches (a batch is processed once its optimizer step,
        # if it had one, is done): a whole step only if that count closes a window. (inside_accumulation_window
        # counts batches started: a crash in the forward or backward of a window's last one would pass it.)
        # An epoch's last batch steps whatever the count (a shorter last window).
        progress = trainer.fit_loop.epoch_loop.batch_progress
        processed = progress.current.processed
        epoch_done = progress.is_last_batch and processed == progress.current.ready
        if trainer.state.fn == "fit" and processed % trainer.accumulate_grad_batches and not epoch_done:
            kept = f"kept {self.last_model_path}" if self.last_model_path else "no checkpoint saved"
            rank_zero_info(
                f"lm: {name} inside a gradient-accumulation window: {kept} (a save here would hold half a step)"
            )
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        exception.lm_last_checkpoint, exception.lm_saved_now = self.last_model_path, True
        rank_zero_info(f"lm: {name} during training, saved {self.last_model_path}")


class RNGState(L.Callback):
    """Saves and restores the Python, NumPy and torch RNG states, so dropout masks after a resume are the ones an
    uninterrupted run would have drawn. Stored as plain lists and tensors so `weights_only=True` loads them.

    With several processes each rank's states are gathered into the checkpoint (which rank 0 alone writes) and each
    rank gets its own back: every rank's GPU draws its own dropout masks, and rank 0's process never used the
    generators of the other ranks' devices. (Saves run on every rank, so the gather is one more collective per save.)

    Own masks need own streams: Lightning seeds every rank with the same seed (`seed_everything`), so on a fresh fit
    all ranks would draw the same dropout masks, and N ranks of batch B would not be one device of batch N x B. So at
    the start of training (after the weights are made, which must agree) every rank but 0 re-seeds its generators
    from the seed and its rank, as nanoGPT offsets its seed by the rank. Rank 0 keeps its stream: one device trains
    as before. Not after a restore, where each rank has its own state back, unless the world size changed (then every
    rank took rank 0's).
    """

    def __init__(self):
        self._restored_own_state = False

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank > 0 and not self._restored_own_state:
            # A large odd step between ranks: rank 1 of seed s must not replay rank 0 of seed s + 1. The step too: after
            # a resume with another world size (rank 0's state restored, and with it the seed) a rank must not replay
            # the masks of the run's first steps.
            seed = (torch.initial_seed() + trainer.global_rank * 0x9E3779B97F4A7C15 + trainer.global_step) % 2**64
            torch.manual_seed(seed)  # also every CUDA device's generator
            np.random.seed(seed % 2**32)
            random.seed(seed)
        self._restored_own_state = False  # this fit's; a later fit of the same Trainer starts afresh

    @staticmethod
    def _local_state() -> dict[str, Any]:
        np_state = np.random.get_state()
        version, py_state, gauss = random.getstate()
        state = {
            "python": [version, list(py_state), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_device"] = torch.cuda.get_rng_state()  # this process's device
        return state

    def state_dict(self) -> dict[str, Any]:
        state = self._local_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            by_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(by_rank, state)
            state = {**state, "by_rank": by_rank}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        by_rank = state.get("by_rank") or []
        self._restored_own_state = not distributed
        if distributed and len(by_rank) == torch.distributed.get_world_size():
            state = by_rank[rank]  # else another world size: every rank takes rank 0's, then parts in on_train_start
            # Written before the ranks parted (all seeded alike, so all states equal): they part now
            self._restored_own_state = any(not torch.equal(s["torch"], by_rank[0]["torch"]) for s in by_rank[1:])
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available():
            if "cuda_device" in state:
                torch.cuda.set_rng_state(state["cuda_device"])
            elif "cuda" in state:  # checkpoints written before: every device's state, as rank 0 saw them
                torch.cuda.set_rng_state_all(state["cuda"])


def _no_broadcast() -> None:
    """Stands in for Lightning's per-batch broadcast of the SIGTERM flag (see PreemptionSignal)."""


class PreemptionSignal(L.Callback):
    """SIGTERM and SIGUSR1: finish the current step, save a checkpoint (`checkpoint.save_on_exception`), exit 143.

    The handlers only note the signal; the run stops at the next optimizer step boundary, where every rank agrees:
    - "The current step" is the whole optimizer step. Lightning stops after the batch during which the signal came,
      also between the micro-batches of an accumulated step, which would save a checkpoint whose step is half
      accumulated (those gradients lost, the resumed step taken on the rest alone).
    - A validation that has begun runs to its end first. Lightning stops it after the current batch and saves a
      checkpoint that resumes past it, so that validation (if it was the last, the run's score) was lost.
    - Under DDP, Lightning's SIGTERM handler broadcasts from inside the handler: a collective at whatever point the
      signal interrupts, which hung every rank when rank 0 was in rank-0-only work (sampling, logging) while the
      others waited in validation's metric sync. Here the ranks agree with one all-reduce of the flag, at the end of
      each validation and at each optimizer step that logs (every `trainer.log_every_n_steps`, whose logging reads
      the loss anyway): reading the flag waits for the GPU, so doing it every step would cost the host its lead
      over the device. Lightning's own broadcast of the flag before every batch (the same host sync) is switched
      off while these handlers are in place: it has nothing left to tell. A signal so waits up to that many steps,
      well inside the usual grace (SLURM's `--signal=USR1@90`, 30 s in Kubernetes) unless a step takes seconds:
      then lower log_every_n_steps.
    Under SLURM with auto-requeue, SIGUSR1 is Lightning's: it saves an HPC checkpoint and requeues the job; that too
    runs at the next step boundary instead of inside the signal handler, where it saved wherever the step was.
    """

    def __init__(self):
        self._pending = False  # a signal came; stop at the next step boundary
        self._requeue_asked = False  # the SLURM requeue signal came; save and requeue at the next step boundary
        self._requeue = None  # Lightning's SLURM requeue handler (it saves a checkpoint, then requeues on rank 0)
        self._previous: list[tuple[int, Any]] = []  # (signal number, the handler ours replaced)

    def on_fit_start(self, trainer, pl_module):
        self._pending = self._requeue_asked = False

    def on_sanity_check_start(self, trainer, pl_module):
        self._install_handlers(trainer)

    def on_train_start(self, trainer, pl_module):
        self._install_handlers(trainer)  # no sanity check ran (num_sanity_val_steps 0)

    def _install(self, signum, handler) -> None:
        self._previous.append((signum, signal.signal(signum, handler)))

    def _install_handlers(self, trainer) -> None:
        """Ours replace Lightning's, which it installs just before the sanity check (before that, no hook runs)."""
        if self._previous:
            return
        if trainer.world_size > 1:  # ranks agree in _at_step_boundary; an instance attribute, removed in on_train_end
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = _no_broadcast

        def note(signum, frame):
            if not self._pending and signum == signal.SIGTERM and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # processes this one launched get it too (as Lightning does)
            rank_zero_info(f"lm: received {signal.Signals(signum).name}, saving a checkpoint after this step")
            self._pending = True

        self._install(signal.SIGTERM, note)
        if not hasattr(signal, "SIGUSR1"):
            return
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            signum = environment.requeue_signal or signal.SIGUSR1
            lightnings = signal.getsignal(signum)
            if not callable(lightnings):
                return

            def defer(signum, frame):
                rank_zero_info("lm: received the requeue signal, saving and requeueing after this step")
                self._requeue_asked = True

            self._requeue = lambda: lightnings(signum, None)
            self._install(signum, defer)
            return
        self._install(signal.SIGUSR1, note)

    def _take_lightnings_flag(self, trainer) -> None:
        """A signal Lightning noted (its handler ran before ours were installed), or a flag set by hand: ours now."""
        connector = trainer._signal_connector
        self._pending |= connector.received_sigterm
        connector.received_sigterm = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._take_lightnings_flag(trainer)
        if not inside_accumulation_window(trainer) and self._check_now(trainer):  # the optimizer step is complete
            self._at_step_boundary(trainer)

    def _check_now(self, trainer) -> bool:
        """Every step in one process (reading the flag is free); under DDP at the steps that log."""
        if trainer.world_size == 1:
            return True
        every = trainer.log_every_n_steps or 50  # log_every_n_steps 0: nothing logs, but a signal must get through
        return trainer.global_step % every == 0  # global_step counts the step just taken

    def on_validation_start(self, trainer, pl_module):
        self._take_lightnings_flag(trainer)  # so that Lightning does not stop the validation after its first batch

    def on_validation_end(self, trainer, pl_module):
        # val_check_interval counts batches, so a validation can sit inside an accumulation window: then the step's
        # last micro-batch decides, as without a validation. The same on every rank, so the ranks stay in step.
        if not (trainer.sanity_checking or trainer.state.fn != "fit" or inside_accumulation_window(trainer)):
            self._at_step_boundary(trainer)

    def _at_step_boundary(self, trainer) -> None:
        """Stop here if any rank got a signal (every rank decides the same, at the same point); requeue if asked."""
        flags = [self._pending, self._requeue_asked]
        if trainer.world_size > 1:
            flags = sum_over_ranks(
                torch.tensor(flags, dtype=torch.float32, device=trainer.strategy.root_device)
            ).tolist()
        stop, requeue = (flag > 0 for flag in flags)
        if requeue and self._requeue is not None:  # every rank: Lightning's handler saves a checkpoint, a collective
            self._requeue_asked = False
            self._requeue()
        # The last step's signal needs no checkpoint beyond the one training writes at its end: Lightning would
        # stop with SIGTERMException (exit 143, "resume with --ckpt_path last") after the run was complete.
        finished = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        if trainer.max_epochs not in (None, -1):  # a run bounded by epochs finishes with its last epoch's last batch
            last_epoch = trainer.current_epoch + 1 >= trainer.max_epochs
            finished |= last_epoch and trainer.fit_loop.epoch_loop._num_ready_batches_reached()
        if stop and not finished:
            self._pending, trainer._signal_connector.received_sigterm = False, True  # Lightning stops after this

    def on_train_end(self, trainer, pl_module):
        while self._previous:
            signal.signal(*self._previous.pop())
        trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)  # Lightning's method again

    def on_exception(self, trainer, pl_module, exception):
        self.on_train_end(trainer, pl_module)
