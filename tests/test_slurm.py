"""The SLURM launcher's scripts: syntax and the directives preemption depends on.

The real check brings up a one-node Slurm cluster and runs jobs through it (`make slurm-test`, i.e.
slurm/test_one_node.sh, as root; ~4 min): it is not run by pytest because it installs packages and starts daemons.
"""

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + [REPO / "slurm" / "train.sbatch"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_template_requeues_and_resumes():
    text = (REPO / "slurm" / "train.sbatch").read_text()
    for directive in ("--signal=USR1@90", "--requeue", "--open-mode=append", "--ntasks-per-node="):
        assert f"#SBATCH {directive}" in text, directive
    assert "srun --kill-on-bad-exit=1 ${LM:-lm} fit" in text
    assert "hpc_ckpt_*.ckpt" in text and "checkpoints/last.ckpt" in text and "--ckpt_path" in text
    assert "WANDB_RUN_ID" in text


def test_the_local_cluster_scripts_leave_a_real_cluster_alone():
    """up.sh wrote /etc/slurm/slurm.conf over whatever was there, and down.sh killed the slurmd/slurmctld of the pid
    files and wiped /var/spool/slurmctld: run on a machine of a real cluster, they took it down."""
    for name in ("up.sh", "down.sh"):
        text = (REPO / "slurm" / name).read_text()
        guard = text.find("ClusterName=localcluster' /etc/slurm/slurm.conf")
        commands = ("\ncat > /etc/slurm", "\nstop /run", "\n  scancel")
        first_change = min(i for i in (text.find(c) for c in commands) if i >= 0)
        assert 0 <= guard < first_change, name


def _submit(tmp_path, **env):
    """Runs train.sbatch as the batch step of job 123 would, with an `srun` that records what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "WANDB_RUN_ID=$WANDB_RUN_ID" "$@" > "$SRUN_RECORD"\n')
    srun.chmod(0o755)
    record = tmp_path / "srun.txt"
    record.unlink(missing_ok=True)
    job = {"SLURM_JOB_ID": "123", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", "LM": "lm"}
    environ = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SRUN_RECORD": str(record)} | job | env
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "train.sbatch"), "--config", "x.yaml"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
    )
    return result, record.read_text().splitlines() if record.exists() else None


def test_a_requeued_job_resumes_its_root_in_the_same_wandb_run_and_a_new_job_never_takes_an_old_ones(tmp_path):
    """Slurm's job ids start again after its controller's state is reset: a new job 123 found runs/slurm-123 of an
    old job 123, resumed that run's checkpoint and appended to its W&B run lm-123."""
    first, argv = _submit(tmp_path)
    assert first.returncode == 0, first.stderr
    run_id = argv[0].removeprefix("WANDB_RUN_ID=")
    assert re.fullmatch(r"lm-123-[0-9a-f]{8}", run_id)
    assert argv[1:] == ["--kill-on-bad-exit=1", "lm", "fit", "--config", "x.yaml",
                        "--trainer.default_root_dir", "runs/slurm-123",
                        "--trainer.num_nodes", "1", "--trainer.devices", "2"]  # fmt: skip
    (tmp_path / "runs/slurm-123/hpc_ckpt_1.ckpt").write_bytes(b"")

    requeued, argv = _submit(tmp_path, SLURM_RESTART_COUNT="1")
    assert requeued.returncode == 0, requeued.stderr
    assert argv[0] == f"WANDB_RUN_ID={run_id}" and argv[-2:] == ["--ckpt_path", "runs/slurm-123/hpc_ckpt_1.ckpt"]

    reused, argv = _submit(tmp_path)  # another job 123, after a reset
    assert reused.returncode == 1 and argv is None
    assert "runs/slurm-123 already exists, from an earlier job 123" in reused.stderr

    on_purpose, argv = _submit(tmp_path, LM_ROOT="runs/slurm-123")
    assert on_purpose.returncode == 0, on_purpose.stderr
    assert argv[0] == f"WANDB_RUN_ID={run_id}" and argv[-2:] == ["--ckpt_path", "runs/slurm-123/hpc_ckpt_1.ckpt"]

    other, argv = _submit(tmp_path, SLURM_JOB_ID="124")
    assert other.returncode == 0 and argv[0] not in (f"WANDB_RUN_ID={run_id}", "WANDB_RUN_ID=lm-124")

    given, argv = _submit(tmp_path, SLURM_JOB_ID="125", WANDB_RUN_ID="mine")
    assert given.returncode == 0 and argv[0] == "WANDB_RUN_ID=mine"

    # a root from before the id file: no new id drawn for it (lm fit continues the W&B run its checkpoint names)
    (tmp_path / "runs/old/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/old/checkpoints/last.ckpt").write_bytes(b"")
    older, argv = _submit(tmp_path, SLURM_JOB_ID="126", LM_ROOT="runs/old")
    assert older.returncode == 0 and argv[0] == "WANDB_RUN_ID=" and argv[-1] == "runs/old/checkpoints/last.ckpt"
    assert not (tmp_path / "runs/old/wandb_run_id").exists() and "W&B run named by the checkpoint" in older.stdout
