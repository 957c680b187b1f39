"""Data-parallel correctness on CPU: 2 gloo processes through the real `lm fit` equal 1 process with the same batch.

    pytest tests/test_distributed.py            # ~40 s on 2 cores; the DDP run is marked slow

Under pytest, `strategy="ddp"` would relaunch pytest itself for rank 1, so the runs are `python -m lm fit`
subprocesses; `StepRecorder` below is loaded into them by class path (PYTHONPATH = the repo).
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lm.__main__ import main
from lm.data import RandomWindowSampler
from tests.conftest import REPO, cli_env

OVERLAYS = sorted((REPO / "experiments" / "trainer").glob("*.yaml"))
DEBUG = REPO / "experiments" / "debug.yaml"


class StepRecorder(L.Callback):
    """Writes, per rank, every step's local loss sum, supervised-token count and input windows to a JSON file.

    Local values only (no collectives), so the test reduces them itself: the global loss of a step is
    sum(loss_sum) / sum(tokens) over the ranks, which is what one process with the whole batch computes.
    """

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = int((batch["labels"] != -100).sum())
        # LanguageModel.training_step returns loss x tokens (the token-weighted sum); with no accumulation Lightning
        # hands it back unchanged
        rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()  # whose dropout masks come next
        self.steps.append(
            {"loss_sum": float(outputs["loss"]), "tokens": tokens, "input_ids": batch["input_ids"].tolist(), "rng": rng}
        )

    def on_train_end(self, trainer, pl_module):
        out = Path(trainer.default_root_dir) / f"steps-rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"world_size": trainer.world_size, "steps": self.steps}))


class SigtermInValidation(L.Callback):
    """Rank 0 sends itself SIGTERM in the middle of the validation at step 4 (as a preempted job's rank gets it)."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_rank == 0 and trainer.global_step == 4 and batch_idx == 1 and not trainer.sanity_checking:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


class SigtermAtStep2OnRank1(L.Callback):
    """Rank 1 gets SIGTERM after step 2; each rank writes down, after every training batch, how many broadcasts and
    barriers (on NCCL each waits on the host for the GPU) and all-reduces it has made so far."""

    def on_train_start(self, trainer, pl_module):
        self.calls = {"broadcast": 0, "barrier": 0, "all_reduce": 0}
        for name in self.calls:
            setattr(torch.distributed, name, self._counted(name, getattr(torch.distributed, name)))

    def _counted(self, name, collective):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return collective(*args, **kwargs)

        return counted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        import signal

        out = Path(trainer.default_root_dir) / f"collectives-rank{trainer.global_rank}.jsonl"
        with out.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, **self.calls}) + "\n")
        if trainer.global_rank == 1 and trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_trainer_overlays_parse(overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEBUG), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: lm.module.LanguageModel" in capsys.readouterr().out


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_partition_the_single_process_batches(world_size):
    """World size W x batch B draws exactly the windows of 1 process x batch W*B, step for step, split disjointly."""
    n, T, B = 100_000, 16, 4
    single = RandomWindowSampler(n, block_size=T, batch_size=world_size * B, seed=7)
    ranks = [
        RandomWindowSampler(n, block_size=T, batch_size=B, seed=7, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for epoch in (0, 1):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        single_batches = list(single)
        per_rank = [list(s) for s in ranks]
        assert all(len(batches) == len(single_batches) == len(single) for batches in per_rank)
        for step, whole in enumerate(single_batches):
            # rank r holds positions [r*B, (r+1)*B) of the single process' draw: nothing duplicated, nothing dropped
            np.testing.assert_array_equal(np.concatenate([batches[step] for batches in per_rank]), whole)


def _lm_fit(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """`python -m lm fit ARGS` in tmp_path, with this repo importable (for the callbacks above) and its own cache."""
    return subprocess.run(
        [sys.executable, "-m", "lm", "fit", *map(str, args)],
        cwd=tmp_path,
        env=cli_env(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=240,
    )


def _logged_under(root: Path) -> list:
    """The arguments that put a run's checkpoints and CSV logs under root."""
    csv = ("--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", root)
    return ["--trainer.default_root_dir", root, *csv]


def _fit(tmp_path: Path, name: str, *extra: str) -> Path:
    root = tmp_path / name
    result = _lm_fit(
        tmp_path,
        *("--config", DEBUG, *_logged_under(root)),
        *("--trainer.callbacks+=tests.test_distributed.StepRecorder",),
        *("--trainer.max_steps", "8", "--trainer.val_check_interval", "8"),
        *("--samples.max_new_tokens", "0", "--seed_everything", "1234"),
        *extra,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def _val_losses(root: Path) -> list[float]:
    (metrics,) = root.glob("*/version_*/metrics.csv")  # <save_dir>/<name>/version_0
    header, *rows = [line.split(",") for line in metrics.read_text().splitlines()]
    col = header.index("val/loss")
    return [float(row[col]) for row in rows if row[col]]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    # validation: the same first 16 windows of the val split, all on one process or 8 per rank
    one = _fit(tmp_path, "one", "--data.init_args.batch_size", "8", "--data.init_args.val_windows", "16")
    two = _fit(
        tmp_path,
        "two",
        *("--data.init_args.batch_size", "4", "--data.init_args.val_windows", "16"),
        *("--config", REPO / "experiments/trainer/ddp_cpu.yaml"),
    )

    single = json.loads((one / "steps-rank0.json").read_text())["steps"]
    ranks = [json.loads((two / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(single) == len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 8

    for step, (whole, r0, r1) in enumerate(zip(single, ranks[0]["steps"], ranks[1]["steps"], strict=True)):
        # the two ranks' windows are disjoint halves of the single process' batch
        assert r0["input_ids"] + r1["input_ids"] == whole["input_ids"], f"step {step}: different data"
        assert r0["tokens"] + r1["tokens"] == whole["tokens"]
        # rank 0 draws as one process does; rank 1 from its own stream (Lightning seeds both alike: same masks)
        assert r0["rng"] == whole["rng"] and r1["rng"] != r0["rng"], f"step {step}: RNG streams"
        # and the global loss (token-weighted over ranks) follows the same curve: same weights at every step
        global_loss = (r0["loss_sum"] + r1["loss_sum"]) / (r0["tokens"] + r1["tokens"])
        assert global_loss == pytest.approx(whole["loss_sum"] / whole["tokens"], rel=1e-4), f"step {step}"

    # after 8 optimizer steps the weights agree, and so does the validation loss (every rank sees the same windows)
    w1 = torch.load(one / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    w2 = torch.load(two / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
    assert _val_losses(two) == pytest.approx(_val_losses(one), rel=1e-4)
    # only rank 0 writes the logs and checkpoints
    assert len(list(two.glob("*/version_*"))) == 1


@pytest.mark.slow
def test_ddp_sigterm_during_validation_stops_every_rank_after_it(tmp_path):
    """Lightning's SIGTERM handler broadcast from inside the handler: rank 0, interrupted in rank-0-only work, waited
    there while rank 1 waited in validation's metric sync, and both hung until killed. Now both ranks finish the
    validation, save at step 4 and exit 143."""
    root = tmp_path / "run"
    result = _lm_fit(
        tmp_path,
        *("--config", DEBUG, "--config", REPO / "experiments/trainer/ddp_cpu.yaml", *_logged_under(root)),
        *("--trainer.callbacks+=tests.test_distributed.SigtermInValidation",),
        *("--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--data.init_args.val_windows", "16"),
        *("--data.init_args.batch_size", "4", "--seed_everything", "1234"),
    )
    assert result.returncode == 143, result.stderr[-4000:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert len(_val_losses(root)) == 1  # the validation at step 4 ran to its end and was logged


@pytest.mark.slow
def test_ddp_ranks_agree_on_a_signal_at_logging_steps_and_no_step_waits_on_the_host(tmp_path):
    """Lightning broadcast the SIGTERM flag before every batch and lm all-reduced it after every step: each read
    back on the host, a sync per step that stalls a GPU's queue. Now the ranks agree every log_every_n_steps (5 in
    debug.yaml): rank 1's signal after step 2 stops both ranks after step 5, which is saved. No batch broadcasts or
    waits at a barrier (Lightning's strategy.reduce put one before each all-reduce), and one all-reduce a step
    carries the loss and token sums (the flag's, at step 5, comes after this callback's count)."""
    root = tmp_path / "run"
    result = _lm_fit(
        tmp_path,
        *("--config", DEBUG, "--config", REPO / "experiments/trainer/ddp_cpu.yaml", *_logged_under(root)),
        *("--trainer.callbacks+=tests.test_distributed.SigtermAtStep2OnRank1",),
        *("--trainer.max_steps", "8", "--trainer.val_check_interval", "8", "--data.init_args.val_windows", "16"),
        *("--data.init_args.batch_size", "4", "--samples.max_new_tokens", "0"),
    )
    assert result.returncode == 143, result.stderr[-4000:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    for rank in (0, 1):
        lines = (root / f"collectives-rank{rank}.jsonl").read_text().splitlines()
        calls = [json.loads(line) for line in lines]
        assert [c["step"] for c in calls] == [1, 2, 3, 4, 5], f"rank {rank}"
        assert {(c["broadcast"], c["barrier"]) for c in calls} == {(0, 0)}, f"rank {rank}: {calls}"
        assert [c["all_reduce"] for c in calls] == [1, 2, 3, 4, 5], f"rank {rank}: {calls}"


@pytest.mark.slow
def test_a_user_error_on_rank_0_is_one_line_on_every_rank(tmp_path):
    """Rank 0 reports the missing file and leaves; rank 1's barrier then failed with a 30-line traceback."""
    result = _lm_fit(
        tmp_path,
        *("--config", DEBUG, "--config", REPO / "experiments/trainer/ddp_cpu.yaml"),
        *("--data.init_args.source", tmp_path / "missing.txt", "--trainer.default_root_dir", tmp_path / "run"),
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith(f"error: data source '{tmp_path / 'missing.txt'}': no such file")
    assert errors[1:] == ["error: rank 1 stopped because another rank did (its error is above)"]
    assert "Traceback" not in result.stderr


def test_only_a_peer_s_failure_on_another_rank_is_taken_for_one(monkeypatch):
    from lm.__main__ import _another_rank_failed

    gloo = RuntimeError(
        "[gloo/transport/tcp/pair.cc:553] Connection closed by peer. This is typically caused by a remote worker"
    )
    monkeypatch.setenv("RANK", "1")
    assert _another_rank_failed(gloo) and not _another_rank_failed(RuntimeError("shape mismatch"))
    monkeypatch.setenv("RANK", "0")
    assert not _another_rank_failed(gloo)  # rank 0's own failure keeps its traceback


@pytest.mark.slow
def test_the_fsdp_gradient_norm_counts_each_shard_once_whatever_the_sharding(tmp_path):
    """Each rank's squared norm was summed over the ranks: right when each holds its own shard (FULL_SHARD), but
    NO_SHARD's ranks each hold every gradient (and HYBRID_SHARD's a copy per node), so the norm came out sqrt(2)
    times too large on 2 ranks, and clipping cut the step by as much. Both ranks see the same batch here, so the norm
    is one process's. 2 CPU processes (tests/fsdp_cpu_grad_norm.py)."""
    from lm.config import GPTConfig
    from lm.module import LanguageModel

    norms = {}
    for sharding in ("FULL_SHARD", "NO_SHARD"):
        out = tmp_path / sharding
        out.mkdir()
        run = subprocess.run(
            [sys.executable, str(REPO / "tests" / "fsdp_cpu_grad_norm.py"), str(out), sharding],
            env=cli_env(PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        norms[sharding] = json.loads((out / "norm.json").read_text())

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    torch.manual_seed(0)
    module = LanguageModel(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=64), warmup_steps=1)
    quiet = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, log_every_n_steps=1, limit_val_batches=0, **quiet)
    trainer.fit(module, torch.utils.data.DataLoader([{"input_ids": ids, "labels": ids}], batch_size=None))
    one_process = float(trainer.callback_metrics["train/grad_norm"])
    assert norms == pytest.approx({"FULL_SHARD": one_process, "NO_SHARD": one_process}, rel=1e-5)


def test_the_process_group_is_destroyed_when_the_trainer_tears_down(tmp_path):
    """Lightning leaves it alive after fit, and gloo's threads then sometimes abort the interpreter at exit (code 134);
    the CLI adds DestroyProcessGroup to every run for that. A one-process gloo group, as a run's would be."""
    import torch.distributed as dist

    from lm.distributed import DestroyProcessGroup

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        DestroyProcessGroup().teardown(None, None, "fit")
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():  # never leave a group to the tests after this one
            dist.destroy_process_group()
    DestroyProcessGroup().teardown(None, None, "fit")  # and without a group (one device): nothing to do
