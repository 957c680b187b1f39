"""Two gloo ranks on a CPU: RNGState gives each rank its own RNG state back (run by tests/test_reliability.py)."""

import sys

import torch
import torch.distributed as dist

from lm.reliability import RNGState


def main(rank: int, path: str) -> None:
    # A file store, not a port: a free port picked by the caller could be taken before the store binds it
    dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=2)
    torch.manual_seed(0)
    torch.rand(1 + 10 * rank)  # the ranks' streams part, as two GPUs' dropout masks do
    state = RNGState().state_dict()  # every rank takes part; rank 0 writes the checkpoint
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    expected = torch.rand(4)
    RNGState().load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(4), expected), f"rank {rank} did not get its own RNG state back"
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(main, args=(sys.argv[1],), nprocs=2)
