"""The OHEM component shared by all ROI heads: readonly scoring, then hard-RoI selection.

It needs no subclassing: any ROI head that labels its proposals (without subsampling) and
trains a :class:`FastRCNNOutputLayers`-like predictor can call it and train on what it returns.
"""

from collections.abc import Iterable, Sequence

import torch
from detectron2.config import configurable
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from ...config import require_ohem_config
from .fast_readonly import FAST_READONLY_MODES, build_readonly_approximation
from .mining import select_hard_examples
from .scoring import HARDNESS_CHOICES, Approximation, BoxForward, Predictions, ReadonlyScorer

__all__ = ["HardExampleMiner", "check_ohem_config"]


class HardExampleMiner:
    """Replaces the random fg/bg sampling of an ROI head by online hard example mining.

    Per image: the loss of every labelled RoI under the current weights (readonly pass, no
    autograd), NMS with the loss as score, then the ``batch_size_per_image`` hardest RoIs.
    Logs ``ohem/num_candidates``, ``ohem/num_after_nms`` (means per image),
    ``ohem/fg_fraction`` (of the hard set), ``ohem/mean_loss_all`` and ``ohem/mean_loss_hard``
    (readonly losses, mean per RoI) to the current EventStorage; the keys are relative, so a
    caller's ``storage.name_scope`` prefixes them.
    """

    @configurable
    def __init__(
        self,
        *,
        batch_size_per_image: int,
        nms_thresh: float = 0.7,
        nms_per_label: bool = True,
        positive_fraction: float = -1.0,
        hardness: str = "cls+box",
        readonly_train_mode: bool = True,
        readonly_chunk_size: int = 1024,
        readonly_approximation: Approximation | None = None,
    ):
        """
        Args:
            batch_size_per_image: hard RoIs kept per image (the paper's B/N).
            nms_thresh: IoU threshold of the de-duplicating NMS; >= 1 turns it off.
            nms_per_label: suppress only among RoIs with the same assigned label.
            positive_fraction: -1 for pure OHEM, or the largest fraction of foreground
                RoIs in (0, 1].
            hardness, readonly_train_mode, readonly_chunk_size, readonly_approximation: see
                :class:`ReadonlyScorer` (``approximation``).
        """
        if batch_size_per_image <= 0:
            raise ValueError(f"batch_size_per_image must be > 0, got {batch_size_per_image}")
        if not (positive_fraction == -1 or 0 < positive_fraction <= 1):
            raise ValueError(f"positive_fraction must be -1 or in (0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.nms_thresh = nms_thresh
        self.nms_per_label = nms_per_label
        self.positive_fraction = positive_fraction
        self.scorer = ReadonlyScorer(
            hardness=hardness,
            train_mode=readonly_train_mode,
            chunk_size=readonly_chunk_size,
            approximation=readonly_approximation,
        )

    @classmethod
    def from_config(cls, cfg):
        check_ohem_config(cfg)
        ohem = cfg.MODEL.ROI_HEADS.OHEM
        return {
            "batch_size_per_image": cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
            "nms_thresh": ohem.NMS_THRESH,
            "nms_per_label": ohem.NMS_PER_LABEL,
            "positive_fraction": ohem.POSITIVE_FRACTION,
            "hardness": ohem.HARDNESS,
            "readonly_train_mode": ohem.READONLY_TRAIN_MODE,
            "readonly_chunk_size": ohem.READONLY_CHUNK_SIZE,
            "readonly_approximation": build_readonly_approximation(
                ohem.FAST_READONLY.MODE,
                rank=ohem.FAST_READONLY.RANK,
                refresh_period=ohem.FAST_READONLY.REFRESH_PERIOD,
                num_layers=ohem.FAST_READONLY.NUM_LAYERS,
            ),
        }

    def __call__(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[Instances],
        *,
        box_forward: BoxForward,
        box_predictor: nn.Module,
        readonly_modules: Iterable[nn.Module],
    ) -> tuple[list[Instances], Predictions]:
        """Mine the hard RoIs of a batch.

        Args:
            features: the head's input feature maps, each (N, C, H, W).
            proposals: N Instances, every RoI labelled (fields ``proposal_boxes``,
                ``gt_classes`` in [0, K] or -1, and ``gt_boxes`` when the image has ground
                truth), not subsampled.
            box_forward, box_predictor, readonly_modules: see :class:`ReadonlyScorer`.

        Returns:
            hard: N Instances, the hard subsets of ``proposals`` (hardest first), with all
                their fields; train the head on these.
            predictions: readonly scores (R, K+1) and deltas of all R RoIs of ``proposals``
                (e.g. to refine the boxes of the next cascade stage).
        """
        predictions = self.scorer.predict(
            features, proposals, box_forward=box_forward, readonly_modules=readonly_modules
        )
        return self.select(proposals, predictions, box_predictor), predictions

    def select(
        self, proposals: Sequence[Instances], predictions: Predictions, box_predictor: nn.Module
    ) -> list[Instances]:
        """Everything after the readonly forward: per-RoI losses, NMS, top-k, gathering, logs.

        Args:
            proposals: as in ``__call__``.
            predictions: the readonly scores and deltas of all RoIs of ``proposals``.
            box_predictor: as in ``__call__``.

        Returns:
            N Instances, the hard subsets of ``proposals`` (hardest first).
        """
        losses = self.scorer.losses(box_predictor, predictions, proposals)
        background = box_predictor.num_classes
        kept = self.hard_indices(losses, proposals, background)
        hard = [props[keep] for props, (keep, _) in zip(proposals, kept)]
        hard_losses = [loss[keep] for loss, (keep, _) in zip(losses, kept)]
        num_after_nms = [n_nms for _, n_nms in kept]
        _log_mining_stats(proposals, losses, hard, hard_losses, num_after_nms, background)
        return hard

    def hard_indices(self, losses, proposals, background_label):
        """Per image, (indices of the hard RoIs, hardest first; number left after NMS)."""
        return [
            select_hard_examples(
                loss,
                props.proposal_boxes.tensor,
                props.gt_classes,
                batch_size=self.batch_size_per_image,
                nms_thresh=self.nms_thresh,
                nms_per_label=self.nms_per_label,
                background_label=background_label,
                positive_fraction=self.positive_fraction,
            )
            for props, loss in zip(proposals, losses)
        ]


def check_ohem_config(cfg) -> None:
    """Raise ValueError naming the config key if an OHEM setting is out of its range."""
    require_ohem_config(cfg, "MODEL.ROI_HEADS.OHEM")
    ohem = cfg.MODEL.ROI_HEADS.OHEM
    key = "MODEL.ROI_HEADS.OHEM."
    problems = []
    if cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE <= 0:
        problems.append(
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE (hard RoIs per image) must be > 0, got "
            f"{cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE}"
        )
    if ohem.HARDNESS not in HARDNESS_CHOICES:
        problems.append(f"{key}HARDNESS must be one of {HARDNESS_CHOICES}, got {ohem.HARDNESS!r}")
    if not ohem.NMS_THRESH >= 0:
        problems.append(f"{key}NMS_THRESH must be >= 0 (>= 1 turns NMS off), got {ohem.NMS_THRESH}")
    if not (ohem.POSITIVE_FRACTION == -1 or 0 < ohem.POSITIVE_FRACTION <= 1):
        problems.append(
            f"{key}POSITIVE_FRACTION (positive_fraction) must be -1 or in (0, 1], got "
            f"{ohem.POSITIVE_FRACTION}"
        )
    if ohem.READONLY_CHUNK_SIZE < 0:
        problems.append(f"{key}READONLY_CHUNK_SIZE must be >= 0, got {ohem.READONLY_CHUNK_SIZE}")
    fast = ohem.FAST_READONLY
    if fast.MODE not in FAST_READONLY_MODES:
        problems.append(
            f"{key}FAST_READONLY.MODE must be one of {FAST_READONLY_MODES}, got {fast.MODE!r}"
        )
    if fast.MODE and fast.RANK <= 0:
        problems.append(f"{key}FAST_READONLY.RANK must be > 0, got {fast.RANK}")
    if fast.MODE and fast.REFRESH_PERIOD <= 0:
        problems.append(f"{key}FAST_READONLY.REFRESH_PERIOD must be > 0, got {fast.REFRESH_PERIOD}")
    if fast.MODE and fast.NUM_LAYERS < 0:
        problems.append(f"{key}FAST_READONLY.NUM_LAYERS must be >= 0, got {fast.NUM_LAYERS}")
    if problems:
        raise ValueError("Invalid OHEM config: " + "; ".join(problems))


@torch.no_grad()
def _log_mining_stats(proposals, losses, hard, hard_losses, num_after_nms, background) -> None:
    candidate = torch.cat([p.gt_classes for p in proposals]) >= 0
    candidate_losses = torch.cat(losses)[candidate]
    hard_losses = torch.cat(hard_losses)
    hard_labels = torch.cat([h.gt_classes for h in hard])
    num_images = len(proposals)
    storage = get_event_storage()
    storage.put_scalar("ohem/num_candidates", candidate_losses.numel() / num_images)
    storage.put_scalar("ohem/num_after_nms", sum(num_after_nms) / num_images)
    storage.put_scalar(
        "ohem/fg_fraction", int((hard_labels != background).sum()) / max(hard_labels.numel(), 1)
    )
    storage.put_scalar("ohem/mean_loss_all", _mean(candidate_losses))
    storage.put_scalar("ohem/mean_loss_hard", _mean(hard_losses))


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0
