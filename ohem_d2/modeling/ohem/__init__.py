"""Online hard example mining (Shrivastava, Gupta, Girshick, CVPR 2016) for Detectron2 ROI heads.

Importing this package registers ``OHEMROIHeads``, ``OHEMRes5ROIHeads`` and
``OHEMCascadeROIHeads`` in Detectron2's ``ROI_HEADS_REGISTRY``.
"""

from .fast_readonly import LowRankReadonly, build_readonly_approximation
from .labelling import ProposalLabeller, label_without_sampling
from .miner import HardExampleMiner
from .mining import select_hard_examples
from .readonly_net import ReadonlyHead, readonly_head
from .roi_heads import (
    OHEMCascadeROIHeads,
    OHEMHeadMixin,
    OHEMRes5ROIHeads,
    OHEMROIHeads,
    scores_as_trained,
)
from .scoring import ReadonlyScorer, check_box_predictor_supported, per_roi_losses, readonly_mode

__all__ = [
    "HardExampleMiner",
    "LowRankReadonly",
    "OHEMCascadeROIHeads",
    "OHEMHeadMixin",
    "OHEMROIHeads",
    "OHEMRes5ROIHeads",
    "ProposalLabeller",
    "ReadonlyHead",
    "ReadonlyScorer",
    "build_readonly_approximation",
    "check_box_predictor_supported",
    "label_without_sampling",
    "per_roi_losses",
    "readonly_head",
    "readonly_mode",
    "scores_as_trained",
    "select_hard_examples",
]
