"""Online hard example mining (Shrivastava, Gupta, Girshick, CVPR 2016) for Detectron2 ROI heads."""

from .mining import select_hard_examples
from .scoring import ReadonlyScorer, check_box_predictor_supported, per_roi_losses, readonly_mode

__all__ = [
    "ReadonlyScorer",
    "check_box_predictor_supported",
    "per_roi_losses",
    "readonly_mode",
    "select_hard_examples",
]
