"""Selective search (Uijlings et al.) on one image, with OpenCV.

Boxes keep OpenCV's ranking order (its hierarchical-grouping rank). As Fast R-CNN's data
loader did, exact duplicates are removed (first occurrence kept) and boxes with a side
smaller than ``min_size`` pixels are dropped. The default, 20 px, is the ``minBoxWidth`` of
the R-CNN/Fast R-CNN selective-search boxes for PASCAL VOC (images of about 500 px); use a
smaller value for small images.

OpenCV ranks regions with C's ``rand()``, whose state is global to the process; it is
reseeded before each image so that an image's boxes do not depend on which images the same
process handled before (this is what makes a proposal file identical whether or not its run
was interrupted and resumed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import cv2
import numpy as np

from ..proposal_rules import min_size_mask, top_k, unique_boxes

__all__ = ["ALGORITHM_VERSION", "DEFAULT_MIN_SIZE", "MODES", "selective_search_boxes"]

MODES = ("fast", "quality")
DEFAULT_MIN_SIZE = 20
# Bump when the boxes computed for an image change, so that stale partial files are refused.
ALGORITHM_VERSION = 1


@functools.lru_cache(maxsize=1)
def _c_library():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else ctypes.CDLL(None)
    except OSError:
        return None


def _seed_c_rand(seed: int = 1) -> None:
    # OpenCV's selective search draws region ranks from C's rand(); see the module docstring.
    libc = _c_library()
    if libc is not None and hasattr(libc, "srand"):
        libc.srand(ctypes.c_uint(seed))


def selective_search_boxes(
    image_bgr: np.ndarray,
    *,
    mode: str = "fast",
    min_size: int = DEFAULT_MIN_SIZE,
    max_boxes: int | None = None,
) -> np.ndarray:
    """Selective-search boxes of one image, best-ranked first.

    Args:
        image_bgr: (H, W, 3) uint8 image in OpenCV's BGR order.
        mode: "fast" (2 colour spaces, 2 strategies, k in {50, 100}) or "quality".
        min_size: drop boxes whose width or height is below this (pixels).
        max_boxes: keep at most this many boxes (after filtering); None keeps all.

    Returns:
        (K, 4) float32 boxes in XYXY_ABS pixel coordinates, K >= 1: if filtering removes
        every box (an image smaller than ``min_size``), the largest box is kept.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(image_bgr)
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    _seed_c_rand()
    rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    boxes = boxes[unique_boxes(boxes)]
    if len(boxes) == 0:
        h, w = image_bgr.shape[:2]
        return np.array([[0, 0, w, h]], dtype=np.float32)
    keep = min_size_mask(boxes, min_size)
    if not keep.any():
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.arange(len(boxes)) == int(np.argmax(areas))
    return top_k(boxes[keep], max_boxes).astype(np.float32)
