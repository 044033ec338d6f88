"""A failing rank ends a 2-process CPU job with its error, never a hang; a taken port is named."""

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
from helpers import NO_GPU_ENV, REPO, run_train_net, toy_overrides

FAST = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", 200,
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN", 300,
    "DATASETS.TEST", "()",
    "DATASETS.PROPOSAL_FILES_TEST", "()",
]  # fmt: skip
EXIT_WITHIN = 60  # seconds from the failure to the end of the whole job


def _start(root, out, *opts):
    args = [
        "--num-gpus", 2, "--dist-url", "auto",
        "--config-file", "configs/toy/frcn.yaml",
        *toy_overrides(root), *FAST, "OUTPUT_DIR", out, *opts,
    ]  # fmt: skip
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(root), PYTHONWARNINGS="ignore")
    env.update(NO_GPU_ENV)  # CPU processes (gloo), also on a machine with CUDA
    log = out / "stdout.log"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train_net.py"), *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    return proc, log


def _wait_for_text(proc, log, text, timeout=240):
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in time"
        time.sleep(0.1)


def _workers(proc):
    """The two spawned training processes, in start order (local rank 0, then 1)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2, [c.cmdline() for c in children]
    return sorted(workers, key=lambda c: (c.create_time(), c.pid))


def _finish(proc, timeout):
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        raise AssertionError(f"the job did not end within {timeout} s: a hang") from None


def test_killed_rank_ends_the_job(small_toy_root, tmp_path):
    proc, log = _start(small_toy_root, tmp_path / "out", "SOLVER.MAX_ITER", 500)
    try:
        _wait_for_text(proc, log, "Starting training from iteration 0")
        time.sleep(2)  # inside the training loop, in collectives with rank 1
        _workers(proc)[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = _finish(proc, EXIT_WITHIN)
    finally:
        proc.kill()
    assert time.monotonic() - killed_at < EXIT_WITHIN
    assert returncode != 0
    output = log.read_text()
    assert "process 1 terminated with signal SIGKILL" in output, output[-3000:]
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie"


def test_rank_raising_ends_the_job_with_its_error(small_toy_root, tmp_path):
    # Diverging training: the main rank raises FloatingPointError after gathering the
    # losses, while the other rank goes on into the next iteration's collectives.
    proc, log = _start(
        small_toy_root, tmp_path / "out", "SOLVER.MAX_ITER", 500, "SOLVER.BASE_LR", 1e30
    )
    try:
        _wait_for_text(proc, log, "Starting training from iteration 0")
        started = time.monotonic()
        returncode = _finish(proc, EXIT_WITHIN)
    finally:
        proc.kill()
    assert time.monotonic() - started < EXIT_WITHIN
    assert returncode != 0
    output = log.read_text()
    assert "-- Process 0 terminated with the following error:" in output, output[-3000:]
    assert "FloatingPointError: Loss became infinite or NaN at iteration=" in output


def test_port_in_use_is_a_clear_error(small_toy_root, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        url = f"tcp://127.0.0.1:{port}"
        result = run_train_net(
            [
                "--num-gpus",
                2,
                "--dist-url",
                url,
                "--config-file",
                "configs/toy/frcn.yaml",
                *toy_overrides(small_toy_root),
                *FAST,
                "OUTPUT_DIR",
                tmp_path,
            ],  # fmt: skip
            os.path.dirname(small_toy_root),
            timeout=EXIT_WITHIN,
            no_gpu=True,
        )
    assert result.returncode != 0
    assert f"ERROR: --dist-url {url}: port {port} is already in use" in result.stdout
    assert "Traceback" not in result.stdout
