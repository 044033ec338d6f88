"""The readonly pass of OHEM: the loss of every RoI under the current weights, without autograd.

The per-RoI losses use the box predictor's own loss settings (box transform, regression loss
type, smooth-L1 beta, loss weights), normalised so that their mean over a set of RoIs equals
``loss_cls + loss_box_reg`` of :meth:`FastRCNNOutputLayers.losses` on that set. Detectron2
divides the box loss by the number of all RoIs, not of the foreground ones, so the box loss of
a foreground RoI enters its own per-RoI loss undivided.
"""

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import _log_classification_stats
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss, smooth_l1_loss
from torch import nn
from torch.nn import functional as F

from .settings import HARDNESS_CHOICES, check_settings

__all__ = [
    "HARDNESS_CHOICES",
    "ReadonlyScorer",
    "check_box_predictor_supported",
    "per_roi_loss_terms",
    "per_roi_losses",
    "readonly_mode",
    "weighted_box_losses",
]

SUPPORTED_BOX_REG_LOSSES = ("smooth_l1", "giou")
# Norm layers whose training mode reads batch statistics and updates running statistics.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# (scores (R, K+1), deltas (R, K*4) or (R, 4)): the output of FastRCNNOutputLayers.forward.
Predictions = tuple[torch.Tensor, torch.Tensor]
# Maps one image's features (list of (1, C, H, W)) and RoIs ([Boxes]) to its predictions.
BoxForward = Callable[[list[torch.Tensor], list[Boxes]], Predictions]
# Given the readonly modules, a context in which their forward is a faster approximation.
Approximation = Callable[[Sequence[nn.Module]], contextlib.AbstractContextManager]


def check_box_predictor_supported(box_predictor: nn.Module) -> None:
    """Raise ValueError if the per-RoI losses of this predictor's loss settings are not defined.

    Args:
        box_predictor: a :class:`FastRCNNOutputLayers` (or one with the same attributes).
    """
    loss_type = box_predictor.box_reg_loss_type
    if loss_type not in SUPPORTED_BOX_REG_LOSSES:
        raise ValueError(
            f"OHEM supports box regression losses {SUPPORTED_BOX_REG_LOSSES}, got '{loss_type}'"
        )
    if getattr(box_predictor, "use_fed_loss", False):
        # The federated loss samples negative classes at random: not a per-RoI loss.
        raise ValueError("OHEM does not support the federated loss (USE_FED_LOSS)")


def _loss_weight(box_predictor: nn.Module, name: str) -> float:
    weight = box_predictor.loss_weight
    return float(weight.get(name, 1.0)) if isinstance(weight, dict) else float(weight)


def _per_roi_cls_loss(box_predictor, scores: torch.Tensor, gt_classes: torch.Tensor):
    """(R,) classification loss of each RoI; RoIs labelled -1 must be masked by the caller."""
    labels = gt_classes.clamp(min=0)
    if not getattr(box_predictor, "use_sigmoid_ce", False):
        return F.cross_entropy(scores, labels, reduction="none")
    # Detectron2's sigmoid CE sums the K foreground-class BCE terms and divides by R.
    num_classes = scores.shape[1] - 1
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(scores.dtype)
    bce = F.binary_cross_entropy_with_logits(scores[:, :num_classes], target, reduction="none")
    return bce.sum(dim=1)


def _per_roi_box_loss(box_predictor, proposal_boxes, gt_boxes, fg_deltas):
    """(F,) box regression loss of each foreground RoI, summed over its coordinates."""
    transform = box_predictor.box2box_transform
    loss_type = box_predictor.box_reg_loss_type
    if loss_type == "smooth_l1":
        gt_deltas = transform.get_deltas(proposal_boxes, gt_boxes)
        loss = smooth_l1_loss(fg_deltas, gt_deltas, box_predictor.smooth_l1_beta, "none")
        return loss.sum(dim=1)
    if loss_type == "giou":
        pred_boxes = transform.apply_deltas(fg_deltas, proposal_boxes)
        return giou_loss(pred_boxes, gt_boxes, reduction="none")
    raise ValueError(f"OHEM: unsupported box regression loss type '{loss_type}'")


def per_roi_loss_terms(
    box_predictor: nn.Module,
    predictions: Predictions,
    proposals: Sequence[Instances],
    *,
    with_box: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each RoI's classification and box regression loss, before the predictor's loss
    weights, differentiable; RoIs labelled -1 (ignored) get 0 in both.

    Args: as :func:`per_roi_losses`; ``with_box`` False leaves the box term 0.

    Returns:
        (R,) classification loss and (R,) box regression loss (0 for background RoIs).
    """
    scores, deltas = predictions[0], predictions[1]
    if len(proposals) == 0 or scores.shape[0] == 0:
        zeros = scores.new_zeros(scores.shape[0])
        return zeros, zeros
    gt_classes = cat([p.gt_classes for p in proposals], dim=0)
    ignored = gt_classes < 0
    cls_loss = _per_roi_cls_loss(box_predictor, scores, gt_classes)
    box_loss = torch.zeros_like(cls_loss)
    if with_box:
        num_classes = box_predictor.num_classes
        fg = torch.nonzero((gt_classes >= 0) & (gt_classes < num_classes)).squeeze(1)
        proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
        # Images without ground truth have no gt_boxes: all their RoIs are background.
        gt_boxes = cat(
            [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
            dim=0,
        )
        box_dim = proposal_boxes.shape[1]
        if deltas.shape[1] == box_dim:  # class-agnostic regression
            fg_deltas = deltas[fg]
        else:
            fg_deltas = deltas.view(-1, num_classes, box_dim)[fg, gt_classes[fg]]
        box_loss = box_loss.index_put(
            (fg,), _per_roi_box_loss(box_predictor, proposal_boxes[fg], gt_boxes[fg], fg_deltas)
        )
    zero = torch.zeros_like(cls_loss)
    return torch.where(ignored, zero, cls_loss), torch.where(ignored, zero, box_loss)


@torch.no_grad()
def per_roi_losses(
    box_predictor: nn.Module,
    predictions: Predictions,
    proposals: Sequence[Instances],
    *,
    hardness: str = "cls+box",
) -> torch.Tensor:
    """The loss of each RoI, such that its mean over the RoIs is the predictor's total loss.

    Args:
        box_predictor: the :class:`FastRCNNOutputLayers` that made ``predictions``.
        predictions: scores (R, K+1) and deltas (R, K*4) or (R, 4) for the R RoIs of
            ``proposals``, concatenated over images.
        proposals: per-image labelled RoIs with fields ``proposal_boxes``, ``gt_classes``
            and, in images with ground truth, ``gt_boxes``.
        hardness: "cls+box" (classification + box regression loss, the paper) or "cls";
            not checked per call: :class:`ReadonlyScorer` checks it once, when built.

    Returns:
        (R,) float tensor: ``w_cls * CE + w_box * box loss`` (box loss only for foreground
        RoIs); 0 for RoIs labelled -1 (ignored), which are never training examples.
    """
    cls_loss, box_loss = per_roi_loss_terms(
        box_predictor, predictions, proposals, with_box=hardness == "cls+box"
    )
    return (
        _loss_weight(box_predictor, "loss_cls") * cls_loss
        + _loss_weight(box_predictor, "loss_box_reg") * box_loss
    )


def weighted_box_losses(
    box_predictor: nn.Module, predictions: Predictions, proposals: Sequence[Instances]
) -> dict[str, torch.Tensor]:
    """``loss_cls`` and ``loss_box_reg`` as :meth:`FastRCNNOutputLayers.losses` gives them,
    with each RoI's term multiplied by its ``ohem_weight`` and the sum divided by the number
    of images (each image's weights sum to about 1, where the predictor's own losses give
    each of an image's B RoIs 1/B)."""
    scores = predictions[0]
    _log_classification_stats(scores, cat([p.gt_classes for p in proposals], dim=0))
    cls_loss, box_loss = per_roi_loss_terms(box_predictor, predictions, proposals)
    weights = cat([p.ohem_weight for p in proposals], dim=0).to(scores)
    num_images = max(len(proposals), 1)
    return {
        "loss_cls": _loss_weight(box_predictor, "loss_cls")
        * (weights * cls_loss).sum()
        / num_images,
        "loss_box_reg": _loss_weight(box_predictor, "loss_box_reg")
        * (weights * box_loss).sum()
        / num_images,
    }


@contextlib.contextmanager
def readonly_mode(modules: Iterable[nn.Module], *, train_mode: bool) -> Iterator[None]:
    """Set the modes of the readonly pass; restore every submodule's mode on exit.

    ``train_mode=True`` keeps the modules' modes (dropout stays active, as in the authors'
    Caffe net) except batch norms, which switch to their running statistics: batch statistics
    of one image's chunk of RoIs would make the losses depend on the chunking, would update the
    running statistics outside the training step, and SyncBN would wait for other workers.
    ``train_mode=False`` puts everything in eval mode (a deterministic pass).
    """
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for m, _ in saved:
            if not train_mode or isinstance(m, _BATCH_NORMS):
                m.training = False
        yield
    finally:
        for m, training in saved:
            m.training = training


class ReadonlyScorer:
    """Runs the readonly pass of the box head and predictor over all RoIs, in chunks.

    Args:
        hardness: "cls+box" or "cls", see :func:`per_roi_losses`.
        train_mode: see :func:`readonly_mode`.
        chunk_size: RoIs per forward of the readonly pass, so that its memory does not grow with
            the number of proposals; 0 runs all RoIs of an image at once.
        approximation: None (exact, the paper) or a faster stand-in for the readonly forward,
            e.g. :class:`LowRankReadonly`.
    """

    def __init__(
        self,
        *,
        hardness: str = "cls+box",
        train_mode: bool = True,
        chunk_size: int = 1024,
        approximation: Approximation | None = None,
    ):
        check_settings(hardness=hardness, readonly_chunk_size=chunk_size)
        self.hardness = hardness
        self.train_mode = train_mode
        self.chunk_size = chunk_size
        self.approximation = approximation

    @torch.no_grad()
    def __call__(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[Instances],
        *,
        box_forward: BoxForward,
        box_predictor: nn.Module,
        readonly_modules: Iterable[nn.Module],
    ) -> tuple[list[torch.Tensor], Predictions]:
        """Score all RoIs.

        Args:
            features: the head's input feature maps, each (N, C, H, W).
            proposals: N labelled Instances (see :func:`per_roi_losses`), Ri RoIs each.
            box_forward: maps one image's features (each (1, C, H, W)) and its RoIs to the
                predictor's output, sharing the trainable weights (pooler, box head, predictor).
            box_predictor: the predictor whose loss settings define the per-RoI loss.
            readonly_modules: the modules ``box_forward`` runs (their modes are set here).

        Returns:
            losses: N tensors of shape (Ri,), see :func:`per_roi_losses`.
            predictions: scores (R, K+1) and deltas of all RoIs, concatenated over images.

        Raises:
            FloatingPointError: if a loss is NaN or infinite (a diverged model).
        """
        predictions = self.predict(
            features, proposals, box_forward=box_forward, readonly_modules=readonly_modules
        )
        return self.losses(box_predictor, predictions, proposals), predictions

    @torch.no_grad()
    def predict(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[Instances],
        *,
        box_forward: BoxForward,
        readonly_modules: Iterable[nn.Module],
    ) -> Predictions:
        """The readonly forward alone: scores and deltas of all RoIs, see ``__call__``."""
        readonly_modules = list(readonly_modules)
        approximate = (
            self.approximation(readonly_modules)
            if self.approximation is not None
            else contextlib.nullcontext()
        )
        with readonly_mode(readonly_modules, train_mode=self.train_mode), approximate:
            outputs = [
                self._forward_image([f[i : i + 1] for f in features], p.proposal_boxes, box_forward)
                for i, p in enumerate(proposals)
            ]
        return cat([o[0] for o in outputs], dim=0), cat([o[1] for o in outputs], dim=0)

    @torch.no_grad()
    def losses(
        self, box_predictor: nn.Module, predictions: Predictions, proposals: Sequence[Instances]
    ) -> list[torch.Tensor]:
        """Per-image (Ri,) losses of :meth:`predict`'s output, see ``__call__``."""
        losses = per_roi_losses(box_predictor, predictions, proposals, hardness=self.hardness)
        bad = ~torch.isfinite(losses)
        if bad.any():
            raise FloatingPointError(
                f"OHEM readonly pass: non-finite loss for {int(bad.sum())} of {bad.numel()} "
                f"RoIs at iteration {get_event_storage().iter}; training has diverged."
            )
        return list(losses.split([len(p) for p in proposals]))

    def _forward_image(self, features, boxes, box_forward: BoxForward) -> Predictions:
        num_rois = len(boxes)
        step = self.chunk_size if self.chunk_size > 0 else max(num_rois, 1)
        # An image without RoIs still runs one (empty) forward, which gives the output widths.
        chunks = [
            box_forward(features, [boxes[s : s + step]]) for s in range(0, max(num_rois, 1), step)
        ]
        return cat([c[0] for c in chunks], dim=0), cat([c[1] for c in chunks], dim=0)
