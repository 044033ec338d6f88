"""B: iterative bounding-box regression and box voting at inference (MR-CNN, Gidaris &
Komodakis 2015, as the OHEM paper applies it).

The RoI network scores and regresses the proposals (R1), then scores and regresses R1's boxes,
each for its own class (R2). The detections before NMS are R1 U R2; a per-class NMS keeps
some, and box voting moves each kept box to the score-weighted mean of the boxes of its class
that overlap it. Masks and keypoints then run on the final boxes.

Everything goes through the model's own parts: its backbone and proposals, the head's RoI
network (:func:`readonly_head`), ``FastRCNNOutputLayers.predict_boxes`` / ``predict_probs``
(so its ``Box2BoxTransform``) and Detectron2's ``fast_rcnn_inference`` for clipping and the
score threshold. Nothing changes a model: :class:`IterativeBoxRegressionWithVoting` wraps one
at evaluation, as Detectron2's ``GeneralizedRCNNWithTTA`` does.
"""

from dataclasses import dataclass

import torch
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.roi_heads import CascadeROIHeads, Res5ROIHeads, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances
from torch import nn
from torchvision.ops import batched_nms

from .box_voting import vote_boxes
from .ddp import unwrap_ddp
from .meta_arch import FastRCNN
from .ohem.readonly_net import readonly_head

__all__ = [
    "BoxRefinementSettings",
    "IterativeBoxRegressionWithVoting",
    "candidate_detections",
    "check_refinable",
    "select_detections",
]

# An NMS at IoU 1.0 suppresses nothing (a box is suppressed only above the threshold).
NO_NMS = 1.0


@dataclass(frozen=True)
class BoxRefinementSettings:
    """How detections are made from the RoI network's outputs (config keys in config.py).

    ``num_iterations`` 1 and ``voting`` False is Detectron2's own inference.
    """

    num_iterations: int = 1
    next_pass_nms_thresh: float = NO_NMS
    next_pass_topk_per_class: int = 0
    voting: bool = False
    voting_iou_thresh: float = 0.5
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100

    @classmethod
    def from_config(cls, cfg) -> "BoxRefinementSettings":
        iterative, voting = cfg.TEST.ITERATIVE_BBOX_REG, cfg.TEST.BOX_VOTING
        settings = cls(
            num_iterations=iterative.NUM_ITERATIONS if iterative.ENABLED else 1,
            next_pass_nms_thresh=iterative.NEXT_PASS_NMS_THRESH,
            next_pass_topk_per_class=iterative.NEXT_PASS_TOPK_PER_CLASS,
            voting=voting.ENABLED,
            voting_iou_thresh=voting.IOU_THRESH,
            score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            nms_thresh=voting.NMS_THRESH if voting.ENABLED else cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        if settings.num_iterations < 1:
            raise ValueError(
                "TEST.ITERATIVE_BBOX_REG.NUM_ITERATIONS must be >= 1, got "
                f"{settings.num_iterations}"
            )
        if settings.next_pass_topk_per_class < 0:
            raise ValueError("TEST.ITERATIVE_BBOX_REG.NEXT_PASS_TOPK_PER_CLASS must be >= 0")
        return settings

    @property
    def enabled(self) -> bool:
        """False: the model's own inference gives the same detections."""
        return self.num_iterations > 1 or self.voting


def check_refinable(model: nn.Module) -> None:
    """Raise a ValueError saying why, unless ``model`` is a GeneralizedRCNN (FastRCNN
    included) whose ROI head is a Standard or C4 head (OHEM or not)."""
    if not isinstance(model, GeneralizedRCNN):
        raise ValueError(
            "Iterative box regression, box voting and multi-scale testing need a "
            f"GeneralizedRCNN (FastRCNN included), got {type(model).__name__}"
        )
    heads = model.roi_heads
    if isinstance(heads, CascadeROIHeads):
        raise ValueError(
            "TEST.ITERATIVE_BBOX_REG / TEST.BOX_VOTING / multi-scale testing with proposals "
            "do not apply to CascadeROIHeads: its stages already score and regress each "
            "stage's boxes again (the iterative regression of B), and average the stages' "
            "scores, so its detections before NMS are not one head's. Evaluate it without "
            "these options; Detectron2's GeneralizedRCNNWithTTA (RPN models) tests it at "
            "several scales."
        )
    if not isinstance(heads, StandardROIHeads | Res5ROIHeads):
        raise ValueError(
            f"Iterative box regression and box voting support StandardROIHeads and "
            f"Res5ROIHeads (and subclasses, the OHEM heads), not {type(heads).__name__}"
        )
    if getattr(heads, "score_calibration", False):
        raise ValueError(
            "MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION maps the scores of the head's own "
            "detections, which TEST.ITERATIVE_BBOX_REG / TEST.BOX_VOTING / multi-scale "
            "testing replace; evaluate with one or the other"
        )


def _proposals(model: GeneralizedRCNN, batched_inputs, images, features) -> list[Instances]:
    """The proposals the model's ROI heads see at inference, as its own inference gets them."""
    if isinstance(model, FastRCNN):
        return model.select_proposals(batched_inputs)
    if model.proposal_generator is not None:
        return model.proposal_generator(images, features, None)[0]
    return [x["proposals"].to(model.device) for x in batched_inputs]


def _above_threshold(boxes, probs, image_sizes, score_thresh):
    """Every class-specific box whose class probability is above the threshold, clipped to its
    image, sorted by score: Detectron2's own inference, with an NMS that suppresses nothing.
    ``probs`` may have zeros where a (box, class) pair is not a candidate."""
    return fast_rcnn_inference(boxes, probs, image_sizes, score_thresh, NO_NMS, -1)[0]


def _top_k_per_class(detections: Instances, k: int) -> Instances:
    """The ``k`` highest-scoring detections of each class (ties: the earlier first)."""
    detections = detections[detections.scores.argsort(descending=True, stable=True)]
    order = detections.pred_classes.argsort(stable=True)  # by class, by score within
    classes = detections.pred_classes[order]
    rank = torch.arange(len(classes), device=classes.device) - torch.searchsorted(classes, classes)
    return detections[order[rank < k].sort().values]


def _next_pass_inputs(detections: Instances, settings: BoxRefinementSettings) -> Instances:
    """The boxes of one pass that the next pass scores and regresses again."""
    if settings.next_pass_nms_thresh < NO_NMS:
        keep = batched_nms(
            detections.pred_boxes.tensor,
            detections.scores,
            detections.pred_classes,
            settings.next_pass_nms_thresh,
        )
        detections = detections[keep]
    if settings.next_pass_topk_per_class > 0:
        detections = _top_k_per_class(detections, settings.next_pass_topk_per_class)
    return detections


def _score_again(network, features, previous: list[Instances], score_thresh):
    """Score and regress each previous detection's box, for its own class.

    Returns per image the new boxes with their new scores (above the threshold only)."""
    inputs = [Instances(x.image_size, proposal_boxes=x.pred_boxes.clone()) for x in previous]
    predictions = network(features, [x.proposal_boxes for x in inputs])
    boxes = network.predictor.predict_boxes(predictions, inputs)
    probs = network.predictor.predict_probs(predictions, inputs)
    # Only each box's own class is a candidate: the other classes' probabilities are zeroed.
    own_class = [
        torch.zeros_like(p).index_put_(
            (torch.arange(len(x), device=p.device), x.pred_classes),
            p[torch.arange(len(x), device=p.device), x.pred_classes],
        )
        for p, x in zip(probs, previous)
    ]
    return _above_threshold(boxes, own_class, [x.image_size for x in previous], score_thresh)


@torch.no_grad()
def candidate_detections(
    model: GeneralizedRCNN, batched_inputs: list[dict], settings: BoxRefinementSettings
):
    """The detections of ``model`` before NMS, with iterative regression if asked for.

    Args:
        model: a GeneralizedRCNN (FastRCNN included) in eval mode, see :func:`check_refinable`.
        batched_inputs: model inputs, as for ``model.inference``.
        settings: the score threshold, the number of passes and which boxes go on to the next.

    Returns:
        images: the ImageList the model ran on.
        features: the backbone's feature maps.
        list[Instances]: per image, in the coordinates of its (resized) input image, every
            class-specific box of every pass scoring above the threshold: ``pred_boxes``,
            ``scores``, ``pred_classes``. One pass: R1; two: R1 U R2.
    """
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    proposals = _proposals(model, batched_inputs, images, features)
    network = readonly_head(model.roi_heads)
    feature_list = [features[f] for f in model.roi_heads.in_features]
    image_sizes = [x.image_size for x in proposals]
    predictions = network(feature_list, [x.proposal_boxes for x in proposals])
    boxes = network.predictor.predict_boxes(predictions, proposals)
    probs = network.predictor.predict_probs(predictions, proposals)
    passes = [_above_threshold(boxes, probs, image_sizes, settings.score_thresh)]
    for _ in range(1, settings.num_iterations):
        previous = [_next_pass_inputs(x, settings) for x in passes[-1]]
        if not any(len(x) for x in previous):
            break
        passes.append(_score_again(network, feature_list, previous, settings.score_thresh))
    return images, features, [Instances.cat(list(per_image)) for per_image in zip(*passes)]


@torch.no_grad()
def select_detections(candidates: Instances, settings: BoxRefinementSettings) -> Instances:
    """Per-class NMS on ``candidates``, the per-image cap, then box voting if asked for.

    Args:
        candidates: one image's detections before NMS (``pred_boxes``, ``scores``,
            ``pred_classes``), e.g. from :func:`candidate_detections` or pooled over scales.

    Returns:
        Instances of the kept detections, by decreasing score, their scores unchanged.
    """
    boxes, scores, classes = (
        candidates.pred_boxes.tensor,
        candidates.scores,
        candidates.pred_classes,
    )
    keep = batched_nms(boxes, scores, classes, settings.nms_thresh)
    if settings.detections_per_image >= 0:
        keep = keep[: settings.detections_per_image]
    kept = candidates[keep]
    if settings.voting:
        kept.pred_boxes = Boxes(
            vote_boxes(
                kept.pred_boxes.tensor,
                kept.pred_classes,
                boxes,
                scores,
                classes,
                settings.voting_iou_thresh,
            )
        )
    return kept


class IterativeBoxRegressionWithVoting(nn.Module):
    """A GeneralizedRCNN (FastRCNN included) whose inference makes its detections with
    :func:`candidate_detections` and :func:`select_detections`.

    Called like ``GeneralizedRCNN.forward`` at inference; built at evaluation around a trained
    model (the model and its checkpoint are unchanged), as ``GeneralizedRCNNWithTTA`` is.
    """

    def __init__(self, model: nn.Module, settings: BoxRefinementSettings):
        super().__init__()
        model = unwrap_ddp(model)
        check_refinable(model)
        self.model = model
        self.settings = settings

    def forward(self, batched_inputs: list[dict]):
        return self.inference(batched_inputs)

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict], do_postprocess: bool = True):
        """As ``GeneralizedRCNN.inference``: per image {"instances": Instances} in the
        original image's size, or the Instances of the input images without postprocessing."""
        images, features, candidates = candidate_detections(
            self.model, batched_inputs, self.settings
        )
        detections = [select_detections(x, self.settings) for x in candidates]
        detections = self.model.roi_heads.forward_with_given_boxes(features, detections)
        if not do_postprocess:
            return detections
        return [
            {
                "instances": detector_postprocess(
                    r, x.get("height", size[0]), x.get("width", size[1])
                )
            }
            for r, x, size in zip(detections, batched_inputs, images.image_sizes)
        ]
