"""Registration of the project's datasets for a training run."""

from ..data.embedded import (
    EMBEDDED_DATASET_NAMES,
    generate_embedded_dataset,
    register_embedded_dataset,
)


def register_project_datasets():
    """Register the embedded dataset's names (Detectron2 registers VOC and COCO itself)."""
    register_embedded_dataset()


def prepare_embedded_dataset(cfg):
    """Generate the embedded dataset and its proposals if `cfg` uses it and it is missing."""
    if set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST) & set(EMBEDDED_DATASET_NAMES):
        generate_embedded_dataset()
