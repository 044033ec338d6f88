"""The toy dataset ``ohem_toy``: small synthetic shape images in PASCAL VOC layout.

Generated locally and deterministically (same seed, same bytes), so that the demo and the
tests need no download. Four classes of filled shapes (circle, square, triangle, star) in
random colours, sizes and rotations, a few per image, some occluded or cut by the image
border, on a textured background with clutter drawn from the same colours: irregular blobs,
elongated ellipses, shape outlines, fragments of shapes and strokes. Colour therefore says
nothing about the class; a detector has to learn shape. Some images are hard on purpose
(tiny objects, low contrast, crowds with heavy occlusion), and objects that are tiny or
mostly hidden are marked ``difficult`` (ignored by the VOC evaluator, used in training, as
in Detectron2's VOC loader).

Layout under ``root`` (``$DETECTRON2_DATASETS/ohem_toy`` by default)::

    JPEGImages/<id>.jpg   Annotations/<id>.xml   ImageSets/Main/{trainval,test}.txt
    proposals/ss_ohem_toy_{trainval,test}.npz  (selective search, fast mode, min side 8 px)

This module names and registers it; :mod:`.toy_render` draws the images,
:mod:`.toy_voc` writes the files, and
:func:`ohem_d2.proposals.toy.generate_toy_dataset` makes all of it, proposals
included (``python -m ohem_d2.proposals.toy --root datasets/ohem_toy``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .registration import is_registered_for

__all__ = [
    "TOY_CLASS_NAMES",
    "TOY_DATASET_NAMES",
    "ToyDatasetSpec",
    "default_toy_root",
    "toy_image_ids",
    "toy_proposal_file",
    "register_toy_dataset",
]

TOY_CLASS_NAMES = ("circle", "square", "triangle", "star")
TOY_DATASET_NAMES = {"ohem_toy_trainval": "trainval", "ohem_toy_test": "test"}


@dataclass(frozen=True)
class ToyDatasetSpec:
    """Parameters of the generated dataset (all of them go into the stamp file)."""

    seed: int = 0
    num_trainval: int = 144
    num_test: int = 72
    # Image sides are drawn uniformly from [min_side, max_side] pixels.
    min_side: int = 160
    max_side: int = 224
    # Selective search: fast mode; min box side scaled from Fast R-CNN's 20 px on ~500 px
    # VOC images to these ~200 px images.
    ss_mode: str = "fast"
    ss_min_size: int = 8
    jpeg_quality: int = 90


def toy_image_ids(spec: ToyDatasetSpec) -> dict[str, list[str]]:
    """The image ids of each split ("trainval", then "test"), numbered from 000001."""
    ids = [f"{i:06d}" for i in range(1, spec.num_trainval + spec.num_test + 1)]
    return {"trainval": ids[: spec.num_trainval], "test": ids[spec.num_trainval :]}


def default_toy_root() -> str:
    """``$DETECTRON2_DATASETS/ohem_toy`` (``datasets/ohem_toy`` if the variable is unset)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "ohem_toy")


def toy_proposal_file(root: str | None, split: str) -> str:
    """Path of the selective-search ``.npz`` of a split ("trainval" or "test")."""
    if split not in TOY_DATASET_NAMES.values():
        raise ValueError(f"split must be 'trainval' or 'test', got {split!r}")
    root = default_toy_root() if root is None else root
    return os.path.join(root, "proposals", f"ss_ohem_toy_{split}.npz")


def register_toy_dataset(root: str | None = None) -> tuple[str, ...]:
    """Register ``ohem_toy_trainval`` and ``ohem_toy_test`` (VOC format, year 2007).

    Idempotent for the same root. Registers only; call
    :func:`ohem_d2.proposals.toy.generate_toy_dataset` to create the files.

    Raises:
        ValueError: a name is already registered for another directory (Detectron2's
            metadata cannot change after registration).
    """
    from detectron2.data.datasets.pascal_voc import register_pascal_voc

    dirname = os.path.abspath(default_toy_root() if root is None else root)
    for name, split in TOY_DATASET_NAMES.items():
        if is_registered_for(name, dirname):
            continue
        register_pascal_voc(name, dirname, split, 2007, class_names=list(TOY_CLASS_NAMES))
    return tuple(TOY_DATASET_NAMES)
