"""Data layer: proposal files and the embedded ``ohem_toy`` dataset.

Nothing is registered on import; call :func:`register_embedded_dataset`.
"""

from .embedded import (
    EMBEDDED_CLASS_NAMES,
    EMBEDDED_DATASET_NAMES,
    default_embedded_root,
    embedded_proposal_file,
    generate_embedded_dataset,
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
    "default_embedded_root",
    "embedded_proposal_file",
    "generate_embedded_dataset",
    "load_proposals_into_dataset_dicts",
    "read_proposal_file",
    "register_embedded_dataset",
    "save_proposals_npz",
]
