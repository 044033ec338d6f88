"""Data layer: dataset registration and records, the toy dataset ``ohem_toy``, and
proposal files. Imports nothing of the project above it (proposals, engine, modeling).

Nothing is registered on import; call :func:`register_toy_dataset`.
"""

from .catalog import dataset_images, registered_dataset_dicts
from .proposal_io import (
    ProposalFileError,
    ProposalSet,
    load_proposals_into_dataset_dicts,
    read_proposal_file,
    save_proposals_npz,
)
from .toy import (
    TOY_CLASS_NAMES,
    TOY_DATASET_NAMES,
    default_toy_root,
    register_toy_dataset,
    toy_proposal_file,
)

__all__ = [
    "TOY_CLASS_NAMES",
    "TOY_DATASET_NAMES",
    "ProposalFileError",
    "ProposalSet",
    "dataset_images",
    "default_toy_root",
    "toy_proposal_file",
    "load_proposals_into_dataset_dicts",
    "read_proposal_file",
    "register_toy_dataset",
    "registered_dataset_dicts",
    "save_proposals_npz",
]
