"""Proposals made offline, before training: selective search, the toy dataset with its
proposals, and conversion of released proposal files. Reads and writes files through
:mod:`ohem_d2.data`; nothing below imports this package."""

from .bccd import BCCD_MIN_SIZE, compute_bccd_proposals
from .compute import SelectiveSearchRun, compute_proposal_file
from .search import DEFAULT_MIN_SIZE, MODES, selective_search_boxes
from .toy import generate_toy_dataset

__all__ = [
    "BCCD_MIN_SIZE",
    "DEFAULT_MIN_SIZE",
    "MODES",
    "SelectiveSearchRun",
    "compute_bccd_proposals",
    "compute_proposal_file",
    "generate_toy_dataset",
    "selective_search_boxes",
]
