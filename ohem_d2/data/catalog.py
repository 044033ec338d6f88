"""Records of a dataset by name, the project's own names registered on demand (the command
lines take a dataset name and need no separate registration step)."""

from __future__ import annotations

from .bccd import BCCD_DATASET_NAMES, register_bccd
from .toy import TOY_DATASET_NAMES, register_toy_dataset

__all__ = ["dataset_images", "registered_dataset_dicts"]


def registered_dataset_dicts(dataset_name: str, *, toy_root: str | None = None) -> list[dict]:
    """The records of a registered Detectron2 dataset (the project's own names, ``ohem_toy_*``
    and ``bccd_*``, are registered first if they are not yet)."""
    from detectron2.data import DatasetCatalog

    if dataset_name in TOY_DATASET_NAMES and dataset_name not in DatasetCatalog.list():
        register_toy_dataset(toy_root)
    if dataset_name in BCCD_DATASET_NAMES and dataset_name not in DatasetCatalog.list():
        register_bccd()
    if dataset_name not in DatasetCatalog.list():
        import detectron2.data.datasets  # noqa: F401  (registers Detectron2's builtin names)
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset {dataset_name!r} is not registered. Known: "
            f"{', '.join(sorted(DatasetCatalog.list()))}"
        )
    return DatasetCatalog.get(dataset_name)


def dataset_images(dataset_name: str, *, toy_root: str | None = None):
    """(image id, file name) pairs of a registered Detectron2 dataset, in its order.

    The toy dataset's names (``ohem_toy_*``) are registered first if needed.
    """
    records = registered_dataset_dicts(dataset_name, toy_root=toy_root)
    return [(str(r["image_id"]), r["file_name"]) for r in records]
