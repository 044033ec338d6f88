"""The OHEM component shared by all ROI heads: readonly scoring, then hard-RoI selection.

It needs no subclassing: any ROI head that labels its proposals (without subsampling) and
trains a :class:`FastRCNNOutputLayers`-like predictor can call it and train on what it returns.
"""

import math
from collections.abc import Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.structures import Instances
from torch import nn

from ...config import require_ohem_config
from .diagnostics import log_mining, nearest_gt_iou
from .fast_readonly import build_readonly_approximation
from .mining import _select_hard_examples
from .readonly_net import ReadonlyHead
from .remainder import draw_remainder
from .scoring import Approximation, Predictions, ReadonlyScorer
from .settings import check_config_values, check_settings

__all__ = ["HardExampleMiner", "check_ohem_config"]


class HardExampleMiner:
    """Replaces the random fg/bg sampling of an ROI head by online hard example mining.

    Per image: the loss of every labelled RoI under the current weights (readonly pass, no
    autograd), NMS with the loss as score, then the ``batch_size_per_image`` hardest RoIs.
    Logs to the current EventStorage (:mod:`.diagnostics`; keys relative, so a caller's
    ``storage.name_scope`` prefixes them): ``ohem/num_candidates``, ``ohem/num_after_nms``
    (means per image), ``ohem/fg_fraction`` (of the hard set), ``ohem/mean_loss_all`` and
    ``ohem/mean_loss_hard`` (readonly losses, mean per RoI); and what it mined:
    ``ohem/hard_set/<class>`` (share of each class and of "background" in the hard set),
    ``ohem/hard_bg_iou/<bin>`` (share of the hard background whose IoU with the nearest
    ground truth is 0, in (0, 0.1), [0.1, 0.3), [0.3, 0.5) or higher), ``ohem/hard_bg_suspect``
    (share of the hard background that looks like an unlabelled object, see
    ``suspect_bg_*``) and ``ohem/num_suspect_candidates`` (mean per image). The hard
    Instances carry a bool field ``suspect_bg``.

    Beyond the paper, three protections against unlabelled objects (all off by default):
    ``suspect_bg_weight``, ``trim_bg_fraction`` and ``easy_bg_fraction``; and a weighted
    random remainder (``remainder_num``, off by default): the hard Instances then carry a
    float field ``ohem_weight``, each RoI's weight in the box losses.
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
        suspect_bg_weight: float = 1.0,
        suspect_bg_score: float = 0.5,
        suspect_bg_max_iou: float = 0.1,
        trim_bg_fraction: float = 0.0,
        easy_bg_fraction: float = 0.0,
        class_names: Sequence[str] | None = None,
        remainder_num: int = 0,
        remainder_fg_fraction: float | None = None,
        remainder_alpha: float = 0.0,
        remainder_smoothing: float = 1.0,
        remainder_exponent: float = 1.0,
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
            suspect_bg_weight: multiplies the hardness of suspect background candidates
                (readonly probability of some object class >= ``suspect_bg_score``, IoU with
                every ground truth < ``suspect_bg_max_iou``); 1: the paper, 0: excluded.
            trim_bg_fraction, easy_bg_fraction: see :func:`select_hard_examples`
                (``num_easy_bg = floor(easy_bg_fraction * batch_size_per_image)``); 0: the paper.
            class_names: names of the K classes for the ``ohem/hard_set/`` keys (default
                "class<k>").
            remainder_num: RoIs per image drawn beyond a hard set of
                ``batch_size_per_image - remainder_num`` (0: the paper); see
                :func:`draw_remainder` for it and the other ``remainder_*`` arguments
                (``remainder_fg_fraction`` is its ``target_fg_fraction``).
        """
        check_settings(
            batch_size_per_image=batch_size_per_image,
            nms_thresh=nms_thresh,
            positive_fraction=positive_fraction,
            suspect_bg_weight=suspect_bg_weight,
            suspect_bg_score=suspect_bg_score,
            suspect_bg_max_iou=suspect_bg_max_iou,
            trim_bg_fraction=trim_bg_fraction,
            easy_bg_fraction=easy_bg_fraction,
            remainder_num=remainder_num,
            remainder_alpha=remainder_alpha,
            remainder_smoothing=remainder_smoothing,
            remainder_exponent=remainder_exponent,
        )
        if remainder_num > batch_size_per_image:
            raise ValueError(
                f"remainder_num ({remainder_num}) must be at most batch_size_per_image "
                f"({batch_size_per_image}) (config: MODEL.ROI_HEADS.OHEM.REMAINDER.NUM_PER_IMAGE, "
                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE)"
            )
        if remainder_num and (trim_bg_fraction or easy_bg_fraction):
            raise ValueError(
                "MODEL.ROI_HEADS.OHEM.REMAINDER.NUM_PER_IMAGE > 0 cannot be combined with "
                "TRIM_BG_FRACTION or EASY_BG_FRACTION: both change which background RoIs "
                "the minibatch draws; set those to 0"
            )
        if remainder_fg_fraction is not None:
            check_settings(sampler_fg_fraction=remainder_fg_fraction)
        self.remainder_num = remainder_num
        self.remainder_fg_fraction = remainder_fg_fraction
        self.remainder_alpha = remainder_alpha
        self.remainder_smoothing = remainder_smoothing
        self.remainder_exponent = remainder_exponent
        self.batch_size_per_image = batch_size_per_image
        self.nms_thresh = nms_thresh
        self.nms_per_label = nms_per_label
        self.positive_fraction = positive_fraction
        self.suspect_bg_weight = suspect_bg_weight
        self.suspect_bg_score = suspect_bg_score
        self.suspect_bg_max_iou = suspect_bg_max_iou
        self.trim_bg_fraction = trim_bg_fraction
        self.num_easy_bg = math.floor(easy_bg_fraction * batch_size_per_image)
        self.class_names = list(class_names) if class_names is not None else None
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
            "suspect_bg_weight": ohem.SUSPECT_BG_WEIGHT,
            "suspect_bg_score": ohem.SUSPECT_BG_SCORE,
            "suspect_bg_max_iou": ohem.SUSPECT_BG_MAX_IOU,
            "trim_bg_fraction": ohem.TRIM_BG_FRACTION,
            "easy_bg_fraction": ohem.EASY_BG_FRACTION,
            "class_names": _train_class_names(cfg),
            "remainder_num": ohem.REMAINDER.NUM_PER_IMAGE,
            "remainder_fg_fraction": (
                cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION
                if ohem.REMAINDER.TARGET == "STOCK_SAMPLER"
                else None
            ),
            "remainder_alpha": ohem.REMAINDER.ALPHA,
            "remainder_smoothing": ohem.REMAINDER.SMOOTHING,
            "remainder_exponent": ohem.REMAINDER.WEIGHT_EXPONENT,
        }

    def __call__(
        self, features: Sequence[torch.Tensor], proposals: Sequence[Instances], head: ReadonlyHead
    ) -> tuple[list[Instances], Predictions]:
        """Mine the hard RoIs of a batch.

        Args:
            features: the head's input feature maps, each (N, C, H, W).
            proposals: N Instances, every RoI labelled (fields ``proposal_boxes``,
                ``gt_classes`` in [0, K] or -1, and ``gt_boxes`` when the image has ground
                truth), not subsampled.
            head: the RoI network that scores them (see :func:`readonly_head`).

        Returns:
            hard: N Instances, the hard subsets of ``proposals`` (hardest first), with all
                their fields; train the head on these.
            predictions: readonly scores (R, K+1) and deltas of all R RoIs of ``proposals``
                (e.g. to refine the boxes of the next cascade stage).
        """
        predictions = self.scorer.predict(
            features, proposals, box_forward=head, readonly_modules=head.modules
        )
        return self.select(proposals, predictions, head.predictor), predictions

    def select(
        self, proposals: Sequence[Instances], predictions: Predictions, box_predictor: nn.Module
    ) -> list[Instances]:
        """Everything after the readonly forward: per-RoI losses, NMS, top-k, gathering, logs.

        Args:
            proposals: as in ``__call__``.
            predictions: the readonly scores and deltas of all RoIs of ``proposals``.
            box_predictor: the predictor that made them (its loss settings define the loss).

        Returns:
            N Instances, the hard subsets of ``proposals`` (hardest first).
        """
        losses = self.scorer.losses(box_predictor, predictions, proposals)
        background = box_predictor.num_classes
        # Each RoI's IoU with its nearest ground truth, once: for the suspects and the logs.
        ious = [nearest_gt_iou(p) for p in proposals]
        suspects = self.suspect_background(proposals, predictions, box_predictor, ious)
        ranking_losses, ranking_labels = self.ranking(losses, suspects, proposals)
        kept = self.hard_indices(ranking_losses, proposals, background, ranking_labels)
        weights = [None] * len(kept)
        if self.remainder_num:
            drawn = [
                draw_remainder(
                    loss,
                    label,
                    keep,
                    num=self.remainder_num,
                    background_label=background,
                    target_fg_fraction=self.remainder_fg_fraction,
                    alpha=self.remainder_alpha,
                    smoothing=self.remainder_smoothing,
                    weight_exponent=self.remainder_exponent,
                )
                for loss, label, (keep, _) in zip(losses, ranking_labels, kept)
            ]
            kept = [(keep, n_nms) for (keep, _), (_, n_nms) in zip(drawn, kept)]
            weights = [w for _, w in drawn]
        hard = []
        for props, suspect, (keep, _), weight in zip(proposals, suspects, kept, weights):
            hard.append(props[keep])
            hard[-1].suspect_bg = suspect[keep]
            if weight is not None:
                hard[-1].ohem_weight = weight
        hard_losses = [loss[keep] for loss, (keep, _) in zip(losses, kept)]
        hard_ious = [iou[keep] for iou, (keep, _) in zip(ious, kept)]
        num_after_nms = [n_nms for _, n_nms in kept]
        log_mining(
            proposals, losses, hard, hard_losses, hard_ious, num_after_nms, suspects,
            background, self.class_names,
        )  # fmt: skip
        return hard

    def suspect_background(
        self, proposals, predictions, box_predictor, ious=None
    ) -> list[torch.Tensor]:
        """Per image, (Ri,) bool: the background candidates that look like unlabelled objects.

        A suspect is labelled background, has IoU < ``suspect_bg_max_iou`` with every
        ground-truth box, and the readonly pass gives some object class a probability
        >= ``suspect_bg_score``. ``ious``: per image, :func:`nearest_gt_iou`, if at hand.
        """
        background = box_predictor.num_classes
        probs = box_predictor.predict_probs(predictions, proposals)
        if ious is None:
            ious = [nearest_gt_iou(p) for p in proposals]
        suspects = []
        for props, prob, iou in zip(proposals, probs, ious):
            object_prob = prob[:, :background].max(dim=1).values
            suspects.append(
                (props.gt_classes == background)
                & (iou < self.suspect_bg_max_iou)
                & (object_prob >= self.suspect_bg_score)
            )
        return suspects

    def ranking(self, losses, suspects, proposals):
        """The hardness and the candidate labels that the selection ranks by: the readonly
        losses, with suspects down-weighted (or labelled -1, never candidates, at weight 0)."""
        labels = [p.gt_classes for p in proposals]
        if self.suspect_bg_weight == 1:
            return losses, labels
        if self.suspect_bg_weight == 0:
            return losses, [torch.where(s, -1, lab) for s, lab in zip(suspects, labels)]
        weighted = [
            torch.where(s, loss * self.suspect_bg_weight, loss) for s, loss in zip(suspects, losses)
        ]
        return weighted, labels

    def hard_indices(self, losses, proposals, background_label, labels=None):
        """Per image, (indices of the hard RoIs, hardest first; number left after NMS).

        Args:
            losses: per image, (Ri,) hardness.
            proposals: the labelled proposals (their boxes; their ``gt_classes`` unless
                ``labels`` is given).
            background_label: K.
            labels: per image, (Ri,) candidate labels in [0, K] or -1 (never a candidate).
        """
        if labels is None:
            labels = [p.gt_classes for p in proposals]
        num_hard = self.batch_size_per_image - self.remainder_num
        if num_hard == 0:  # the whole minibatch is drawn (remainder_num == batch size)
            return [(label.new_zeros(0), 0) for label in labels]
        return [
            _select_hard_examples(
                loss,
                props.proposal_boxes.tensor,
                label,
                batch_size=num_hard,
                nms_thresh=self.nms_thresh,
                nms_per_label=self.nms_per_label,
                background_label=background_label,
                positive_fraction=self.positive_fraction,
                trim_bg_fraction=self.trim_bg_fraction,
                num_easy_bg=self.num_easy_bg,
            )
            for props, loss, label in zip(proposals, losses, labels)
        ]


def _train_class_names(cfg):
    names = cfg.DATASETS.TRAIN
    return MetadataCatalog.get(names[0]).get("thing_classes") if names else None


def check_ohem_config(cfg) -> None:
    """Raise ValueError naming every OHEM config key that is out of its range.

    The FAST_READONLY rank, period and layer count matter only with a MODE set.
    """
    require_ohem_config(cfg, "MODEL.ROI_HEADS.OHEM")
    ohem = cfg.MODEL.ROI_HEADS.OHEM
    values = {
        "batch_size_per_image": cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
        "nms_thresh": ohem.NMS_THRESH,
        "positive_fraction": ohem.POSITIVE_FRACTION,
        "hardness": ohem.HARDNESS,
        "readonly_chunk_size": ohem.READONLY_CHUNK_SIZE,
        "fast_readonly_mode": ohem.FAST_READONLY.MODE,
        "suspect_bg_weight": ohem.SUSPECT_BG_WEIGHT,
        "suspect_bg_score": ohem.SUSPECT_BG_SCORE,
        "suspect_bg_max_iou": ohem.SUSPECT_BG_MAX_IOU,
        "trim_bg_fraction": ohem.TRIM_BG_FRACTION,
        "easy_bg_fraction": ohem.EASY_BG_FRACTION,
        "prior_target": ohem.PRIOR_CORRECTION_TARGET,
        "remainder_num": ohem.REMAINDER.NUM_PER_IMAGE,
        "remainder_target": ohem.REMAINDER.TARGET,
        "remainder_alpha": ohem.REMAINDER.ALPHA,
        "remainder_smoothing": ohem.REMAINDER.SMOOTHING,
        "remainder_exponent": ohem.REMAINDER.WEIGHT_EXPONENT,
    }
    if ohem.FAST_READONLY.MODE:
        values["rank"] = ohem.FAST_READONLY.RANK
        values["refresh_period"] = ohem.FAST_READONLY.REFRESH_PERIOD
        values["num_layers"] = ohem.FAST_READONLY.NUM_LAYERS
    check_config_values(values)
