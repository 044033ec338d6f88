"""Checks on the distributed set-up that fail early with a clear message."""

from __future__ import annotations

import errno
import socket
from urllib.parse import urlparse

__all__ = ["DistributedSetupError", "check_dist_url"]


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
