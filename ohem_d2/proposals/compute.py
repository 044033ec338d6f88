"""Selective-search proposals of many images, written as one safe ``.npz`` proposal file.

The score of an image's r-th box (r = 0, 1, ...) is ``-r``, so loading, which sorts by
descending score, keeps OpenCV's ranking and ``PRECOMPUTED_PROPOSAL_TOPK_*`` keeps the
best-ranked boxes. Finished images are kept in ``<out>.partial/`` (:mod:`.partial`) so that
an interrupted run resumes where it stopped; the directory is removed once the output is
written.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..data.proposal_io import read_proposal_file, save_proposals_npz
from ..proposal_rules import rank_scores
from .partial import ChunkWriter, StalePartialError, load_partial, partial_dir, run_signature
from .search import DEFAULT_MIN_SIZE, MODES
from .workers import default_workers, process_image, results_in_processes

__all__ = ["SelectiveSearchRun", "compute_proposal_file"]

logger = logging.getLogger(__name__)


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
        mode, min_size, max_boxes: see :func:`.search.selective_search_boxes`.
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
    partial = partial_dir(out_path)
    signature = run_signature(images, mode, min_size, max_boxes)
    try:
        done = load_partial(partial, signature)
    except StalePartialError:
        if not discard_stale_partial:
            raise
        logger.warning("Discarding the stale partial results in %s.", partial)
        shutil.rmtree(partial)
        done = {}
    run = SelectiveSearchRun(out_path=out_path, reused=sum(i in done for i in ids))
    pending = [(k, path) for k, (image_id, path) in enumerate(images) if image_id not in done]
    if stop_after is not None:
        pending = pending[: max(0, stop_after)]
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(pending)))

    writer = ChunkWriter(partial, signature)
    tasks = [(k, path, mode, min_size, max_boxes) for k, path in pending]
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
        results = map(process_image, tasks)
    else:
        results = results_in_processes(tasks, workers)
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
