"""Registration of the project's datasets for a training run."""

import os

from ..data.bccd import register_bccd
from ..data.embedded import (
    EMBEDDED_DATASET_NAMES,
    default_embedded_root,
    embedded_proposal_file,
    generate_embedded_dataset,
    register_embedded_dataset,
)


def register_project_datasets():
    """Register the project's datasets, the embedded ``ohem_toy_*`` and the shipped ``bccd_*``
    (Detectron2 registers VOC and COCO itself)."""
    register_embedded_dataset()
    register_bccd()


def prepare_embedded_dataset(cfg):
    """Generate the embedded dataset and its proposals if `cfg` uses it and none is there.

    An existing one is kept as it is, whatever parameters made it (tests make small ones).
    """
    if not set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST) & set(EMBEDDED_DATASET_NAMES):
        return
    root = default_embedded_root()
    if not all(os.path.exists(embedded_proposal_file(root, s)) for s in ("trainval", "test")):
        generate_embedded_dataset(root)
