"""The proposal generator of Fast R-CNN: it hands precomputed (selective-search) boxes on."""

import torch
import torch.nn as nn
from detectron2.config import configurable
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import Boxes, Instances

from ..proposal_rules import min_size_mask, top_k, unique_boxes


class MissingProposalsError(ValueError):
    """An input reached the model with no proposal at all."""


@PROPOSAL_GENERATOR_REGISTRY.register()
class SelectiveSearchProposals(nn.Module):
    """Select the proposals an input already carries; learns nothing.

    Per image: drops boxes with a side <= `min_size` (pixels of the resized image), removes
    exact duplicates, keeps the first `topk` in the order given (descending score).
    """

    @configurable
    def __init__(self, *, min_size: float, pre_nms_topk_train: int, pre_nms_topk_test: int):
        """
        Args:
            min_size: boxes with width or height below this are dropped.
            pre_nms_topk_train, pre_nms_topk_test: how many proposals per image to keep.
        """
        super().__init__()
        self.min_size = float(min_size)
        self.topk = {True: int(pre_nms_topk_train), False: int(pre_nms_topk_test)}
        for k in self.topk.values():
            if k <= 0:
                raise ValueError(f"DATASETS.PRECOMPUTED_PROPOSAL_TOPK_* must be > 0, got {k}")

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        return {
            "min_size": cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE,
            "pre_nms_topk_train": cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN,
            "pre_nms_topk_test": cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST,
        }

    @torch.no_grad()
    def forward(
        self, precomputed: list[Instances], image_names: list[str] | None = None
    ) -> list[Instances]:
        """
        Args:
            precomputed: per image, Instances with `proposal_boxes` (R, 4) in the resized
                image's coordinates and `objectness_logits` (R,), sorted by score.
            image_names: per image, a name for error messages (file name or id).

        Returns:
            per image, Instances with `proposal_boxes` and `objectness_logits`.
        """
        out = []
        for i, props in enumerate(precomputed):
            boxes = props.proposal_boxes.tensor
            # Same rule as Detectron2's RPN: both sides strictly greater than min_size.
            keep = min_size_mask(boxes, self.min_size, strict=True).nonzero()[:, 0]
            keep = top_k(keep[unique_boxes(boxes[keep])], self.topk[self.training])
            if len(keep) == 0:
                name = image_names[i] if image_names else f"#{i} of the batch"
                raise MissingProposalsError(
                    f"Image {name} has no proposal left ({len(boxes)} given, none with both "
                    f"sides > MODEL.PROPOSAL_GENERATOR.MIN_SIZE={self.min_size:g} px after "
                    "resizing and de-duplication). Check its entry in the proposal file."
                )
            result = Instances(props.image_size)
            result.proposal_boxes = Boxes(boxes[keep])
            result.objectness_logits = props.objectness_logits[keep]
            out.append(result)
        return out
