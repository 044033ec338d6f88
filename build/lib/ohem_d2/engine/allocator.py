"""Train on jemalloc instead of glibc's malloc when it is available (CPU memory stays flat).

On the CPU, glibc's malloc fragments under training's ever-changing tensor sizes (images of
different shapes, different numbers of proposals): the toy model's resident memory grew 35 %
from iteration 50 to 300, against 3 % on jemalloc at the same speed (benchmarks/soak.md).
glibc's own remedy, a fixed mmap threshold, costs 16-85 % of the speed. The allocator of a
process is chosen when it starts, hence a re-exec of the same command with ``LD_PRELOAD``;
the processes it starts (DDP workers, data loader workers) inherit it.

``scripts/setup.sh`` puts ``libjemalloc.so.2`` in ``.venv/lib/jemalloc/`` when the system has
no copy. ``OHEM_D2_JEMALLOC=/path/libjemalloc.so.2`` names another one ("" for none).
"""

import os
import sys

__all__ = [
    "ALLOCATORS",
    "JEMALLOC_CONF",
    "allocator_in_use",
    "find_jemalloc",
    "jemalloc_env",
    "relaunch_with_allocator",
]

ALLOCATORS = ("auto", "jemalloc", "system")
# Keep freed pages for reuse instead of returning them to the OS on a timer: purging and
# re-faulting the same large blocks every iteration cost 5-20 % of the speed, and a training
# process reuses its peak every iteration anyway.
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
_RELAUNCHED = "OHEM_D2_ALLOCATOR_RELAUNCHED"
_SYSTEM_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def find_jemalloc() -> str | None:
    """Path of libjemalloc.so.2: ``$OHEM_D2_JEMALLOC`` if set, else the venv's, else the
    system's; None if there is none."""
    if "OHEM_D2_JEMALLOC" in os.environ:
        path = os.environ["OHEM_D2_JEMALLOC"]
        return path if path and os.path.isfile(path) else None
    candidates = (os.path.join(sys.prefix, "lib", "jemalloc", "libjemalloc.so.2"), *_SYSTEM_PATHS)
    return next((path for path in candidates if os.path.isfile(path)), None)


def allocator_in_use() -> str:
    """ "jemalloc" if it is loaded in this process, else "system"."""
    try:
        with open("/proc/self/maps") as maps:
            return "jemalloc" if "libjemalloc" in maps.read() else "system"
    except OSError:  # no /proc (not Linux): LD_PRELOAD is not used there either
        return "system"


def jemalloc_env(env: dict[str, str], path: str) -> dict[str, str]:
    """A copy of ``env`` whose processes start on the jemalloc at ``path``."""
    env = dict(env)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{path}:{preload}" if preload else path
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def relaunch_with_allocator(choice: str = "auto") -> None:
    """Re-execute this process's command on jemalloc unless it already runs on it.

    Args:
        choice: "auto" (jemalloc when found, else carry on with the system allocator),
            "jemalloc" (exit with an error when it cannot be loaded) or "system" (no change).

    Returns only when no re-exec is needed; otherwise the process image is replaced (same
    PID, same arguments, interpreter flags included).
    """
    if choice not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {choice!r}")
    if choice == "system" or allocator_in_use() == "jemalloc":
        return
    path = find_jemalloc()
    if path is None or os.environ.get(_RELAUNCHED):
        # Not found, or found but the dynamic loader did not load it in the re-exec.
        if choice == "jemalloc":
            where = path or os.environ.get("OHEM_D2_JEMALLOC") or "the venv and system paths"
            sys.exit(
                f"ERROR: --allocator jemalloc: cannot load libjemalloc.so.2 ({where}); run "
                "scripts/setup.sh, set OHEM_D2_JEMALLOC, or use --allocator system"
            )
        return
    env = jemalloc_env(os.environ, path)
    env[_RELAUNCHED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
