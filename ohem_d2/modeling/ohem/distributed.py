"""State that OHEM keeps across iterations is the same on every process and counts every
process's images: its per-iteration increments are summed over the processes here."""

import torch
from detectron2.utils import comm

__all__ = ["sum_over_processes"]


@torch.no_grad()
def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all processes of a distributed run, in place (a no-op in a single
    process). Every process must call it at the same point, with a tensor of the same shape
    (CUDA tensors under NCCL, CPU ones under gloo: the model's device either way)."""
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor
