"""The rules that clean a set of proposal boxes, each written once (the bottom layer: imports
nothing of the project).

Generation (selective search), conversion and loading of proposal files, and the model's
proposal generator apply them, each in its own fixed order. Boxes are (R, 4) XYXY_ABS.
"""

import numpy as np
import torch

__all__ = [
    "OUTSIDE_MIN_PX",
    "OUTSIDE_TOLERANCE",
    "clip_to_image",
    "min_size_mask",
    "rank_scores",
    "top_k",
    "unique_boxes",
]

# Boxes may leave their image by this fraction of its side (at least OUTSIDE_MIN_PX pixels):
# many proposal sources round outwards. Further out, the boxes belong to other images.
OUTSIDE_TOLERANCE = 0.05
OUTSIDE_MIN_PX = 2.0


def clip_to_image(
    boxes: np.ndarray, height: int, width: int, *, tolerance: float = OUTSIDE_TOLERANCE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip float boxes to ``[0, width] x [0, height]``.

    Returns:
        (clipped boxes, of the input's dtype; ``outside`` (R,) bool: a coordinate lay
        outside the image; ``far`` (R,) bool: one lay further outside than ``tolerance`` of
        the side, at least ``OUTSIDE_MIN_PX``, which callers refuse: such a file was made for
        other or resized images). A row with NaN is neither outside nor far.
    """
    limits = np.array([width, height, width, height], dtype=boxes.dtype)
    slack = np.maximum(OUTSIDE_MIN_PX, tolerance * limits)
    with np.errstate(invalid="ignore"):
        far = (boxes < -slack).any(axis=1) | (boxes > limits + slack).any(axis=1)
        outside = (boxes < 0).any(axis=1) | (boxes > limits).any(axis=1)
    return np.clip(boxes, 0, limits), outside, far


def min_size_mask(boxes, min_size: float, *, strict: bool = False):
    """(R,) bool mask of the boxes whose width and height both reach ``min_size``.

    ``strict`` asks for both sides greater than ``min_size``: Detectron2's rule for
    ``MODEL.PROPOSAL_GENERATOR.MIN_SIZE`` (``Boxes.nonempty``), and, with 0, "not empty".
    Works on numpy arrays and torch tensors alike.
    """
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    if strict:
        return (widths > min_size) & (heights > min_size)
    return (widths >= min_size) & (heights >= min_size)


def unique_boxes(boxes):
    """Indices (ascending) of the first occurrence of each distinct row of (R, 4) boxes:
    exact duplicates removed, order kept, as Fast R-CNN's data loader did. A numpy array
    gives numpy indices."""
    if isinstance(boxes, np.ndarray):
        return unique_boxes(torch.from_numpy(np.ascontiguousarray(boxes))).numpy()
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    _, inverse = torch.unique(boxes, dim=0, return_inverse=True)
    # Each distinct row's first position: sort the keys (row's group, position), all distinct,
    # and take each group's first. Sizes come from shapes, not Python ints, and the operators
    # exist in ONNX opset 11, so that a traced model (ohem_d2.export) takes any number of boxes.
    count = boxes.shape[0]
    keys = (inverse * count + torch.arange(count, device=boxes.device)).sort().values
    groups = torch.div(keys, count, rounding_mode="floor")
    starts = torch.cat([torch.ones_like(groups[:1], dtype=torch.bool), groups[1:] != groups[:-1]])
    return (keys[starts] % count).sort().values


def top_k(items, k: int | None):
    """The first ``k`` items (the best-ranked boxes, since proposals come sorted by score);
    None keeps all."""
    return items if k is None else items[:k]


def rank_scores(boxes) -> np.ndarray:
    """Scores of boxes given best-ranked first: ``-r`` for the r-th, so that sorting by
    descending score (as loading does) keeps their order."""
    return -np.arange(len(boxes), dtype=np.float32)
