"""The model inside a DistributedDataParallel wrapper (Detectron2's ``create_ddp_model``
makes one when several processes train); Detectron2 unwraps it inline, this is the project's
one place for it."""

from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap_ddp"]


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """`model`'s module if `model` is a DistributedDataParallel wrapper, else `model`."""
    return model.module if isinstance(model, DistributedDataParallel) else model
