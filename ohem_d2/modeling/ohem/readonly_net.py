"""The RoI network of an ROI head as the readonly pass (and the demo's probes) run it.

One object per head (per stage of a cascade): its pooler, box head and predictor, sharing the
trainable weights, and the modules whose mode the readonly pass sets. The miner, the cascade
and the training probes all go through it, so that none of them restates a head's forward.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from detectron2.modeling.roi_heads import CascadeROIHeads, Res5ROIHeads, StandardROIHeads
from detectron2.structures import Boxes
from torch import nn

from .pooling import pool_rois

__all__ = ["ReadonlyHead", "readonly_head"]


@dataclass(frozen=True)
class ReadonlyHead:
    """pooler -> box head -> predictor of one ROI head (or cascade stage).

    Attributes:
        pooler: Detectron2 ``ROIPooler``.
        box_head: maps pooled features (R, C, S, S) to the predictor's input.
        predictor: the :class:`FastRCNNOutputLayers` (its loss settings define the hardness).
        modules: the modules ``box_head`` and ``predictor`` run, whose train/eval mode the
            readonly pass sets.
    """

    pooler: nn.Module
    box_head: Callable[[torch.Tensor], torch.Tensor]
    predictor: nn.Module
    modules: tuple[nn.Module, ...]

    def __call__(self, features: list[torch.Tensor], boxes: list[Boxes]):
        """Predictions (scores, deltas) of the RoIs ``boxes`` (one Boxes per image of
        ``features``). One image's RoIs are pooled across CPU threads (:func:`pool_rois`)."""
        if len(boxes) == 1:
            pooled = pool_rois(self.pooler, features, boxes[0])
        else:
            pooled = self.pooler(features, boxes)
        return self.predictor(self.box_head(pooled))


def _res5_box_head(res5: nn.Module):
    def box_head(pooled):
        return res5(pooled).mean(dim=[2, 3])

    return box_head


def readonly_head(roi_heads: nn.Module, stage: int = 0) -> ReadonlyHead:
    """The :class:`ReadonlyHead` of a Detectron2 ROI head, OHEM or not: StandardROIHeads (and
    subclasses), Res5ROIHeads (C4), or stage ``stage`` of CascadeROIHeads."""
    if isinstance(roi_heads, CascadeROIHeads):
        box_head, predictor = roi_heads.box_head[stage], roi_heads.box_predictor[stage]
        return ReadonlyHead(roi_heads.box_pooler, box_head, predictor, (box_head, predictor))
    if isinstance(roi_heads, StandardROIHeads):
        box_head, predictor = roi_heads.box_head, roi_heads.box_predictor
        return ReadonlyHead(roi_heads.box_pooler, box_head, predictor, (box_head, predictor))
    if isinstance(roi_heads, Res5ROIHeads):
        res5, predictor = roi_heads.res5, roi_heads.box_predictor
        return ReadonlyHead(roi_heads.pooler, _res5_box_head(res5), predictor, (res5, predictor))
    raise TypeError(
        f"No readonly pass for {type(roi_heads).__name__}: OHEM supports StandardROIHeads, "
        "Res5ROIHeads and CascadeROIHeads and their subclasses."
    )
