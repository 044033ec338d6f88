"""The hard-RoI selection rule of OHEM (Shrivastava et al., CVPR 2016, Sec. 4), for one image.

A function of its inputs alone: per-RoI losses, boxes and labels in, kept indices out. No
cfg, no logging, no state; deterministic except the optional easy-background draw (beyond the
paper), which uses torch's default random generator of the labels' device.
"""

import math

import torch
from torchvision.ops import batched_nms, nms

from .settings import check_settings

__all__ = ["select_hard_examples"]


def _hardest_first(losses: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``losses`` descending; equal losses keep the lower index first."""
    return torch.sort(losses, descending=True, stable=True).indices


@torch.no_grad()
def select_hard_examples(
    losses: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    nms_thresh: float,
    nms_per_label: bool,
    background_label: int,
    positive_fraction: float = -1.0,
    trim_bg_fraction: float = 0.0,
    num_easy_bg: int = 0,
) -> tuple[torch.Tensor, int]:
    """Select the hard RoIs of one image, as the authors' hard-RoI sampler does.

    RoIs labelled -1 (ignored by the matcher) are never candidates. The others are sorted by
    loss (descending, lower index first on ties), de-duplicated by greedy NMS with the loss as
    score (within each label if ``nms_per_label``; off when ``nms_thresh >= 1``), and the
    first ``batch_size`` survivors are kept.

    Args:
        losses: (R,) per-RoI loss, finite.
        boxes: (R, 4) RoI boxes, XYXY.
        labels: (R,) int64, assigned class in [0, K], K = ``background_label``, or -1 (ignored).
        batch_size: number of RoIs to keep at most (the paper's B/N), > 0.
        nms_thresh: IoU above which the less hard of two RoIs is suppressed (paper: 0.7).
        nms_per_label: suppress only among RoIs of the same label (the authors' code).
        background_label: label of the background class (K).
        positive_fraction: -1: pure OHEM, no class ratio. In (0, 1]: at most
            ``floor(batch_size * positive_fraction)`` foreground RoIs (the hardest), the rest
            filled with the hardest background RoIs, as mmdetection's OHEM sampler does.
        trim_bg_fraction: beyond the paper (0: off). After the NMS, the hardest
            ``floor(trim_bg_fraction * n)`` of the n surviving background candidates are
            skipped: the very hardest "negatives" are the likeliest unlabelled objects.
        num_easy_bg: beyond the paper (0: off). Only ``batch_size - num_easy_bg`` RoIs are
            chosen by hardness; up to ``num_easy_bg`` more are drawn uniformly at random (torch's
            default generator of the device) from the background candidates neither chosen
            nor trimmed, before the NMS, as FRCN's sampler draws its background; so with
            ``trim_bg_fraction`` too, a trimmed RoI's near-duplicates can be drawn.

    Returns:
        keep: (B',) int64 indices into the R RoIs, hardest first (then the random easy
            background), B' <= batch_size.
        num_after_nms: number of candidates that survive the NMS (before the top-B cut).

    The arguments are checked here, for a direct call; :class:`HardExampleMiner` checks its
    settings once when it is built and calls :func:`_select_hard_examples`.
    """
    check_settings(
        batch_size_per_image=batch_size,
        nms_thresh=nms_thresh,
        positive_fraction=positive_fraction,
        trim_bg_fraction=trim_bg_fraction,
    )
    if not 0 <= num_easy_bg < batch_size:
        raise ValueError(f"num_easy_bg must be in [0, batch_size), got {num_easy_bg}")
    return _select_hard_examples(
        losses,
        boxes,
        labels,
        batch_size=batch_size,
        nms_thresh=nms_thresh,
        nms_per_label=nms_per_label,
        background_label=background_label,
        positive_fraction=positive_fraction,
        trim_bg_fraction=trim_bg_fraction,
        num_easy_bg=num_easy_bg,
    )


@torch.no_grad()
def _select_hard_examples(
    losses, boxes, labels, *, batch_size, nms_thresh, nms_per_label, background_label,
    positive_fraction, trim_bg_fraction, num_easy_bg,
):  # fmt: skip
    """:func:`select_hard_examples` with its arguments already checked."""
    candidates = torch.nonzero(labels >= 0).squeeze(1)
    if candidates.numel() == 0:
        return candidates, 0
    # From here on, everything is in candidate order: hardest first, ties by index.
    candidates = candidates[_hardest_first(losses[candidates])]
    cand_boxes = boxes[candidates].float()
    cand_labels = labels[candidates]

    if nms_thresh < 1.0:
        # Strictly decreasing rank scores give NMS the same greedy order as the losses, but
        # make it deterministic when losses tie. NMS returns survivors by decreasing score,
        # hence in candidate order.
        n = candidates.numel()
        rank_scores = torch.arange(n, 0, -1, device=cand_boxes.device, dtype=torch.float32)
        if nms_per_label:
            survivors = batched_nms(cand_boxes, rank_scores, cand_labels, nms_thresh)
        else:
            survivors = nms(cand_boxes, rank_scores, nms_thresh)
        candidates = candidates[survivors]
        cand_labels = cand_labels[survivors]
    num_after_nms = int(candidates.numel())

    trimmed = candidates[:0]
    if trim_bg_fraction > 0:
        bg_rank = torch.nonzero(cand_labels == background_label).squeeze(1)
        num_trim = math.floor(trim_bg_fraction * bg_rank.numel())
        if num_trim:
            kept = torch.ones_like(cand_labels, dtype=torch.bool)
            kept[bg_rank[:num_trim]] = False
            trimmed = candidates[~kept]
            candidates, cand_labels = candidates[kept], cand_labels[kept]

    num_hard = batch_size - num_easy_bg
    if positive_fraction == -1:
        hard = candidates[:num_hard]
    else:
        is_fg = cand_labels != background_label
        max_fg = min(math.floor(batch_size * positive_fraction), num_hard)
        fg_rank = torch.nonzero(is_fg).squeeze(1)[:max_fg]
        bg_rank = torch.nonzero(~is_fg).squeeze(1)[: num_hard - fg_rank.numel()]
        # Merge the two lists back into hardest-first order.
        hard = candidates[torch.sort(torch.cat([fg_rank, bg_rank])).values]
    if num_easy_bg == 0:
        return hard, num_after_nms
    return torch.cat(
        [hard, _easy_background(labels, background_label, hard, trimmed, num_easy_bg)]
    ), num_after_nms


def _easy_background(labels, background_label, hard, trimmed, count):
    """Up to `count` background RoIs drawn uniformly, without replacement, from those not in
    `hard` or `trimmed` (index tensors into `labels`)."""
    pool = labels == background_label
    pool[hard] = False
    pool[trimmed] = False
    pool = torch.nonzero(pool).squeeze(1)
    return pool[torch.randperm(pool.numel(), device=pool.device)[:count]]
