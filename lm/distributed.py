"""Multi-process plumbing: a clean torch.distributed shutdown, which the `lm` CLI adds to every run, and the FSDP root's
weights gathered for callbacks that run the model outside a training step.

Strategies are chosen by config, not here: stack a trainer overlay on any experiment,

    lm fit --config experiments/debug.yaml --config experiments/trainer/ddp_cpu.yaml   # 2 CPU processes, gloo
    lm fit --config experiments/gpt2_124m.yaml --config experiments/trainer/fsdp.yaml  # all GPUs of the node

and on a cluster `srun lm fit ...` (see slurm/train.sbatch), where Lightning reads ranks from the SLURM environment.
"""

import contextlib

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy


def root_weights_gathered(trainer: L.Trainer) -> contextlib.AbstractContextManager:
    """A context in which `pl_module.model` can be called directly, also under FSDP.

    Lightning's FSDP wraps the whole LightningModule as the root, so the GPT's own top-level weights (embedding, head,
    final norm) belong to the root and stay flat shards outside its forward, which a direct `pl_module.model(...)`
    bypasses ("'weight' must be 2-D"). This gathers the root's weights only (each wrapped Block still gathers its own
    in its forward) and discards them after, unchanged. Every rank must enter it, and run the same forward passes
    inside: each is a collective. Elsewhere it does nothing.
    """
    if not isinstance(trainer.strategy, FSDPStrategy):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, recurse=False, writeback=False)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks, in place, as a collective queued on the device: the host does not wait.

    Lightning's `strategy.reduce` runs `torch.distributed.barrier()` before each all-reduce, and on NCCL a barrier
    waits on the host for the GPU's queue to drain (cudaStreamSynchronize): called every step, it cost the host its
    lead over the GPU. Every rank must call it, in the same order, as any collective.
    """
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


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
