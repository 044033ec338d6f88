"""Registration of the project's datasets for a training run."""

import os

from ..data.embedded import (
    EMBEDDED_DATASET_NAMES,
    generate_embedded_dataset,
    register_embedded_dataset,
)


def embedded_root():
    """Where the embedded dataset lives: $DETECTRON2_DATASETS/ohem_toy (default ./datasets)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "ohem_toy")


def register_project_datasets():
    """Register the embedded dataset's names (Detectron2 registers VOC and COCO itself)."""
    register_embedded_dataset(embedded_root())


def prepare_embedded_dataset(cfg):
    """Generate the embedded dataset and its proposals if `cfg` uses it and it is missing."""
    if set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST) & set(EMBEDDED_DATASET_NAMES):
        generate_embedded_dataset(embedded_root())
