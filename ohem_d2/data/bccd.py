"""BCCD: real blood-cell microscopy images (RBC, WBC, Platelets), shipped with the project.

364 JPEGs of 640 x 480 in PASCAL VOC layout under ``datasets/bccd/`` (MIT licence, see its
``LICENSE`` and ``README.upstream.md``), registered as ``bccd_trainval`` (292 images) and
``bccd_test`` (72) from its ``ImageSets/Main``. The dataset's own split of trainval into
``train`` (205) and ``val`` (87) is registered too, as ``bccd_train`` and ``bccd_val``: a
held-out set on which settings can be chosen without looking at ``bccd_test``.

Its annotations have two known faults, handled as bad input is handled in this project:
counted and named in the log, dropped from what the model trains and is evaluated on, the
files on disk left untouched:

- degenerate boxes (``xmin == xmax`` or ``ymin == ymax`` in the XML: a point, not a cell);
- cells annotated twice: a second box of the same class with IoU >= ``DUPLICATE_IOU`` with an
  earlier one of the same image (the first one is kept).

Many red cells are not annotated at all (overlapping cells, cells cut by the border); nothing
can be done about that here, and it matters for hard example mining (studies/bccd_unlabelled.md).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torchvision.ops import box_iou

from .registration import is_registered_for

__all__ = [
    "BCCD_CLASS_NAMES",
    "BCCD_DATASET_NAMES",
    "BCCD_PROPOSAL_SPLITS",
    "DUPLICATE_IOU",
    "AnnotationCleaning",
    "bccd_proposal_file",
    "clean_annotations",
    "default_bccd_root",
    "load_bccd_instances",
    "register_bccd",
]

logger = logging.getLogger(__name__)

BCCD_CLASS_NAMES = ("RBC", "WBC", "Platelets")
BCCD_DATASET_NAMES = {
    "bccd_trainval": "trainval",
    "bccd_test": "test",
    "bccd_train": "train",
    "bccd_val": "val",
}
# The shipped proposal file of each split: train and val are parts of trainval, whose file
# holds their images too.
BCCD_PROPOSAL_SPLITS = {
    "trainval": "trainval",
    "test": "test",
    "train": "trainval",
    "val": "trainval",
}
# The duplicated cells of BCCD are offset by 2-6 px (IoU 0.83-0.93); two distinct cells of
# the same class never overlap that much in it (the next highest same-class IoU is 0.60).
DUPLICATE_IOU = 0.8
_MAX_NAMED = 10
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_bccd_root() -> str:
    """``$DETECTRON2_DATASETS/bccd`` if that folder exists, else the copy shipped in this
    repository's ``datasets/bccd``."""
    in_env = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "bccd")
    if os.path.isdir(in_env):
        return in_env
    return os.path.join(_REPO, "datasets", "bccd")


def bccd_proposal_file(root: str | None, split: str) -> str:
    """Path of the shipped selective-search ``.npz`` that holds a split's images ("trainval"
    or "test"; "train" and "val" are in trainval's)."""
    if split not in BCCD_PROPOSAL_SPLITS:
        raise ValueError(f"split must be one of {sorted(BCCD_PROPOSAL_SPLITS)}, got {split!r}")
    root = default_bccd_root() if root is None else root
    return os.path.join(root, "proposals", f"ss_bccd_{BCCD_PROPOSAL_SPLITS[split]}.npz")


class AnnotationCleaning:
    """What :func:`clean_annotations` dropped: (image id, class id, XYXY box) per problem."""

    def __init__(self):
        self.degenerate, self.duplicate = [], []

    def summary(self, dataset_name: str, class_names) -> str:
        def named(items):
            shown = [f"{i} {class_names[c]} {[round(v, 1) for v in b]}" for i, c, b in items]
            more = len(items) - _MAX_NAMED
            return "; ".join(shown[:_MAX_NAMED]) + (f"; and {more} more" if more > 0 else "")

        parts = []
        if self.degenerate:
            parts.append(
                f"dropped {len(self.degenerate)} degenerate box(es): {named(self.degenerate)}"
            )
        if self.duplicate:
            parts.append(
                f"dropped {len(self.duplicate)} duplicate box(es) (same class, IoU >= "
                f"{DUPLICATE_IOU} with an earlier box): {named(self.duplicate)}"
            )
        found = "; ".join(parts) if parts else "no degenerate or duplicate box"
        return f"{dataset_name}: {found} (the annotation files are left untouched)."


def _boxes(boxes) -> torch.Tensor:
    """(K, 4) XYXY boxes in float64, as the cleaning compares them."""
    return torch.as_tensor(np.asarray(boxes, dtype=np.float64))


def clean_annotations(dataset_dicts: list[dict]) -> AnnotationCleaning:
    """Drop degenerate and duplicate boxes from Detectron2 VOC dataset dicts, in place.

    A box is degenerate when its XML has ``xmin == xmax`` or ``ymin == ymax`` (Detectron2's
    VOC loader shifts xmin and ymin by -1, so such a box arrives 1 px wide or high).

    Returns:
        An :class:`AnnotationCleaning` listing every dropped box.
    """
    cleaning = AnnotationCleaning()
    for record in dataset_dicts:
        kept = []
        for ann in record["annotations"]:
            box = np.asarray(ann["bbox"], dtype=np.float64)
            where = (record["image_id"], ann["category_id"], ann["bbox"])
            if box[2] - box[0] <= 1 or box[3] - box[1] <= 1:
                cleaning.degenerate.append(where)
                continue
            same = [k["bbox"] for k in kept if k["category_id"] == ann["category_id"]]
            if same and box_iou(_boxes([box]), _boxes(same)).max() >= DUPLICATE_IOU:
                cleaning.duplicate.append(where)
                continue
            kept.append(ann)
        record["annotations"] = kept
    return cleaning


def load_bccd_instances(dirname: str, split: str, dataset_name: str) -> list[dict]:
    """Detectron2's VOC loader, then :func:`clean_annotations`, with the result logged."""
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    if not os.path.isdir(os.path.join(dirname, "Annotations")):
        raise FileNotFoundError(
            f"BCCD is not at {dirname!r} (no Annotations/ folder). It ships with the "
            "repository in datasets/bccd/; run from the repository root or set "
            "DETECTRON2_DATASETS to the folder that holds bccd/."
        )
    dicts = load_voc_instances(dirname, split, list(BCCD_CLASS_NAMES))
    logger.info(clean_annotations(dicts).summary(dataset_name, BCCD_CLASS_NAMES))
    return dicts


def register_bccd(root: str | None = None) -> tuple[str, ...]:
    """Register ``bccd_trainval``, ``bccd_test``, ``bccd_train`` and ``bccd_val`` (VOC layout,
    VOC2007 11-point metric).

    Idempotent for the same root.

    Raises:
        ValueError: a name is already registered for another directory.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dirname = os.path.abspath(default_bccd_root() if root is None else root)
    for name, split in BCCD_DATASET_NAMES.items():
        if is_registered_for(name, dirname):
            continue
        DatasetCatalog.register(
            name, lambda d=dirname, s=split, n=name: load_bccd_instances(d, s, n)
        )
        # annotations_cleaned: the VOC evaluator must score against the cleaned dicts, not
        # the raw XML files (engine/evaluation.py).
        MetadataCatalog.get(name).set(
            thing_classes=list(BCCD_CLASS_NAMES),
            dirname=dirname,
            year=2007,
            split=split,
            annotations_cleaned=True,
        )
    return tuple(BCCD_DATASET_NAMES)
