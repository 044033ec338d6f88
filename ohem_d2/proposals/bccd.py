"""BCCD's shipped proposal files, computed again exactly as they were made."""

from __future__ import annotations

import os

from ..data.bccd import BCCD_PROPOSAL_SPLITS, bccd_proposal_file
from ..data.catalog import dataset_images
from .compute import compute_proposal_file

__all__ = ["BCCD_MIN_SIZE", "compute_bccd_proposals"]

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
    computed = []
    # One file per split that has its own (bccd_train and bccd_val are read from trainval's).
    for split in sorted(set(BCCD_PROPOSAL_SPLITS.values())):
        name = f"bccd_{split}"
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
