"""Two gloo ranks on a CPU: RNGState parts the ranks' RNG streams on a fresh fit and gives each rank its own state
back on a resume (run by tests/test_reliability.py)."""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from lm.reliability import RNGState


def main(rank: int, path: str) -> None:
    # A file store, not a port: a free port picked by the caller could be taken before the store binds it
    dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=2)
    trainer = SimpleNamespace(global_rank=rank, global_step=0)
    torch.manual_seed(0)  # as seed_everything seeds every rank alike
    RNGState().on_train_start(trainer, None)  # a fresh fit: the streams part (rank 0 keeps its own)
    draws = [None, None]
    dist.all_gather_object(draws, torch.rand(4))
    assert not torch.equal(draws[0], draws[1]), "the ranks draw the same numbers (the same dropout masks)"
    if rank == 0:
        torch.manual_seed(0)
        assert torch.equal(torch.rand(4), draws[0]), "rank 0's stream changed: one device would train differently"

    state = RNGState().state_dict()  # every rank takes part; rank 0 writes the checkpoint
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    expected = torch.rand(4)
    resumed = RNGState()
    resumed.load_state_dict(torch.load(path, weights_only=True))
    resumed.on_train_start(trainer, None)  # a resume with every rank's own state: not seeded again
    assert torch.equal(torch.rand(4), expected), f"rank {rank} did not get its own RNG state back"

    # A resume with another world size: every rank takes rank 0's state, then ranks > 0 part again, not replaying
    # the draws of their first steps (restoring rank 0's state restores its seed, from which they were seeded)
    state = torch.load(path, weights_only=True)
    state["by_rank"] = state["by_rank"][:1]  # as written by one process
    other_world = RNGState()
    other_world.load_state_dict(state)
    other_world.on_train_start(SimpleNamespace(global_rank=rank, global_step=100), None)
    if rank == 1:
        assert not torch.equal(torch.rand(4), draws[1]), "rank 1 replays the draws of its first step"

    # A checkpoint written before the ranks parted holds the same state for every rank: they part on resuming it
    state = torch.load(path, weights_only=True)
    state["by_rank"] = [state["by_rank"][0]] * 2
    alike = RNGState()
    alike.load_state_dict(state)
    alike.on_train_start(SimpleNamespace(global_rank=rank, global_step=100), None)
    draws = [None, None]
    dist.all_gather_object(draws, torch.rand(4))
    assert not torch.equal(draws[0], draws[1]), "resumed from equal states, the ranks still draw the same numbers"
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(main, args=(sys.argv[1],), nprocs=2)
