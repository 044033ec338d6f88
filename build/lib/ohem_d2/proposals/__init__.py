"""Proposal generators that run offline, before training (selective search)."""

from .selective_search import (
    DEFAULT_MIN_SIZE,
    MODES,
    SelectiveSearchRun,
    compute_proposal_file,
    dataset_images,
    selective_search_boxes,
)

__all__ = [
    "DEFAULT_MIN_SIZE",
    "MODES",
    "SelectiveSearchRun",
    "compute_proposal_file",
    "dataset_images",
    "selective_search_boxes",
]
