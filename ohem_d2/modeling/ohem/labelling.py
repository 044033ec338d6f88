"""Labelling every proposal, as OHEM needs it: Detectron2's own ROI-head labelling (matcher,
ground-truth boxes appended, ``gt_*`` fields of the matched ground truth) with its random
fg/bg subsampling step replaced by "keep every RoI"."""

import torch
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.utils.events import EventStorage

__all__ = ["ProposalLabeller", "label_without_sampling"]


def label_without_sampling(matched_idxs, matched_labels, gt_classes, num_classes):
    """Detectron2's ``ROIHeads._sample_proposals`` contract, without the sampling.

    Args:
        matched_idxs: (R,) index of the matched ground truth of each proposal.
        matched_labels: (R,) matcher label: 1 foreground, 0 background, -1 ignored.
        gt_classes: (M,) classes of the M ground-truth boxes.
        num_classes: K, the background label.

    Returns:
        (R,) indices of all proposals, and their labels in [0, K] (K: background) or -1.
    """
    if gt_classes.numel() > 0:
        labels = gt_classes[matched_idxs]
        labels[matched_labels == 0] = num_classes
        labels[matched_labels == -1] = -1
    else:
        labels = torch.full_like(matched_idxs, num_classes)
    return torch.arange(labels.numel(), device=labels.device), labels


class ProposalLabeller(ROIHeads):
    """Detectron2's ROI-head labelling of all proposals, for code outside a head (the demo's
    probes, benchmarks): by default the paper's OHEM rule, foreground at IoU >= 0.5 with the
    matched ground truth's class, background below, ground truth appended."""

    def __init__(self, num_classes: int, matcher: Matcher | None = None, append_gt: bool = True):
        super().__init__(
            num_classes=num_classes,
            batch_size_per_image=1,  # unused: nothing is sampled
            positive_fraction=1.0,
            proposal_matcher=matcher or Matcher([0.5], [0, 1], allow_low_quality_matches=False),
            proposal_append_gt=append_gt,
        )

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        return label_without_sampling(matched_idxs, matched_labels, gt_classes, self.num_classes)

    @torch.no_grad()
    def forward(self, proposals, targets):
        """Per image, all proposals (plus the ground truth) with ``gt_classes`` and ``gt_*``."""
        # A scratch storage: Detectron2 logs its sampling counts, which are not a training's.
        with EventStorage():
            return self.label_and_sample_proposals(proposals, targets)
