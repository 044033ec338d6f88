"""Convert released proposal files to the safe ``.npz`` format, checked against a dataset.

Usage::

    python -m ohem_d2.proposals.convert --from fast-rcnn-mat \\
        --in selective_search_data/voc_2007_trainval.mat --dataset voc_2007_trainval \\
        --out datasets/proposals/ss_voc_2007_trainval.npz
    python -m ohem_d2.proposals.convert --from detectron-pkl --trusted \\
        --in coco_2017_val_box_proposals.pkl --dataset coco_2017_val \\
        --out datasets/proposals/rpn_coco_2017_val.npz

Sources:

- ``fast-rcnn-mat``: the selective-search files released with Fast R-CNN (and R-CNN), MATLAB
  files with ``boxes``, a cell array of one (K, 4) array per image in **1-based inclusive
  (y1, x1, y2, x2)** pixel indices, and usually ``images``, the image ids. Without
  ``images`` the boxes are taken to follow the dataset's image order (its image set file).
  Boxes keep the file's order (the selective-search ranking); the score of the r-th box is
  ``-r`` (:func:`ohem_d2.proposal_rules.rank_scores`).
- ``detectron-pkl``: Detectron2 proposal pickles (``ids``, ``boxes``, ``objectness_logits``,
  optional ``bbox_mode``) and Detectron (v1) ones (``ids``, ``boxes``, ``scores``, possibly
  Python 2 pickles). Unpickling runs arbitrary code: read only with ``trusted=True``
  (``--trusted``). Coordinates are kept as they are, as Detectron2's own loader does.

Coordinates: the output is XYXY_ABS in Detectron2's convention for VOC, where the loader
turns the 1-based inclusive annotation ``xmin..xmax`` into ``[xmin - 1, xmax)``: it
subtracts 1 from xmin/ymin only, so a box covers ``x2 - x1`` pixels. A ``.mat`` box is
converted the same way, ``(x1 - 1, y1 - 1, x2, y2)``, so that a proposal covering exactly
the pixels of an annotated object has IoU 1 with its ground-truth box. (Fast R-CNN's
``- 1`` on all four gives the same pixels in its inclusive convention, where the width is
``x2 - x1 + 1``.)

Every image's boxes are checked against the dataset's image size (the ``height``/``width``
of its Detectron2 records): boxes partly outside ``[0, width] x [0, height]`` are clipped,
boxes that are empty after clipping (``x2 <= x1`` or ``y2 <= y1``) or have NaN/inf
coordinates are dropped, and the counts are reported. A box further outside than the
loader tolerates (5% of the side, at least 2 px) means the file belongs to other or
resized images: conversion refuses it unless ``clip_far_outside`` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from detectron2.structures import BoxMode

from ..data.catalog import registered_dataset_dicts
from ..data.proposal_io import (
    ProposalFileError,
    clean_boxes,
    first_few,
    read_proposal_file,
    save_proposals_npz,
)
from ..proposal_rules import rank_scores
from .cli import add_output_arguments, parse_command

__all__ = [
    "SOURCES",
    "ConversionStats",
    "convert_detectron_pickle",
    "convert_fast_rcnn_mat",
    "main",
    "read_fast_rcnn_mat",
]

SOURCES = ("fast-rcnn-mat", "detectron-pkl")


@dataclass
class ConversionStats:
    """What a conversion did.

    Attributes:
        source: the input file.
        out_path: the ``.npz`` written.
        images: images written (= images of the dataset).
        boxes_in: boxes read.
        boxes_out: boxes written.
        clipped: boxes partly outside their image, clipped and kept.
        dropped_nonfinite: boxes dropped for NaN/inf coordinates (or scores).
        dropped_empty: boxes dropped because x2 <= x1 or y2 <= y1 after clipping.
        far_outside: boxes further outside than the tolerance (clipped or dropped; only
            non-zero with ``clip_far_outside``).
        images_without_boxes: ids of images left with no box (loading will refuse them).
    """

    source: str
    out_path: str
    images: int = 0
    boxes_in: int = 0
    boxes_out: int = 0
    clipped: int = 0
    dropped_nonfinite: int = 0
    dropped_empty: int = 0
    far_outside: int = 0
    images_without_boxes: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.dropped_nonfinite + self.dropped_empty

    def summary(self) -> str:
        text = (
            f"wrote {self.out_path}: {self.images} images, {self.boxes_out} boxes "
            f"({self.boxes_out / max(1, self.images):.0f}/image) from {self.boxes_in} in "
            f"{self.source}; clipped {self.clipped} box(es) to their image, dropped "
            f"{self.dropped} ({self.dropped_empty} empty after clipping, "
            f"{self.dropped_nonfinite} NaN/inf)"
        )
        if self.far_outside:
            text += f"; {self.far_outside} box(es) were far outside their image"
        if self.images_without_boxes:
            text += (
                f"; WARNING: {len(self.images_without_boxes)} image(s) have no box left, "
                f"e.g. {first_few(self.images_without_boxes)}, "
                "and loading the file will refuse them"
            )
        return text


# ----------------------------------------------------------------------------- checking


def _convert_checked(
    source: str,
    ids: Sequence[str],
    boxes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    dataset_dicts: list[dict],
    out_path: str,
    *,
    clip_far_outside: bool,
) -> ConversionStats:
    """Write the proposals of ``ids`` (XYXY_ABS) in the dataset's order, checked and cleaned.

    The ids must be the dataset's, each once (the callers check where they come from)."""
    index = {image_id: i for i, image_id in enumerate(ids)}
    stats = ConversionStats(source=source, out_path=out_path)
    out_ids, out_boxes, out_scores = [], [], []
    for record in dataset_dicts:
        image_id = str(record["image_id"])
        i = index[image_id]
        height, width = _image_size(record)
        where = f"{source}: image {image_id!r} ({record.get('file_name', 'no file name')})"
        kept, keep, counts = clean_boxes(
            boxes[i],
            height,
            width,
            scores=scores[i],
            clip_far_outside=clip_far_outside,
            where=where,
        )
        stats.boxes_in += len(keep)
        stats.clipped += counts["clipped"]
        stats.dropped_nonfinite += counts["dropped_nonfinite"]
        stats.dropped_empty += counts["dropped_empty"]
        stats.far_outside += counts["far_outside"]
        if len(kept) == 0:
            stats.images_without_boxes.append(image_id)
        out_ids.append(image_id)
        out_boxes.append(kept)
        out_scores.append(np.asarray(scores[i], dtype=np.float32).reshape(-1)[keep])
    stats.images = len(out_ids)
    stats.boxes_out = sum(len(b) for b in out_boxes)
    save_proposals_npz(out_path, out_ids, out_boxes, out_scores, BoxMode.XYXY_ABS)
    return stats


def _image_size(record: dict) -> tuple[int, int]:
    if "height" in record and "width" in record:
        return int(record["height"]), int(record["width"])
    # Records without a size (rare: Detectron2's builtin loaders all give one): read the
    # image header, which is cheap.
    from PIL import Image, ImageOps

    try:
        with Image.open(record["file_name"]) as image:
            width, height = ImageOps.exif_transpose(image).size
    except (OSError, KeyError) as e:
        raise ProposalFileError(
            f"Image {record.get('image_id')!r}: the dataset record has no height/width and "
            f"the image {record.get('file_name')!r} cannot be read to get them: {e}"
        ) from e
    return height, width


def _match_ids(source: str, file_ids: Sequence[str], dataset_dicts: list[dict]) -> list[str]:
    """Map the file's image ids to the dataset's (by image id, else by file name stem: the
    file's ids may be file names with or without directory and extension).

    Raises:
        ProposalFileError: duplicates, ids not in the dataset (naming the first few), or a
            number of images different from the dataset's.
    """
    by_id = {str(r["image_id"]): str(r["image_id"]) for r in dataset_dicts}
    by_stem = {}
    for r in dataset_dicts:
        if "file_name" in r:
            by_stem.setdefault(os.path.splitext(os.path.basename(r["file_name"]))[0], []).append(
                str(r["image_id"])
            )
    matched, unknown = [], []
    for file_id in file_ids:
        stem = os.path.splitext(os.path.basename(file_id))[0]  # ids given as file names
        if file_id in by_id:
            matched.append(by_id[file_id])
        elif len(by_stem.get(stem, ())) == 1:
            matched.append(by_stem[stem][0])
        else:
            unknown.append(file_id)
    if unknown:
        raise ProposalFileError(
            f"{source}: {len(unknown)} of its {len(file_ids)} image ids are not in the dataset "
            f"({len(dataset_dicts)} images), e.g. {first_few(unknown)}. Is it the proposal file "
            "of another image set or split?"
        )
    seen, duplicates = set(), []
    for image_id in matched:
        if image_id in seen:
            duplicates.append(image_id)
        seen.add(image_id)
    if duplicates:
        raise ProposalFileError(
            f"{source} lists {len(duplicates)} image(s) more than once, "
            f"e.g. {first_few(duplicates)}."
        )
    if len(matched) != len(dataset_dicts):
        missing = [str(r["image_id"]) for r in dataset_dicts if str(r["image_id"]) not in seen]
        raise ProposalFileError(
            f"{source} has proposals for {len(matched)} images but the dataset has "
            f"{len(dataset_dicts)}; missing e.g. {first_few(missing)}."
        )
    return matched


# ----------------------------------------------------------------------------- Fast R-CNN .mat


def read_fast_rcnn_mat(path: str) -> tuple[list[str] | None, list[np.ndarray]]:
    """Read a Fast R-CNN selective-search ``.mat`` file.

    Returns:
        (image ids, or None when the file has no ``images`` variable; per image, a (K, 4)
        float64 array of XYXY_ABS boxes in Detectron2's convention, see the module
        docstring). Coordinates are not checked here.

    Raises:
        ProposalFileError: unreadable file or unexpected layout, naming the file and key.
    """
    import scipy.io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ProposalFileError(f"Proposal file {path!r} does not exist.")
    try:
        data = scipy.io.loadmat(path)
    except NotImplementedError as e:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise ProposalFileError(
            f"{path!r} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; re-save it "
            f"in MATLAB/Octave with save('-v7', ...): {e}"
        ) from e
    except Exception as e:  # scipy raises ValueError, TypeError, ... for non-.mat content
        raise ProposalFileError(f"{path!r} is not a readable MATLAB .mat file: {e}") from e
    if "boxes" not in data:
        found = sorted(k for k in data if not k.startswith("__"))
        raise ProposalFileError(
            f"{path!r} has no variable 'boxes' (it has {found}); a Fast R-CNN selective-search "
            "file holds 'boxes' (a cell array, one K x 4 matrix per image) and 'images'."
        )
    cells = data["boxes"]
    if cells.dtype != object:
        raise ProposalFileError(
            f"{path!r}: variable 'boxes' is a {cells.dtype} matrix of shape {cells.shape}, not "
            "a cell array with one K x 4 matrix per image."
        )
    boxes = []
    for i, cell in enumerate(cells.ravel(order="F")):
        cell = np.asarray(cell)
        if cell.size == 0:
            boxes.append(np.zeros((0, 4)))
            continue
        if cell.ndim != 2 or cell.shape[1] != 4 or cell.dtype.kind not in "iuf":
            raise ProposalFileError(
                f"{path!r}: boxes{{{i + 1}}} is a {cell.dtype} array of shape {cell.shape}; "
                "expected a K x 4 numeric matrix (y1 x1 y2 x2)."
            )
        y1, x1, y2, x2 = cell.astype(np.float64).T
        # 1-based inclusive pixel indices -> Detectron2's [xmin - 1, xmax) (module docstring).
        boxes.append(np.stack([x1 - 1, y1 - 1, x2, y2], axis=1))
    ids = None
    if "images" in data:
        ids = _mat_strings(data["images"], path)
        if len(ids) != len(boxes):
            raise ProposalFileError(
                f"{path!r}: 'images' lists {len(ids)} images but 'boxes' has {len(boxes)}."
            )
    return ids, boxes


def _mat_strings(value: np.ndarray, path: str) -> list[str]:
    """Image ids from a MATLAB cell array of strings/numbers or a char matrix."""
    if value.dtype.kind == "U":  # a char matrix: scipy gives one string per row
        return [str(s).strip() for s in value.ravel()]
    if value.dtype.kind in "iuf":  # numeric ids (e.g. COCO)
        return [str(int(v)) for v in value.ravel(order="F")]
    out = []
    for i, item in enumerate(value.ravel(order="F")):
        item = np.asarray(item).ravel()
        if item.size != 1:
            raise ProposalFileError(
                f"{path!r}: images{{{i + 1}}} is {item!r}, not one image id string."
            )
        element = item[0]
        if isinstance(element, (np.integer, np.floating)):
            out.append(str(int(element)))
        else:
            out.append(str(element).strip())
    return out


def convert_fast_rcnn_mat(
    mat_path: str, dataset_dicts: list[dict], out_path: str, *, clip_far_outside: bool = False
) -> ConversionStats:
    """Convert a Fast R-CNN selective-search ``.mat`` file for the given dataset.

    Args:
        mat_path: the ``.mat`` file.
        dataset_dicts: the Detectron2 records of the dataset, in its image set order (used
            for the image sizes, and for the order when the file has no ``images``).
        out_path: the ``.npz`` to write.
        clip_far_outside: see :func:`ohem_d2.data.proposal_io.clean_boxes`.

    Raises:
        ProposalFileError: unreadable file, image count different from the dataset's (both
            numbers in the message), image ids not in the dataset, far-outside boxes.
    """
    ids, boxes = read_fast_rcnn_mat(mat_path)
    source = f"proposal file {os.fspath(mat_path)!r}"
    if ids is None:
        if len(boxes) != len(dataset_dicts):
            raise ProposalFileError(
                f"{source} has boxes for {len(boxes)} images but the dataset has "
                f"{len(dataset_dicts)} images; without an 'images' variable the file must "
                "follow the dataset's image set one to one. Is it the file of another split?"
            )
        ids = [str(r["image_id"]) for r in dataset_dicts]
    else:
        # Unknown ids are named first (another image set is the likelier mistake), then a
        # count that differs from the dataset's.
        ids = _match_ids(source, ids, dataset_dicts)
    scores = [rank_scores(b) for b in boxes]
    return _convert_checked(
        source, ids, boxes, scores, dataset_dicts, out_path, clip_far_outside=clip_far_outside
    )


# ----------------------------------------------------------------------------- Detectron pickles


def convert_detectron_pickle(
    pkl_path: str,
    dataset_dicts: list[dict],
    out_path: str,
    *,
    trusted: bool = False,
    clip_far_outside: bool = False,
) -> ConversionStats:
    """Convert a Detectron (v1) or Detectron2 proposal pickle for the given dataset.

    Boxes keep their coordinates (converted to XYXY_ABS if the file says XYWH_ABS); the
    scores are the file's ``objectness_logits`` (Detectron2) or ``scores`` (Detectron).

    Raises:
        ProposalFileError: ``trusted`` is False (unpickling can run arbitrary code), an
            unreadable or malformed file, ids not in the dataset or missing from the file,
            far-outside boxes.
    """
    source = f"proposal file {os.fspath(pkl_path)!r}"
    if not trusted:
        raise ProposalFileError(
            f"Refusing to read {source}: unpickling a file can run arbitrary code. Pass "
            "--trusted (trusted=True) only if you trust where the file comes from."
        )
    proposals = read_proposal_file(pkl_path, trusted=True)
    ids = _match_ids(source, proposals.ids, dataset_dicts)
    boxes = [
        BoxMode.convert(b.astype(np.float64), proposals.bbox_mode, BoxMode.XYXY_ABS)
        for b in proposals.boxes
    ]
    return _convert_checked(
        source,
        ids,
        boxes,
        proposals.scores,
        dataset_dicts,
        out_path,
        clip_far_outside=clip_far_outside,
    )


# ----------------------------------------------------------------------------- CLI


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m ohem_d2.proposals.convert",
        description="Convert Fast R-CNN selective-search .mat files or Detectron/Detectron2 "
        "proposal pickles into the safe .npz proposal format, checked against a dataset.",
    )
    parser.add_argument("--from", dest="source", choices=SOURCES, required=True)
    parser.add_argument("--in", dest="input", required=True, help="the file to convert")
    parser.add_argument("--dataset", required=True, help="registered Detectron2 dataset name")
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument(
        "--trusted",
        action="store_true",
        help="allow unpickling a detectron-pkl file (it can run arbitrary code)",
    )
    parser.add_argument(
        "--clip-far-outside",
        action="store_true",
        help="clip boxes far outside their image instead of refusing the file",
    )
    add_output_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = parse_command(_parser(), argv)
    if args is None:
        return 1
    if args.source == "detectron-pkl" and not args.trusted:
        print(
            f"Refusing to read {args.input!r}: unpickling a file can run arbitrary code. "
            "Pass --trusted only if you trust where the file comes from.",
            file=sys.stderr,
        )
        return 2
    try:
        dicts = registered_dataset_dicts(args.dataset, toy_root=args.toy_root)
        if args.source == "fast-rcnn-mat":
            stats = convert_fast_rcnn_mat(
                args.input, dicts, args.out, clip_far_outside=args.clip_far_outside
            )
        else:
            stats = convert_detectron_pickle(
                args.input,
                dicts,
                args.out,
                trusted=args.trusted,
                clip_far_outside=args.clip_far_outside,
            )
    except (ProposalFileError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
