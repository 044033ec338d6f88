"""Data layer: dataset registration and records, the embedded ``ohem_toy`` dataset, and
proposal files. Imports nothing of the project above it (proposals, engine, modeling).

Nothing is registered on import; call :func:`register_embedded_dataset`.
"""

from .catalog import dataset_images, registered_dataset_dicts
from .embedded import (
    EMBEDDED_CLASS_NAMES,
    EMBEDDED_DATASET_NAMES,
    default_embedded_root,
    embedded_proposal_file,
    register_embedded_dataset,
)
from .proposal_io import (
    ProposalFileError,
    ProposalSet,
    load_proposals_into_dataset_dicts,
    read_proposal_file,
    save_proposals_npz,
)

__all__ = [
    "EMBEDDED_CLASS_NAMES",
    "EMBEDDED_DATASET_NAMES",
    "ProposalFileError",
    "ProposalSet",
    "dataset_images",
    "default_embedded_root",
    "embedded_proposal_file",
    "load_proposals_into_dataset_dicts",
    "read_proposal_file",
    "register_embedded_dataset",
    "registered_dataset_dicts",
    "save_proposals_npz",
]
