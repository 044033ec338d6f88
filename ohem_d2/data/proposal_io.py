"""Precomputed proposal files: the safe ``.npz`` format, Detectron2's pickles, and loading.

The ``.npz`` format (``format_version`` 1) holds, for N images with M boxes in total:

==================  ========  =====================================================
key                 shape     meaning
==================  ========  =====================================================
``ids``             (N,)      image ids as unicode strings (``str(record["image_id"])``)
``counts``          (N,)      int64, number of boxes of each image, in ``ids`` order
``boxes``           (M, 4)    float32, the boxes of all images concatenated
``scores``          (M,)      float32, one score per box (higher = ranked first)
``bbox_mode``       ()        int, a Detectron2 ``BoxMode`` value (XYXY_ABS or XYWH_ABS)
``format_version``  ()        int64, 1
==================  ========  =====================================================

It is read with ``np.load(..., allow_pickle=False)``, so a file from anywhere is safe to
open. Detectron2's own format is a pickle (``ids``, ``boxes``, ``objectness_logits``, optional
``bbox_mode``); unpickling runs arbitrary code, so it is read only when the caller says the
file is trusted (config key ``DATASETS.PROPOSAL_FILES_TRUSTED``).

Boxes that stick out of their image by at most ``outside_tolerance`` of its side are clipped
to the image (many proposal sources round outwards); a box further outside means the file
does not belong to these images (another dataset, a resized copy, swapped coordinates), so
loading refuses it.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from detectron2.structures import BoxMode

from ..fileio import write_atomic
from ..proposal_rules import OUTSIDE_TOLERANCE, clip_to_image, min_size_mask

__all__ = [
    "NPZ_FORMAT_VERSION",
    "ProposalFileError",
    "ProposalSet",
    "clean_boxes",
    "first_few",
    "load_proposals_into_dataset_dicts",
    "read_proposal_file",
    "save_proposals_npz",
]

logger = logging.getLogger(__name__)

NPZ_FORMAT_VERSION = 1
_NPZ_KEYS = ("ids", "counts", "boxes", "scores", "bbox_mode", "format_version")
_SUPPORTED_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
# Fixed member timestamp, so that equal contents give byte-identical files.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_MAX_NAMED = 5


class ProposalFileError(ValueError):
    """A proposal file is missing, unsafe to read, malformed, or does not fit the dataset."""


@dataclass
class ProposalSet:
    """The content of a proposal file.

    Attributes:
        ids: N image ids, as strings.
        boxes: N arrays of shape (K_i, 4), float32, in ``bbox_mode``.
        scores: N arrays of shape (K_i,), float32.
        bbox_mode: the ``BoxMode`` of ``boxes``.
        path: the file it was read from (for messages).
    """

    ids: list[str]
    boxes: list[np.ndarray]
    scores: list[np.ndarray]
    bbox_mode: BoxMode
    path: str = ""


# ----------------------------------------------------------------------------- writing


def save_proposals_npz(
    path: str,
    ids: Sequence,
    boxes_per_image: Sequence[np.ndarray],
    scores_per_image: Sequence[np.ndarray],
    bbox_mode: BoxMode = BoxMode.XYXY_ABS,
) -> str:
    """Write proposals in the safe ``.npz`` format, atomically (temporary file + rename).

    Args:
        path: output file; its directory is created if needed.
        ids: N image ids (converted with ``str``).
        boxes_per_image: N arrays of shape (K_i, 4) in ``bbox_mode``.
        scores_per_image: N arrays of shape (K_i,); higher scores are ranked first on loading.
        bbox_mode: ``BoxMode.XYXY_ABS`` or ``BoxMode.XYWH_ABS``.

    Returns:
        ``path``. Equal inputs give byte-identical files.
    """
    ids = [str(i) for i in ids]
    if not (len(ids) == len(boxes_per_image) == len(scores_per_image)):
        raise ValueError(
            f"save_proposals_npz: {len(ids)} ids, {len(boxes_per_image)} box arrays and "
            f"{len(scores_per_image)} score arrays; they must have the same length"
        )
    bbox_mode = BoxMode(bbox_mode)
    if bbox_mode not in _SUPPORTED_MODES:
        raise ValueError(f"save_proposals_npz: bbox_mode {bbox_mode!r} is not supported")
    boxes_list, scores_list = [], []
    for image_id, boxes, scores in zip(ids, boxes_per_image, scores_per_image):
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(
                f"save_proposals_npz: image {image_id!r} has {len(boxes)} boxes "
                f"but {len(scores)} scores"
            )
        boxes_list.append(boxes)
        scores_list.append(scores)
    arrays = {
        "ids": np.asarray(ids, dtype=str) if ids else np.zeros((0,), dtype="<U1"),
        "counts": np.asarray([len(b) for b in boxes_list], dtype=np.int64),
        "boxes": (np.concatenate(boxes_list) if boxes_list else np.zeros((0, 4), dtype=np.float32)),
        "scores": (
            np.concatenate(scores_list) if scores_list else np.zeros((0,), dtype=np.float32)
        ),
        "bbox_mode": np.asarray(int(bbox_mode), dtype=np.int64),
        "format_version": np.asarray(NPZ_FORMAT_VERSION, dtype=np.int64),
    }
    _write_npz_atomic(path, arrays)
    return path


def _write_npz_atomic(path: str, arrays: dict) -> None:
    # np.savez stamps each member with the current time; writing the zip here with a fixed
    # timestamp makes the bytes depend on the content only.
    def write(f):
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    write_atomic(path, write)


# ----------------------------------------------------------------------------- reading


def read_proposal_file(path: str, *, trusted: bool = False) -> ProposalSet:
    """Read a proposal file (``.npz``, or a Detectron2 pickle if ``trusted``).

    The format is recognised by content (an ``.npz`` is a zip archive), not by extension.

    Raises:
        ProposalFileError: missing file, a pickle while ``trusted`` is False, or a malformed
            file; the message names the file and the offending key.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ProposalFileError(f"Proposal file {path!r} does not exist.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK"):
        return _read_npz(path)
    if not trusted:
        raise ProposalFileError(
            f"Proposal file {path!r} is not an .npz archive; it looks like a pickle. "
            "Unpickling a file can run arbitrary code, so pickles are read only when you "
            "trust their origin: set the config key DATASETS.PROPOSAL_FILES_TRUSTED True "
            "(or pass trusted=True), or convert the file to the safe .npz format with "
            "ohem_d2.data.proposal_io.save_proposals_npz."
        )
    return _read_detectron2_pickle(path)


def _read_npz(path: str) -> ProposalSet:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _NPZ_KEYS if k not in npz.files]
            if missing:
                raise ProposalFileError(
                    f"Proposal file {path!r} lacks the key(s) {missing}; an ohem-d2 .npz "
                    f"proposal file has the keys {list(_NPZ_KEYS)}."
                )
            arrays = {k: npz[k] for k in _NPZ_KEYS}
    except ProposalFileError:
        raise
    except ValueError as e:
        # np.load raises ValueError for object arrays, which would need pickle.
        raise ProposalFileError(f"Proposal file {path!r} cannot be read safely: {e}") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ProposalFileError(f"Proposal file {path!r} is not a readable .npz: {e}") from e

    def bad(key, problem):
        return ProposalFileError(f"Proposal file {path!r}: key {key!r} {problem}.")

    version = arrays["format_version"]
    if version.shape != () or version.dtype.kind not in "iu":
        raise bad(
            "format_version", f"must be an integer scalar, got {version.dtype}{version.shape}"
        )
    if int(version) != NPZ_FORMAT_VERSION:
        raise bad("format_version", f"is {int(version)}; this code reads {NPZ_FORMAT_VERSION}")
    ids, counts, boxes, scores = (arrays[k] for k in ("ids", "counts", "boxes", "scores"))
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise bad("ids", f"must be a 1-d array of unicode strings, got {ids.dtype}{ids.shape}")
    if counts.shape != ids.shape or counts.dtype.kind not in "iu":
        raise bad("counts", f"must be {ids.shape} integers, got {counts.dtype}{counts.shape}")
    if (counts < 0).any():
        raise bad("counts", "has negative entries")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype.kind != "f":
        raise bad("boxes", f"must be an (M, 4) float array, got {boxes.dtype}{boxes.shape}")
    if scores.shape != (len(boxes),) or scores.dtype.kind != "f":
        raise bad("scores", f"must be ({len(boxes)},) floats, got {scores.dtype}{scores.shape}")
    if int(counts.sum()) != len(boxes):
        raise bad("counts", f"sums to {int(counts.sum())} but 'boxes' has {len(boxes)} rows")
    bbox_mode = _parse_bbox_mode(arrays["bbox_mode"], path)
    split_at = np.cumsum(counts)[:-1]
    return ProposalSet(
        ids=ids.tolist(),
        boxes=np.split(boxes.astype(np.float32, copy=False), split_at),
        scores=np.split(scores.astype(np.float32, copy=False), split_at),
        bbox_mode=bbox_mode,
        path=path,
    )


def _read_detectron2_pickle(path: str) -> ProposalSet:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except Exception as e:
        raise ProposalFileError(f"Proposal file {path!r} is not a readable pickle: {e}") from e
    if not isinstance(data, dict):
        raise ProposalFileError(
            f"Proposal file {path!r} holds a {type(data).__name__}, not a dict with the keys "
            "'ids', 'boxes', 'objectness_logits'."
        )
    # Detectron (v1) files name two keys differently; Detectron2 accepts them too.
    for old, new in (("indexes", "ids"), ("scores", "objectness_logits")):
        if old in data and new not in data:
            data[new] = data[old]
    missing = [k for k in ("ids", "boxes", "objectness_logits") if k not in data]
    if missing:
        raise ProposalFileError(f"Proposal file {path!r} lacks the key(s) {missing}.")
    ids, boxes, logits = data["ids"], data["boxes"], data["objectness_logits"]
    if not (len(ids) == len(boxes) == len(logits)):
        raise ProposalFileError(
            f"Proposal file {path!r}: 'ids', 'boxes' and 'objectness_logits' have lengths "
            f"{len(ids)}, {len(boxes)}, {len(logits)}; they must be equal."
        )
    bbox_mode = _parse_bbox_mode(data.get("bbox_mode", BoxMode.XYXY_ABS), path)
    boxes_out, scores_out = [], []
    for image_id, b, s in zip(ids, boxes, logits):
        b, s = np.asarray(b), np.asarray(s)
        if b.ndim != 2 or b.shape[1] != 4 or s.shape != (len(b),):
            raise ProposalFileError(
                f"Proposal file {path!r}: image {str(image_id)!r} has boxes of shape {b.shape} "
                f"and objectness_logits of shape {s.shape}; expected (K, 4) and (K,)."
            )
        boxes_out.append(b.astype(np.float32))
        scores_out.append(s.astype(np.float32))
    return ProposalSet([str(i) for i in ids], boxes_out, scores_out, bbox_mode, path)


def _parse_bbox_mode(value, path: str) -> BoxMode:
    try:
        mode = BoxMode(int(np.asarray(value)))
    except (TypeError, ValueError) as e:
        raise ProposalFileError(
            f"Proposal file {path!r}: key 'bbox_mode' is {value!r}, not a BoxMode value."
        ) from e
    if mode not in _SUPPORTED_MODES:
        raise ProposalFileError(
            f"Proposal file {path!r}: key 'bbox_mode' is {mode.name}; only XYXY_ABS and "
            "XYWH_ABS (absolute pixel coordinates) are supported."
        )
    return mode


# ----------------------------------------------------------------------------- loading


def load_proposals_into_dataset_dicts(
    dataset_dicts: list[dict],
    proposal_file: str,
    *,
    trusted: bool = False,
    outside_tolerance: float = OUTSIDE_TOLERANCE,
) -> list[dict]:
    """Attach precomputed proposals to Detectron2 dataset records.

    A checked replacement for ``detectron2.data.build.load_proposals_into_dataset``.

    Args:
        dataset_dicts: records with ``image_id`` (and, if known, ``height``/``width``).
        proposal_file: an ``.npz`` file (or a Detectron2 pickle if ``trusted``).
        trusted: allow unpickling (``DATASETS.PROPOSAL_FILES_TRUSTED``).
        outside_tolerance: boxes may leave the image by this fraction of its side (at least
            2 px) and are then clipped; boxes further outside make loading fail.

    Returns:
        New records (shallow copies; the inputs are not modified) with the fields that
        ``DatasetMapper``/``transform_proposals`` read: ``proposal_boxes`` (K, 4) float32 in
        XYXY_ABS, ``proposal_objectness_logits`` (K,) float32 sorted by descending score
        (stable, so equal scores keep the file's order), ``proposal_bbox_mode`` XYXY_ABS.

    Raises:
        ProposalFileError: naming the file and the image/key at fault.
    """
    proposals = read_proposal_file(proposal_file, trusted=trusted)
    path = proposals.path
    index = {}
    duplicates = []
    for i, image_id in enumerate(proposals.ids):
        if image_id in index:
            duplicates.append(image_id)
        index[image_id] = i
    if duplicates:
        raise ProposalFileError(
            f"Proposal file {path!r} lists {len(duplicates)} image id(s) more than once, "
            f"e.g. {first_few(duplicates)}."
        )
    missing = [str(r["image_id"]) for r in dataset_dicts if str(r["image_id"]) not in index]
    if missing:
        raise ProposalFileError(
            f"Proposal file {path!r} has no proposals for {len(missing)} of the "
            f"{len(dataset_dicts)} images of the dataset, e.g. image ids {first_few(missing)}. "
            "Is it the proposal file of another dataset or split?"
        )

    out = []
    clipped_boxes = clipped_images = 0
    for record in dataset_dicts:
        image_id = str(record["image_id"])
        i = index[image_id]
        where = f"image {image_id!r} ({record.get('file_name', 'no file name')})"
        boxes = BoxMode.convert(
            proposals.boxes[i].astype(np.float32), proposals.bbox_mode, BoxMode.XYXY_ABS
        )
        scores = proposals.scores[i]
        if len(boxes) == 0:
            raise ProposalFileError(f"Proposal file {path!r} has zero proposals for {where}.")
        if not np.isfinite(boxes).all():
            raise ProposalFileError(
                f"Proposal file {path!r} has NaN or infinite box coordinates for {where}."
            )
        if not np.isfinite(scores).all():
            raise ProposalFileError(
                f"Proposal file {path!r} has NaN or infinite scores for {where}."
            )
        inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if inverted.any():
            j = int(np.flatnonzero(inverted)[0])
            raise ProposalFileError(
                f"Proposal file {path!r} has {int(inverted.sum())} box(es) with x2 < x1 or "
                f"y2 < y1 for {where}, e.g. {boxes[j].tolist()} (XYXY). Wrong bbox_mode?"
            )
        if "height" in record and "width" in record:
            boxes, n_clipped = _clip_to_image(
                boxes, record["height"], record["width"], outside_tolerance, path, where
            )
            clipped_boxes += n_clipped
            clipped_images += n_clipped > 0
        order = np.argsort(-scores, kind="stable")
        new_record = dict(record)
        new_record["proposal_boxes"] = boxes[order]
        new_record["proposal_objectness_logits"] = scores[order]
        new_record["proposal_bbox_mode"] = BoxMode.XYXY_ABS
        out.append(new_record)
    if clipped_boxes:
        logger.info(
            "Clipped %d proposal boxes of %d images to their image (file %s).",
            clipped_boxes,
            clipped_images,
            path,
        )
    return out


def _clip_to_image(boxes, height, width, tolerance, path, where):
    """Clip boxes to [0, width] x [0, height]; refuse boxes far outside. Returns (boxes, n)."""
    clipped, outside, far = clip_to_image(boxes, height, width, tolerance=tolerance)
    if far.any():
        j = int(np.flatnonzero(far)[0])
        raise ProposalFileError(
            f"Proposal file {path!r} has {int(far.sum())} box(es) far outside {where} of "
            f"size {width}x{height}, e.g. {boxes[j].tolist()} (XYXY). Were the proposals "
            "computed on other (or resized) images?"
        )
    if not outside.any():
        return boxes, 0
    return clipped.astype(np.float32), int(outside.sum())


# ----------------------------------------------------------------------------- cleaning


def clean_boxes(
    boxes: np.ndarray,
    height: int,
    width: int,
    *,
    scores: np.ndarray | None = None,
    clip_far_outside: bool = False,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Clip boxes to their image and drop the unusable ones (conversion and drawing are
    lenient where loading refuses: they repair a file, loading checks it).

    Args:
        boxes: (K, 4) XYXY_ABS boxes.
        height, width: the image size in pixels; boxes are clipped to [0, width] x [0, height].
        scores: (K,) scores; a box whose score is NaN/inf is dropped too.
        clip_far_outside: clip boxes far outside the image instead of raising.
        where: names the image in error messages.

    Returns:
        (kept boxes (K', 4) float32, keep (K,) bool mask into the input, counts dict with
        ``clipped``, ``dropped_nonfinite``, ``dropped_empty``, ``far_outside``).

    Raises:
        ProposalFileError: a box is far outside the image and ``clip_far_outside`` is False.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    if scores is not None:
        finite &= np.isfinite(np.asarray(scores, dtype=np.float64).reshape(-1))
    clipped, outside, far = clip_to_image(boxes, height, width)
    far &= finite
    outside &= finite
    if far.any() and not clip_far_outside:
        j = int(np.flatnonzero(far)[0])
        raise ProposalFileError(
            f"{where}: {int(far.sum())} box(es) lie far outside the image of size "
            f"{width}x{height}, e.g. {boxes[j].tolist()} (XYXY). Were the proposals computed "
            "on other (or resized) images, or for another dataset? Pass --clip-far-outside "
            "to clip them anyway."
        )
    clipped = np.where(finite[:, None], clipped, 0.0)
    nonempty = min_size_mask(clipped, 0, strict=True)
    keep = finite & nonempty
    counts = {
        "clipped": int((outside & keep).sum()),
        "dropped_nonfinite": int((~finite).sum()),
        "dropped_empty": int((finite & ~nonempty).sum()),
        "far_outside": int(far.sum()),
    }
    return clipped[keep].astype(np.float32), keep, counts


def first_few(items, n=_MAX_NAMED) -> str:
    """The first ``n`` items, repr'd, for an error message ("..." if there are more)."""
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (", ..." if len(items) > n else "")
