"""train_net's allocator choice: a re-exec of the same process on jemalloc (engine/allocator.py)."""

import os
import subprocess
import sys

import pytest
from helpers import REPO

from ohem_d2.engine.allocator import (
    JEMALLOC_CONF,
    find_jemalloc,
    jemalloc_env,
    relaunch_with_allocator,
)

ALLOCATOR_PY = os.path.join(REPO, "ohem_d2", "engine", "allocator.py")
# Prints the allocator in use, its PID and its arguments after relaunch_with_allocator(CHOICE).
# The module is loaded from its file: importing the package would import torch, twice.
SCRIPT = f"""
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("allocator", {ALLOCATOR_PY!r})
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
allocator.relaunch_with_allocator(sys.argv[1])
print(allocator.allocator_in_use(), os.getpid(), sys.argv[1:])
"""


def run(choice, *extra, **env):
    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", SCRIPT, choice, *extra],
        cwd=REPO,
        env=dict(os.environ, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=120)
    return proc, out, err


def test_find_jemalloc_env_override(tmp_path, monkeypatch):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv("OHEM_D2_JEMALLOC", str(lib))
    assert find_jemalloc() == str(lib)
    monkeypatch.setenv("OHEM_D2_JEMALLOC", str(tmp_path / "missing.so"))
    assert find_jemalloc() is None  # named but absent: no silent fallback
    monkeypatch.setenv("OHEM_D2_JEMALLOC", "")
    assert find_jemalloc() is None


def test_jemalloc_env():
    env = jemalloc_env({"LD_PRELOAD": "/x/other.so"}, "/j/libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "/j/libjemalloc.so.2:/x/other.so"
    assert env["MALLOC_CONF"] == JEMALLOC_CONF
    assert jemalloc_env({"MALLOC_CONF": "narenas:1"}, "/j.so")["MALLOC_CONF"] == "narenas:1"
    with pytest.raises(ValueError, match="allocator"):
        relaunch_with_allocator("tcmalloc")


@pytest.mark.skipif(find_jemalloc() is None, reason="no libjemalloc.so.2 on this machine")
def test_auto_relaunches_the_same_process_on_jemalloc():
    proc, out, err = run("auto", "--x", "1")
    assert proc.returncode == 0, err
    allocator, pid, argv = out.strip().split(" ", 2)
    assert allocator == "jemalloc"
    assert int(pid) == proc.pid  # exec, not a child: signals reach the training process
    assert argv == "['auto', '--x', '1']"


def test_system_and_missing_jemalloc():
    proc, out, _ = run("system")
    assert out.split()[0] == "system"
    proc, out, _ = run("auto", OHEM_D2_JEMALLOC="")
    assert proc.returncode == 0 and out.split()[0] == "system"
    proc, out, err = run("jemalloc", OHEM_D2_JEMALLOC="")
    assert proc.returncode != 0
    assert "--allocator jemalloc: cannot load libjemalloc.so.2" in err
