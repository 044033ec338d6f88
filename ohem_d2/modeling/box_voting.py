"""Box voting (MR-CNN, Gidaris & Komodakis 2015): a detection kept by NMS is replaced by the
score-weighted mean of the boxes of its class that overlap it."""

import torch
from torchvision.ops import box_iou

__all__ = ["vote_boxes"]


@torch.no_grad()
def vote_boxes(
    kept_boxes: torch.Tensor,
    kept_classes: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_thresh: float,
) -> torch.Tensor:
    """Per kept box, the mean of the pool boxes of its class with IoU >= ``iou_thresh`` with
    it, each weighted by its score.

    Args:
        kept_boxes: (K, 4) XYXY boxes kept by NMS (each is also in the pool, so its own
            weight is in its mean).
        kept_classes: (K,) their classes.
        boxes: (M, 4) XYXY pool of candidate boxes, e.g. R1 U R2 of one image.
        scores: (M,) their scores (the weights).
        classes: (M,) their classes.
        iou_thresh: neighbours need IoU >= this with the kept box.

    Returns:
        (K, 4) voted boxes. A kept box without a neighbour of positive weight (possible only
        when it is not in the pool) is returned unchanged.
    """
    if len(kept_boxes) == 0 or len(boxes) == 0:
        return kept_boxes.clone()
    neighbours = (box_iou(kept_boxes, boxes) >= iou_thresh) & (
        kept_classes[:, None] == classes[None, :]
    )
    weights = neighbours.to(scores.dtype) * scores[None, :]  # (K, M)
    total = weights.sum(dim=1, keepdim=True)
    voted = (weights @ boxes) / total.clamp(min=torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, voted, kept_boxes)
