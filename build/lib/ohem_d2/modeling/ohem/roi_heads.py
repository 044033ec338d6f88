"""ROI heads that train on the hard RoIs mined by OHEM instead of a random fg/bg sample.

In training, every proposal (plus the ground-truth boxes) is labelled by the parent head's
matcher with no subsampling, :class:`HardExampleMiner` picks the hard RoIs, and the parent's
own forward and ``box_predictor.losses()`` run on them unchanged. Inference is the parent's.
"""

from functools import partial

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    Res5ROIHeads,
    StandardROIHeads,
)
from detectron2.utils.events import get_event_storage
from torch import nn

from .miner import HardExampleMiner
from .pooling import pool_rois
from .scoring import check_box_predictor_supported

__all__ = ["OHEMCascadeROIHeads", "OHEMHeadMixin", "OHEMROIHeads", "OHEMRes5ROIHeads"]


class OHEMHeadMixin:
    """What the OHEM heads share: the miner, and labelling of all proposals.

    Put it before a Detectron2 ROI head class in the bases. The single-stage ``forward`` here
    labels, mines and hands the hard set to the parent's ``forward``; the parent's
    ``label_and_sample_proposals`` hook then has nothing left to do and passes it through.
    """

    @configurable
    def __init__(self, *, miner: HardExampleMiner, **kwargs):
        """
        Args:
            miner: the hard example miner.
            kwargs: the arguments of the parent ROI head.
        """
        super().__init__(**kwargs)
        self.miner = miner
        predictors = self.box_predictor
        for predictor in predictors if isinstance(predictors, nn.ModuleList) else [predictors]:
            check_box_predictor_supported(predictor)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["miner"] = HardExampleMiner(cfg)
        return ret

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        """Label every proposal, without Detectron2's random subsampling (OHEM selects later).

        Args:
            matched_idxs: (R,) index of the matched ground truth of each proposal.
            matched_labels: (R,) matcher label: 1 foreground, 0 background, -1 ignored.
            gt_classes: (M,) classes of the M ground-truth boxes.

        Returns:
            (R,) indices of all proposals, and their labels in [0, K] (K: background) or -1.
        """
        if gt_classes.numel() > 0:
            labels = gt_classes[matched_idxs]
            labels[matched_labels == 0] = self.num_classes
            labels[matched_labels == -1] = -1
        else:
            labels = torch.full_like(matched_idxs, self.num_classes)
        return torch.arange(labels.numel(), device=labels.device), labels

    def label_proposals(self, proposals, targets):
        """Label all proposals plus the ground-truth boxes with the parent's matcher.

        Returns:
            list[Instances]: per image, all candidate RoIs with ``gt_classes`` (and the
            other ``gt_*`` fields of ``targets`` when the image has ground truth).
        """
        # The parent's labelling, run with the _sample_proposals above.
        return super().label_and_sample_proposals(proposals, targets)

    def label_and_sample_proposals(self, proposals, targets):
        """Pass-through: in OHEM heads ``forward`` has already labelled and mined the
        proposals, since mining needs the features, which this hook does not receive."""
        return proposals

    def mine_hard_examples(self, features, proposals, targets):
        """Label all `proposals` against `targets` and return the hard set of each image.

        Single-stage heads define `readonly_box_forward(features, boxes)` (pooling, box head
        and predictor) and `readonly_modules()` (the modules whose mode the readonly pass sets).
        """
        hard, _ = self.miner(
            [features[f] for f in self.in_features],
            self.label_proposals(proposals, targets),
            box_forward=self.readonly_box_forward,
            box_predictor=self.box_predictor,
            readonly_modules=self.readonly_modules(),
        )
        return hard

    def forward(self, images, features, proposals, targets=None):
        """See :meth:`ROIHeads.forward`. In training, the parent trains on the hard set."""
        if self.training:
            assert targets, "'targets' argument is required during training"
            proposals = self.mine_hard_examples(features, proposals, targets)
        return super().forward(images, features, proposals, targets)


@ROI_HEADS_REGISTRY.register()
class OHEMROIHeads(OHEMHeadMixin, StandardROIHeads):
    """:class:`StandardROIHeads` (VGG, C5, FPN, ... box-head models) trained with OHEM."""

    def readonly_box_forward(self, features, boxes):
        pooled = pool_rois(self.box_pooler, features, boxes[0])
        return self.box_predictor(self.box_head(pooled))

    def readonly_modules(self):
        return (self.box_head, self.box_predictor)


@ROI_HEADS_REGISTRY.register()
class OHEMRes5ROIHeads(OHEMHeadMixin, Res5ROIHeads):
    """:class:`Res5ROIHeads` (the C4 models) trained with OHEM."""

    def readonly_box_forward(self, features, boxes):
        pooled = pool_rois(self.pooler, features, boxes[0])
        return self.box_predictor(self.res5(pooled).mean(dim=[2, 3]))

    def readonly_modules(self):
        return (self.res5, self.box_predictor)


@ROI_HEADS_REGISTRY.register()
class OHEMCascadeROIHeads(OHEMHeadMixin, CascadeROIHeads):
    """:class:`CascadeROIHeads` with OHEM at every stage.

    Stage k scores all its candidates with its own head and predictor and trains on its hard
    RoIs. The candidates of stage k+1 are all candidates of stage k, refined by stage k's
    readonly predictions and relabelled by stage k+1's matcher. Mask and keypoint heads train
    on stage 0's hard set, as Detectron2's train on its stage-0 sample.
    """

    def forward(self, images, features, proposals, targets=None):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        assert targets, "'targets' argument is required during training"
        hard, losses = self._forward_box_ohem(
            features, self.label_proposals(proposals, targets), targets
        )
        losses.update(self._forward_mask(features, hard))
        losses.update(self._forward_keypoint(features, hard))
        return hard, losses

    def _forward_box_ohem(self, features, candidates, targets):
        """Mine and train every stage.

        Args:
            features: dict of (N, C, H, W) feature maps.
            candidates: N Instances, all proposals labelled by :meth:`label_proposals`.
            targets: N Instances of ground truth.

        Returns:
            list[Instances]: stage 0's hard RoIs.
            dict[str, Tensor]: the box losses of every stage, ``loss_*_stage{k}``.
        """
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in candidates]
        storage = get_event_storage()
        losses, first_stage_hard = {}, None
        for k in range(self.num_cascade_stages):
            predictor = self.box_predictor[k]
            with storage.name_scope(f"stage{k}"):
                hard, readonly_predictions = self.miner(
                    features,
                    candidates,
                    box_forward=partial(self._readonly_stage_forward, k),
                    box_predictor=predictor,
                    readonly_modules=(self.box_head[k], predictor),
                )
                stage_losses = predictor.losses(self._run_stage(features, hard, k), hard)
            losses.update({f"{name}_stage{k}": v for name, v in stage_losses.items()})
            if k == 0:
                first_stage_hard = hard
            if k + 1 < self.num_cascade_stages:
                # All candidates move on, refined by the readonly predictions; the boxes are
                # detached, clipped and the empty ones dropped, as in Detectron2's cascade.
                refined_boxes = predictor.predict_boxes(readonly_predictions, candidates)
                candidates = self._create_proposals_from_boxes(refined_boxes, image_sizes)
                candidates = self._match_and_label_boxes(candidates, k + 1, targets)
        return first_stage_hard, losses

    def _readonly_stage_forward(self, stage, features, boxes):
        pooled = pool_rois(self.box_pooler, features, boxes[0])
        return self.box_predictor[stage](self.box_head[stage](pooled))
