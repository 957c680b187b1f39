"""Multi-process plumbing the `lm` CLI adds to every run: a clean torch.distributed shutdown.

Strategies are chosen by config, not here: stack a trainer overlay on any experiment,

    lm fit --config experiments/debug.yaml --config experiments/trainer/ddp_cpu.yaml   # 2 CPU processes, gloo
    lm fit --config experiments/gpt2_124m.yaml --config experiments/trainer/fsdp.yaml  # all GPUs of the node

and on a cluster `srun lm fit ...` (see slurm/train.sbatch), where Lightning reads ranks from the SLURM environment.
"""

import lightning as L
import torch.distributed as dist


class DestroyProcessGroup(L.Callback):
    """Destroys the default process group when the Trainer tears down.

    Lightning leaves it alive after `fit`. With gloo the interpreter then sometimes aborts at exit
    (`terminate called without an active exception`, exit code 134, about 1 run in 5 on CPU) because the group's
    threads are torn down after the objects they use; destroying the group first makes every exit clean.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            # No barrier first: the Trainer's last collective is behind us, and a barrier would hang a rank whose
            # peer died.
            dist.destroy_process_group()
