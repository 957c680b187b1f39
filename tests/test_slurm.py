"""The SLURM launcher's scripts: syntax and the directives preemption depends on.

The real check brings up a one-node Slurm cluster and runs jobs through it (`make slurm-test`, i.e.
slurm/test_one_node.sh, as root; ~4 min): it is not run by pytest because it installs packages and starts daemons.
"""

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
