"""Selective search of many images in a pool of worker processes, one image per task."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import cv2

from .search import selective_search_boxes

__all__ = ["default_workers", "process_image", "results_in_processes"]


def default_workers() -> int:
    """The cores available to this process."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def process_image(task):
    """(index, path, mode, min_size, max_boxes) -> (index, boxes or None, error)."""
    index, path, mode, min_size, max_boxes = task
    try:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None or image.size == 0:
            return index, None, "unreadable or corrupt image"
        return (
            index,
            selective_search_boxes(image, mode=mode, min_size=min_size, max_boxes=max_boxes),
            None,
        )
    except cv2.error as e:
        return index, None, f"OpenCV error: {str(e).strip().splitlines()[-1]}"


def _pool_worker_init() -> None:
    # Processes give the parallelism; OpenCV threads inside each would only compete.
    cv2.setNumThreads(1)
    # Ctrl-C reaches the whole process group: only the parent handles it (it saves the
    # finished images and stops the pool); a worker finishes its current image.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def results_in_processes(tasks, workers):
    """Yield :func:`process_image` results in completion order, at most 4 tasks per worker
    queued. A crashed worker raises ``BrokenProcessPool`` instead of hanging."""
    # Not "fork": forked workers of the test-suite process, which had already run OpenCV and
    # torch (thread pools whose locks a child inherits), hung in a futex wait. A forkserver
    # forks from a clean process that never ran them.
    methods = multiprocessing.get_all_start_methods()
    method = "forkserver" if "forkserver" in methods else "spawn"
    executor = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method), initializer=_pool_worker_init
    )
    try:
        queue = iter(tasks)
        pending = {executor.submit(process_image, t) for t in itertools.islice(queue, 4 * workers)}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                task = next(queue, None)
                if task is not None:
                    pending.add(executor.submit(process_image, task))
                yield future.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
