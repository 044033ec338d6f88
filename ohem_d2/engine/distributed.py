"""Checks on the distributed set-up that fail early with a clear message."""

from __future__ import annotations

import errno
import socket
from urllib.parse import urlparse

__all__ = ["DistributedSetupError", "check_devices", "check_dist_url"]


class DistributedSetupError(RuntimeError):
    """The distributed job cannot start as configured."""


def check_dist_url(dist_url: str, *, world_size: int, machine_rank: int) -> None:
    """Raise :class:`DistributedSetupError` if the rendezvous port of `dist_url` is taken.

    The first machine (rank 0) listens on the port of a ``tcp://host:port`` URL; when another
    process already listens there, PyTorch's own error comes from inside a worker and does not
    say which option to change. Nothing is checked for single-process runs, other machines,
    other URL schemes, or a host that is not an address of this machine.
    """
    if world_size <= 1 or machine_rank != 0 or not dist_url or dist_url == "auto":
        return
    url = urlparse(dist_url)
    if url.scheme != "tcp" or url.port is None:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the PyTorch store does, so that a port in TIME_WAIT does not count as taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((url.hostname or "", url.port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DistributedSetupError(
                    f"--dist-url {dist_url}: port {url.port} is already in use on this "
                    "machine (another training job?). Choose a free port, or use "
                    "--dist-url auto for a single-machine job."
                ) from e
            # e.g. EADDRNOTAVAIL: the host is not an address of this machine; leave it to
            # PyTorch.


def check_devices(
    device: str,
    *,
    num_processes: int,
    world_size: int,
    ims_per_batch: int,
    cuda_available: bool,
    cuda_device_count: int,
    device_key: str = "MODEL.DEVICE",
    batch_key: str = "SOLVER.IMS_PER_BATCH",
    hint: str = "",
) -> str:
    """Refuse, before any process starts, a device set-up that would fail inside the workers.

    Args:
        device: the config's MODEL.DEVICE ("cuda", "cuda:1", "cpu", ...).
        num_processes: processes this machine starts (``--num-gpus``).
        world_size: processes of all machines (``--num-gpus`` x ``--num-machines``).
        ims_per_batch: SOLVER.IMS_PER_BATCH, the total batch, split evenly over world_size.
        cuda_available, cuda_device_count: what torch.cuda reports on this machine.
        device_key, batch_key: the config keys the messages name: "MODEL.DEVICE" and
            "SOLVER.IMS_PER_BATCH" (YAML, overridden as ``MODEL.DEVICE cpu``), or
            "train.device" and "dataloader.train.total_batch_size" (LazyConfig,
            ``train.device=cpu``).
        hint: a sentence added to the batch's message (another way to fix it).

    Returns:
        One line saying what will run, e.g. "2 CPU process(es) (gloo): MODEL.DEVICE cpu".
    """
    # LazyConfig keys are lower-case and overridden as key=value.
    cpu = f"{device_key}=cpu" if device_key.islower() else f"{device_key} cpu"
    if device.startswith("cuda"):
        if not cuda_available:
            raise DistributedSetupError(
                f"{device_key} is {device!r} but this machine has no usable CUDA GPU "
                f"(torch.cuda.is_available() is False). Add `{cpu}` to the command line to "
                "train on the CPU; --num-gpus N then starts N CPU processes that communicate "
                "with gloo."
            )
        if num_processes > cuda_device_count:
            raise DistributedSetupError(
                f"--num-gpus {num_processes} but this machine has {cuda_device_count} CUDA "
                f"GPU(s); use at most that many, or `{cpu}` for CPU processes."
            )
    elif num_processes > 1 and cuda_available:
        # Detectron2's launcher picks NCCL whenever CUDA is present, and NCCL cannot reduce
        # the gradients of a CPU model.
        raise DistributedSetupError(
            f"{device_key} {device} with --num-gpus {num_processes} on a machine with CUDA: "
            "Detectron2's launcher would use NCCL, which cannot reduce CPU tensors. Run with "
            "CUDA_VISIBLE_DEVICES= set to empty for CPU processes (gloo), or use a CUDA "
            "device."
        )
    if ims_per_batch % world_size != 0:
        raise DistributedSetupError(
            f"{batch_key} ({ims_per_batch}) must be divisible by the number of "
            f"processes ({world_size} = --num-gpus x --num-machines): each takes an equal "
            f"share.{hint}"
        )
    if device.startswith("cuda"):
        backend = "nccl" if num_processes > 1 else "single process"
        return f"{num_processes} CUDA process(es) ({backend})"
    backend = "gloo" if num_processes > 1 else "single process"
    return f"{num_processes} CPU process(es) ({backend}): {device_key} {device}"
