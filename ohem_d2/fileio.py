"""Writing files so that a reader never sees half of one (the bottom layer: imports nothing
of the project)."""

import os
import tempfile

__all__ = ["write_atomic"]


def write_atomic(path: str, write, *, binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it to ``path``.

    A process killed mid-write leaves the previous ``path`` (or none) and no partial file;
    the file gets the permissions ``open()`` would give it.

    Args:
        path: the file to (re)write; its folder is created if missing.
        write: called with the open temporary file.
        binary: open it in binary ("wb") or text ("w") mode.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
