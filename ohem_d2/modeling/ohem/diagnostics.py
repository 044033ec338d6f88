"""What the miner mined, written to the current EventStorage (so to metrics.json and
TensorBoard). Keys are relative ("ohem/..."), so a caller's ``storage.name_scope`` prefixes
them (the cascade's "stage<k>/")."""

import torch
from detectron2.structures import Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage

from .distributed import sum_over_processes

__all__ = ["IOU_BIN_NAMES", "iou_bin", "log_mining", "nearest_gt_iou"]

# The hard background's IoU with its nearest ground truth falls in one of these bins: exactly
# 0, then [low, high) (the first open at 0). Cascade stages past the first have background
# up to their own foreground threshold, hence the last bin.
IOU_BIN_EDGES = (0.1, 0.3, 0.5)
IOU_BIN_NAMES = ("0", "(0,0.1)", "[0.1,0.3)", "[0.3,0.5)", ">=0.5")


def nearest_gt_iou(proposals: Instances) -> torch.Tensor:
    """(R,) IoU of each labelled RoI with its nearest ground-truth box (0 without any).

    Detectron2's labelling gives every RoI, background too, the ground truth of its highest
    IoU as ``gt_boxes``.
    """
    if not proposals.has("gt_boxes"):
        return proposals.proposal_boxes.tensor.new_zeros(len(proposals))
    return matched_pairwise_iou(proposals.proposal_boxes, proposals.gt_boxes)


def iou_bin(ious: torch.Tensor) -> torch.Tensor:
    """(R,) index into IOU_BIN_NAMES of each IoU."""
    edges = torch.tensor(IOU_BIN_EDGES, dtype=ious.dtype, device=ious.device)
    return torch.where(ious > 0, torch.bucketize(ious, edges, right=True) + 1, 0)


@torch.no_grad()
def log_mining(
    proposals, losses, hard, hard_losses, hard_ious, num_after_nms, suspects, background, names
):
    """Log one batch's mining, over the images of every process (the sums behind each value
    are added over the processes first, so that the logged values describe the whole batch,
    not rank 0's share of it).

    ``ohem/num_candidates`` and ``ohem/mean_loss_all`` describe the labelled candidates as
    the matcher made them, before any option removes suspects.

    Args:
        proposals: N Instances, the labelled candidates; ``losses`` their (Ri,) losses.
        hard: N Instances, the hard sets (with ``suspect_bg``); ``hard_losses`` their losses
            and ``hard_ious`` their IoUs with the nearest ground truth.
        num_after_nms: per image, the candidates left after the NMS.
        suspects: per image, (Ri,) bool, the suspect background candidates.
        background: the background label K; ``names``: the K class names, or None
            ("class<k>"; also when their number is not K).
    """
    candidate = torch.cat([p.gt_classes for p in proposals]) >= 0
    candidate_losses = torch.cat(losses)[candidate]
    hard_losses = torch.cat(hard_losses)
    labels = torch.cat([h.gt_classes for h in hard])
    is_bg = labels == background
    device = candidate_losses.device
    # One vector of sums, on the device, reduced over the processes and read at once (one
    # sync per iteration).
    counts_known = torch.tensor(
        [len(proposals), candidate_losses.numel(), sum(num_after_nms), labels.numel()],
        dtype=torch.float64,
        device=device,
    )
    zero = torch.zeros((), dtype=torch.int64, device=device)
    suspect_counts = torch.stack(
        [torch.cat([h.suspect_bg for h in hard]).sum(), sum(s.sum() for s in suspects) + zero]
    )
    sums = torch.cat(
        [
            counts_known,
            suspect_counts.double(),
            candidate_losses.double().sum().reshape(1),
            hard_losses.double().sum().reshape(1),
            torch.bincount(labels, minlength=background + 1).double(),
            torch.bincount(
                iou_bin(torch.cat(hard_ious)[is_bg]), minlength=len(IOU_BIN_NAMES)
            ).double(),
        ]
    )
    sums = sum_over_processes(sums).tolist()
    num_images, num_candidates, num_nms, num_hard, hard_suspects, num_suspects = sums[:6]
    loss_all, loss_hard = sums[6:8]
    counts = sums[8 : 9 + background]
    bin_counts = sums[9 + background :]
    storage = get_event_storage()
    total = max(num_hard, 1)
    storage.put_scalar("ohem/num_candidates", num_candidates / num_images)
    storage.put_scalar("ohem/num_after_nms", num_nms / num_images)
    storage.put_scalar("ohem/fg_fraction", (num_hard - counts[background]) / total)
    storage.put_scalar("ohem/mean_loss_all", loss_all / max(num_candidates, 1))
    storage.put_scalar("ohem/mean_loss_hard", loss_hard / total)
    if names is None or len(names) != background:
        names = [f"class{k}" for k in range(background)]
    for k, name in enumerate(list(names) + ["background"]):
        storage.put_scalar(f"ohem/hard_set/{name}", counts[k] / total)
    num_bg = max(counts[background], 1)
    for name, count in zip(IOU_BIN_NAMES, bin_counts):
        storage.put_scalar(f"ohem/hard_bg_iou/{name}", count / num_bg)
    storage.put_scalar("ohem/hard_bg_suspect", hard_suspects / num_bg)
    storage.put_scalar("ohem/num_suspect_candidates", num_suspects / num_images)
