"""Selective-search proposals (Uijlings et al.) with OpenCV, written as a safe ``.npz`` file.

Usage::

    python -m ohem_d2.proposals.selective_search --dataset voc_2007_test \\
        --out datasets/proposals/ss_voc_2007_test.npz [--mode fast|quality] [--workers N]

Boxes of an image keep OpenCV's ranking order (its hierarchical-grouping rank); the score
of the r-th box (r = 0, 1, ...) is ``-r``, so loading, which sorts by descending score,
keeps that order and ``PRECOMPUTED_PROPOSAL_TOPK_*`` keeps the best-ranked boxes.
As Fast R-CNN's data loader did, exact duplicates are removed (first occurrence kept) and
boxes with a side smaller than ``min_size`` pixels are dropped. The default, 20 px, is the
``minBoxWidth`` of the R-CNN/Fast R-CNN selective-search boxes for PASCAL VOC (images of
about 500 px); use a smaller value for small images.

OpenCV ranks regions with C's ``rand()``, whose state is global to the process; it is
reseeded before each image so that an image's boxes do not depend on which images the same
process handled before (this is what makes the output identical whether or not a run was
interrupted and resumed).

Finished images are kept in ``<out>.partial/`` (chunks written atomically in the same
safe format) so that an interrupted run resumes where it stopped; the directory is removed
once the output is written.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..data.proposal_io import ProposalFileError, read_proposal_file, save_proposals_npz
from ..fileio import write_atomic
from ..proposal_rules import min_size_mask, rank_scores, top_k, unique_boxes

__all__ = [
    "DEFAULT_MIN_SIZE",
    "MODES",
    "SelectiveSearchRun",
    "BCCD_MIN_SIZE",
    "compute_bccd_proposals",
    "compute_proposal_file",
    "dataset_images",
    "main",
    "selective_search_boxes",
]

logger = logging.getLogger(__name__)

MODES = ("fast", "quality")
DEFAULT_MIN_SIZE = 20
# Bump when the boxes computed for an image change, so that stale partial files are refused.
_ALGORITHM_VERSION = 1
_PARTIAL_META = "meta.json"


# ----------------------------------------------------------------------------- one image


@functools.lru_cache(maxsize=1)
def _c_library():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else ctypes.CDLL(None)
    except OSError:
        return None


def _seed_c_rand(seed: int = 1) -> None:
    # OpenCV's selective search draws region ranks from C's rand(); see the module docstring.
    libc = _c_library()
    if libc is not None and hasattr(libc, "srand"):
        libc.srand(ctypes.c_uint(seed))


def selective_search_boxes(
    image_bgr: np.ndarray,
    *,
    mode: str = "fast",
    min_size: int = DEFAULT_MIN_SIZE,
    max_boxes: int | None = None,
) -> np.ndarray:
    """Selective-search boxes of one image, best-ranked first.

    Args:
        image_bgr: (H, W, 3) uint8 image in OpenCV's BGR order.
        mode: "fast" (2 colour spaces, 2 strategies, k in {50, 100}) or "quality".
        min_size: drop boxes whose width or height is below this (pixels).
        max_boxes: keep at most this many boxes (after filtering); None keeps all.

    Returns:
        (K, 4) float32 boxes in XYXY_ABS pixel coordinates, K >= 1: if filtering removes
        every box (an image smaller than ``min_size``), the largest box is kept.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(image_bgr)
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    _seed_c_rand()
    rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    boxes = boxes[unique_boxes(boxes)]
    if len(boxes) == 0:
        h, w = image_bgr.shape[:2]
        return np.array([[0, 0, w, h]], dtype=np.float32)
    keep = min_size_mask(boxes, min_size)
    if not keep.any():
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.arange(len(boxes)) == int(np.argmax(areas))
    return top_k(boxes[keep], max_boxes).astype(np.float32)


def _pool_worker_init() -> None:
    # Processes give the parallelism; OpenCV threads inside each would only compete.
    cv2.setNumThreads(1)
    # Ctrl-C reaches the whole process group: only the parent handles it (it saves the
    # finished images and stops the pool); a worker finishes its current image.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _results_in_processes(tasks, workers):
    """Yield ``_process_image`` results in completion order, at most 4 tasks per worker
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
        pending = {executor.submit(_process_image, t) for t in itertools.islice(queue, 4 * workers)}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                task = next(queue, None)
                if task is not None:
                    pending.add(executor.submit(_process_image, task))
                yield future.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _process_image(task):
    """Worker: (index, path, mode, min_size, max_boxes) -> (index, boxes or None, error)."""
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


# ----------------------------------------------------------------------------- many images


@dataclass
class SelectiveSearchRun:
    """What :func:`compute_proposal_file` did.

    Attributes:
        out_path: the output file (written only if ``complete``).
        computed: images computed in this run.
        reused: images taken from the partial file of an earlier run.
        skipped: (image id, path, reason) of images that could not be read.
        complete: True when every image was processed and the output was written.
        seconds: wall time of the run.
    """

    out_path: str
    computed: int = 0
    reused: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    complete: bool = False
    seconds: float = 0.0

    def boxes_per_image(self) -> float:
        """Average number of boxes per image of the written file (0 if none)."""
        if not self.complete:
            return 0.0
        proposals = read_proposal_file(self.out_path)
        return float(np.mean([len(b) for b in proposals.boxes])) if proposals.boxes else 0.0


def _partial_dir(out_path: str) -> str:
    return out_path + ".partial"


def _run_signature(images, mode, min_size, max_boxes) -> dict:
    digest = hashlib.sha256()
    for image_id, path in images:
        digest.update(f"{image_id}\0{os.path.abspath(path)}\n".encode())
    return {
        "algorithm_version": _ALGORITHM_VERSION,
        "opencv": cv2.__version__,
        "mode": mode,
        "min_size": int(min_size),
        "max_boxes": None if max_boxes is None else int(max_boxes),
        "num_images": len(images),
        "images_sha256": digest.hexdigest(),
    }


class _StalePartialError(RuntimeError):
    pass


def _load_partial(partial: str, signature: dict) -> dict[str, np.ndarray]:
    """Boxes of the images finished by an earlier run with the same signature."""
    meta_path = os.path.join(partial, _PARTIAL_META)
    if not os.path.isfile(meta_path):
        return {}
    with open(meta_path) as f:
        meta = json.load(f)
    if meta != signature:
        changed = sorted(k for k in signature if meta.get(k) != signature[k])
        raise _StalePartialError(
            f"The partial results in {partial!r} were computed with other settings or images "
            f"({', '.join(changed)} differ). Delete that directory to start afresh."
        )
    done = {}
    for name in sorted(os.listdir(partial)):
        if not (name.startswith("chunk-") and name.endswith(".npz")):
            continue
        try:
            chunk = read_proposal_file(os.path.join(partial, name))
        except ProposalFileError as e:
            logger.warning("Ignoring an unreadable partial chunk: %s", e)
            continue
        done.update(zip(chunk.ids, chunk.boxes))
    return done


class _ChunkWriter:
    """Writes finished images to numbered chunk files of the partial directory."""

    def __init__(self, partial: str, signature: dict):
        os.makedirs(partial, exist_ok=True)
        meta_path = os.path.join(partial, _PARTIAL_META)
        if not os.path.isfile(meta_path):
            write_atomic(
                meta_path,
                lambda f: json.dump(signature, f, indent=1, sort_keys=True),
                binary=False,
            )
        numbers = [
            int(n[len("chunk-") : -len(".npz")])
            for n in os.listdir(partial)
            if n.startswith("chunk-") and n.endswith(".npz")
        ]
        self._partial = partial
        self._next = max(numbers, default=-1) + 1
        self._ids: list[str] = []
        self._boxes: list[np.ndarray] = []

    def add(self, image_id: str, boxes: np.ndarray) -> None:
        self._ids.append(image_id)
        self._boxes.append(boxes)

    def __len__(self) -> int:
        return len(self._ids)

    def flush(self) -> None:
        if not self._ids:
            return
        path = os.path.join(self._partial, f"chunk-{self._next:06d}.npz")
        save_proposals_npz(path, self._ids, self._boxes, [rank_scores(b) for b in self._boxes])
        self._next += 1
        self._ids, self._boxes = [], []


def _default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def compute_proposal_file(
    images: Sequence[tuple[str, str]],
    out_path: str,
    *,
    mode: str = "fast",
    min_size: int = DEFAULT_MIN_SIZE,
    max_boxes: int | None = None,
    workers: int | None = None,
    stop_after: int | None = None,
    flush_every: int = 64,
    flush_seconds: float = 30.0,
    progress: bool = True,
    on_image_done: Callable[[str], None] | None = None,
    discard_stale_partial: bool = False,
) -> SelectiveSearchRun:
    """Compute selective-search proposals of many images into a safe ``.npz`` file.

    Resumable: finished images are flushed to ``<out_path>.partial/`` every ``flush_every``
    images or ``flush_seconds`` seconds (and when interrupted with Ctrl-C), and a later call
    with the same arguments computes only the others. The output is identical whether or not
    the run was interrupted.

    Args:
        images: (image id, image path) pairs; the file lists them in this order.
        out_path: the ``.npz`` to write.
        mode, min_size, max_boxes: see :func:`selective_search_boxes`.
        workers: processes; None uses every core available to this process.
        stop_after: compute at most this many images in this call, then stop (the rest is
            left for a later call); None runs to the end.
        flush_every, flush_seconds: how often finished images are saved to the partial file.
        progress: show a tqdm bar (images/s and ETA) on stderr.
        on_image_done: called with each image id as soon as it is finished (before it is
            flushed), e.g. to watch or to interrupt a run.
        discard_stale_partial: delete a partial file made with other settings or images
            instead of raising.

    Returns:
        A :class:`SelectiveSearchRun`. Unreadable images are skipped and listed in it (and
        left out of the output file), not raised.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images = [(str(i), os.fspath(p)) for i, p in images]
    ids = [i for i, _ in images]
    if len(set(ids)) != len(ids):
        raise ValueError("compute_proposal_file: the image ids are not unique")
    partial = _partial_dir(out_path)
    signature = _run_signature(images, mode, min_size, max_boxes)
    try:
        done = _load_partial(partial, signature)
    except _StalePartialError:
        if not discard_stale_partial:
            raise
        logger.warning("Discarding the stale partial results in %s.", partial)
        shutil.rmtree(partial)
        done = {}
    run = SelectiveSearchRun(out_path=out_path, reused=sum(i in done for i in ids))
    todo = [(k, path) for k, (image_id, path) in enumerate(images) if image_id not in done]
    if stop_after is not None:
        todo = todo[: max(0, stop_after)]
    workers = _default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(todo)))

    writer = _ChunkWriter(partial, signature)
    tasks = [(k, path, mode, min_size, max_boxes) for k, path in todo]
    bar = tqdm(
        total=len(images),
        initial=run.reused,
        unit="img",
        desc=f"selective search ({mode})",
        disable=not progress,
        dynamic_ncols=True,
    )
    last_flush = time.monotonic()
    previous_threads = cv2.getNumThreads()
    if workers == 1:
        cv2.setNumThreads(1)
        results = map(_process_image, tasks)
    else:
        results = _results_in_processes(tasks, workers)
    try:
        for k, boxes, error in results:
            image_id, path = images[k]
            if error is not None:
                run.skipped.append((image_id, path, error))
                logger.warning("Skipping image %s (%s): %s", image_id, path, error)
            else:
                done[image_id] = boxes
                writer.add(image_id, boxes)
                run.computed += 1
                if on_image_done is not None:
                    on_image_done(image_id)
            bar.update(1)
            if len(writer) >= flush_every or time.monotonic() - last_flush > flush_seconds:
                writer.flush()
                last_flush = time.monotonic()
    except BaseException:
        # Ctrl-C or a failure: keep what is finished, so that a rerun resumes from here.
        writer.flush()
        logger.warning(
            "Stopped: %d images are kept in %s; run the same command again to resume.",
            len(done),
            partial,
        )
        raise
    finally:
        if hasattr(results, "close"):
            results.close()  # stops the worker processes
        bar.close()
        cv2.setNumThreads(previous_threads)
    writer.flush()

    skipped_ids = {s[0] for s in run.skipped}
    if all(i in done or i in skipped_ids for i in ids):
        kept = [i for i in ids if i in done]
        save_proposals_npz(
            out_path, kept, [done[i] for i in kept], [rank_scores(done[i]) for i in kept]
        )
        shutil.rmtree(partial, ignore_errors=True)
        run.complete = True
    run.seconds = time.perf_counter() - start
    return run


# ----------------------------------------------------------------------------- CLI


def dataset_images(dataset_name: str, *, embedded_root: str | None = None):
    """(image id, file name) pairs of a registered Detectron2 dataset, in its order.

    The embedded dataset's names (``ohem_toy_*``) are registered first if needed.
    """
    from ohem_d2.proposals.convert import registered_dataset_dicts

    records = registered_dataset_dicts(dataset_name, embedded_root=embedded_root)
    return [(str(r["image_id"]), r["file_name"]) for r in records]


# BCCD's shipped proposals: fast mode, boxes of at least 16 px (its smallest platelets are
# 19 px wide; Fast R-CNN's 20 px were chosen for VOC's objects).
BCCD_MIN_SIZE = 16


def compute_bccd_proposals(*, missing_only: bool = True, progress: bool = True) -> list[str]:
    """Compute the proposal files of ``bccd_trainval`` and ``bccd_test`` (the registered
    BCCD, at :func:`~ohem_d2.data.bccd.default_bccd_root`) exactly as shipped: the same as

        python -m ohem_d2.proposals.selective_search --dataset bccd_SPLIT \\
            --out datasets/bccd/proposals/ss_bccd_SPLIT.npz --min-size 16

    Args:
        missing_only: compute only the files that do not exist (the shipped ones are kept).

    Returns:
        The files computed by this call.
    """
    from ohem_d2.data.bccd import BCCD_DATASET_NAMES, bccd_proposal_file

    computed = []
    for name, split in BCCD_DATASET_NAMES.items():
        out = bccd_proposal_file(None, split)
        if missing_only and os.path.exists(out):
            continue
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run = compute_proposal_file(
            dataset_images(name), out, mode="fast", min_size=BCCD_MIN_SIZE, progress=progress
        )
        if not run.complete or run.skipped:
            raise RuntimeError(f"Selective search on {name} failed for {run.skipped}")
        computed.append(out)
    return computed


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m ohem_d2.proposals.selective_search",
        description="Compute selective-search proposals of a Detectron2 dataset into a safe "
        ".npz proposal file. Interrupt at will: rerunning the same command resumes.",
    )
    parser.add_argument("--dataset", required=True, help="registered Detectron2 dataset name")
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes (default: all available cores)"
    )
    parser.add_argument(
        "--max-boxes", type=int, default=None, help="keep the K best-ranked boxes (default: all)"
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=DEFAULT_MIN_SIZE,
        help=f"drop boxes with a side below this many pixels (default {DEFAULT_MIN_SIZE}, "
        "as for Fast R-CNN's VOC boxes)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="compute at most N images in this run, then stop (a later run resumes)",
    )
    parser.add_argument(
        "--embedded-root",
        default=None,
        help="root of the embedded ohem_toy dataset (default $DETECTRON2_DATASETS/ohem_toy)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.exists(args.out) and not args.overwrite:
        print(f"{args.out} exists; pass --overwrite to replace it.", file=sys.stderr)
        return 1
    images = dataset_images(args.dataset, embedded_root=args.embedded_root)
    try:
        run = compute_proposal_file(
            images,
            args.out,
            mode=args.mode,
            min_size=args.min_size,
            max_boxes=args.max_boxes,
            workers=args.workers,
            stop_after=args.stop_after,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        return 130
    except BrokenProcessPool as e:
        print(
            f"A worker process died ({e}); out of memory, or OpenCV crashed on an image? "
            "Finished images are kept: run the same command again to resume.",
            file=sys.stderr,
        )
        return 1
    for image_id, path, reason in run.skipped:
        print(f"skipped {image_id}: {path}: {reason}", file=sys.stderr)
    done = run.computed + run.reused
    if run.complete:
        print(
            f"wrote {args.out}: {done} images ({run.computed} computed, {run.reused} resumed), "
            f"{run.boxes_per_image():.0f} boxes/image, {run.seconds:.1f} s; "
            f"{len(run.skipped)} unreadable image(s) skipped"
        )
        return 0
    print(
        f"stopped after {run.computed} images; {done}/{len(images)} done and kept in "
        f"{_partial_dir(args.out)}; run the same command again to continue"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
