"""Selective-search throughput on VOC-sized images: images/s with 1 and with all workers.

Images are rendered locally by the toy dataset's generator at VOC size (both sides
drawn from [375, 500] px, i.e. about the pixel count of a 500x375 VOC image); nothing is
downloaded. Each (mode, workers) setting runs :func:`compute_proposal_file` from scratch on
the same images, as ``python -m ohem_d2.proposals.selective_search`` does, and the script
checks that every worker count gives the same boxes.

Usage::

    python -m benchmarks.bench_selective_search [--num-images 24] [--modes fast quality]
        [--workers 1 2] [--workdir DIR]

Prints a Markdown table (for benchmarks/selective_search.md) and the load average. CPU
s/image (user + system time of this process and its worker processes) is less sensitive
to other jobs on the machine than wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
from tabulate import tabulate

from ohem_d2.data.proposal_io import read_proposal_file
from ohem_d2.proposals.compute import compute_proposal_file
from ohem_d2.proposals.search import DEFAULT_MIN_SIZE, MODES
from ohem_d2.proposals.toy import generate_toy_dataset

VOC_MIN_SIDE, VOC_MAX_SIDE = 375, 500


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _voc_sized_images(root: str, count: int) -> list[tuple[str, str]]:
    # The generator needs >= 2 test images; only the trainval ones are timed.
    generate_toy_dataset(
        root,
        num_trainval=count,
        num_test=2,
        proposals=False,
        progress=False,
        min_side=VOC_MIN_SIDE,
        max_side=VOC_MAX_SIDE,
    )
    ids = [f"{i:06d}" for i in range(1, count + 1)]
    return [(i, os.path.join(root, "JPEGImages", f"{i}.jpg")) for i in ids]


def _cpu_seconds() -> float:
    # This process and its finished children (the worker pool is joined at the end of a run).
    return sum(
        r.ru_utime + r.ru_stime
        for r in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def _run(images, out, mode, workers):
    """(wall seconds, CPU seconds, boxes per image) of one run from scratch."""
    if os.path.exists(out):
        os.remove(out)
    cpu_start = _cpu_seconds()
    run = compute_proposal_file(
        images, out, mode=mode, min_size=DEFAULT_MIN_SIZE, workers=workers, progress=False
    )
    cpu = _cpu_seconds() - cpu_start
    if not run.complete or run.skipped:
        raise RuntimeError(f"selective search did not finish: {run.skipped}")
    return run.seconds, cpu, read_proposal_file(out).boxes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fast"])
    parser.add_argument(
        "--workers", type=int, nargs="+", default=None, help="default: 1 and all cores"
    )
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    workers_list = args.workers or sorted({1, _available_cores()})

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_ss_")
    try:
        load_before = os.getloadavg()
        images = _voc_sized_images(os.path.join(workdir, "voc_sized"), args.num_images)
        sizes = np.array([cv2.imread(p).shape[:2] for _, p in images])
        rows = []
        for mode in args.modes:
            reference = None
            for workers in workers_list:
                out = os.path.join(workdir, f"ss_{mode}_{workers}.npz")
                seconds, cpu, boxes = _run(images, out, mode, workers)
                counts = [len(b) for b in boxes]
                if reference is None:
                    reference = boxes
                elif any(not np.array_equal(a, b) for a, b in zip(reference, boxes)):
                    raise RuntimeError(f"{mode}: {workers} workers gave other boxes than 1")
                n = len(images)
                rows.append((mode, workers, n / seconds, seconds / n, cpu / n, np.mean(counts)))
                print(f"{mode} x{workers}: {seconds:.1f} s", file=sys.stderr, flush=True)
        load_after = os.getloadavg()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"{len(images)} images, mean size {sizes[:, 1].mean():.0f}x{sizes[:, 0].mean():.0f} px "
        f"(W x H, sides in [{VOC_MIN_SIDE}, {VOC_MAX_SIDE}]), min box side {DEFAULT_MIN_SIZE} px; "
        f"OpenCV {cv2.__version__}, {platform.processor() or platform.machine()}, "
        f"{_available_cores()} core(s) available"
    )
    before, after = (" ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after))
    print(f"load average (1/5/15 min) before: {before}, after: {after}")
    print(f"run at {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
    cells = [
        [mode, workers, f"{rate:.2f}", f"{wall:.2f}", f"{cpu:.2f}", f"{boxes:.0f}"]
        for mode, workers, rate, wall, cpu, boxes in rows
    ]
    headers = ["mode", "workers", "images/s", "wall s/image", "CPU s/image", "boxes/image"]
    print(tabulate(cells, headers, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
