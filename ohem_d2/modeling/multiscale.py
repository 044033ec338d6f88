"""M, multi-scale testing (SPPnet's, as the OHEM paper applies it): each image is evaluated at
every scale of ``TEST.AUG.MIN_SIZES`` (longer side at most ``TEST.AUG.MAX_SIZE``), each
scale's detections are mapped back to the original image, and all scales' detections *before
NMS* are pooled for one per-class NMS and the per-image cap.

Built on Detectron2's ``GeneralizedRCNNWithTTA`` and ``DatasetMapperTTA``. Two differences:
precomputed proposals are resized with each scale's image (Detectron2's
``transform_proposals``), and the pooled detections are each scale's candidates before NMS,
not its final (NMS'd and capped) detections. With ``TEST.ITERATIVE_BBOX_REG`` /
``TEST.BOX_VOTING`` on, each scale's candidates are R1 U R2 and the vote runs over all
scales' boxes.
"""

import sys

import torch
from detectron2.data.detection_utils import transform_proposals
from detectron2.modeling import DatasetMapperTTA, GeneralizedRCNNWithTTA
from detectron2.structures import Boxes, Instances
from torch import nn

from .ddp import unwrap_ddp
from .iterative_box_regression import (
    BoxRefinementSettings,
    candidate_detections,
    check_refinable,
    select_detections,
)

__all__ = ["MultiScaleRCNN", "ProposalDatasetMapperTTA"]


class ProposalDatasetMapperTTA(DatasetMapperTTA):
    """``DatasetMapperTTA`` whose resized inputs carry the image's precomputed proposals,
    resized with the image as Detectron2's ``DatasetMapper`` resizes them in training and
    single-scale testing.

    Its input is a dataset dict with the image read (``"image"``, CHW) and the proposal file's
    raw ``proposal_boxes`` / ``proposal_objectness_logits`` / ``proposal_bbox_mode`` (as
    ``ohem_d2.engine.loaders.build_multiscale_test_loader`` gives it); inputs without
    proposals (RPN models) pass as in ``DatasetMapperTTA``.
    """

    def __call__(self, dataset_dict):
        if "proposals" in dataset_dict:
            raise ValueError(
                "Multi-scale testing got an input whose proposals were already resized with "
                "its image; it needs the proposal file's boxes (the test loader of "
                "ohem_d2.engine.loaders.build_multiscale_test_loader)"
            )
        augmented = super().__call__(dataset_dict)
        for x in augmented:
            # Every proposal of the file, as the single-scale loader keeps them: the model's
            # proposal generator selects.
            transform_proposals(
                x, tuple(x["image"].shape[1:]), x["transforms"], proposal_topk=sys.maxsize
            )
        return augmented


class MultiScaleRCNN(GeneralizedRCNNWithTTA):
    """Multi-scale testing of a GeneralizedRCNN (FastRCNN with precomputed proposals
    included; Standard and C4 heads, OHEM or not), with the detections of all scales pooled
    before NMS. Called like ``GeneralizedRCNN.forward`` at inference.

    Masks, as in ``GeneralizedRCNNWithTTA``, are predicted on the final boxes at every scale
    and averaged; keypoints are not supported (nor are they there).
    """

    def __init__(self, cfg, model: nn.Module, tta_mapper=None, batch_size: int = 1):
        """
        Args:
            cfg: a config with ``TEST.AUG`` and this project's keys (add_ohem_config).
            model: the trained GeneralizedRCNN.
            tta_mapper: makes the scaled inputs; default :class:`ProposalDatasetMapperTTA`.
            batch_size: scaled inputs per forward. 1, the default, makes each scale's
                detections those of single-scale testing at that scale exactly (a batch pads
                its images to a common size).
        """
        # GeneralizedRCNNWithTTA.__init__ refuses precomputed proposals, which this class
        # handles; it sets the attributes its methods read (cfg, model, tta_mapper,
        # batch_size), and so does this.
        nn.Module.__init__(self)
        model = unwrap_ddp(model)
        check_refinable(model)
        if cfg.MODEL.KEYPOINT_ON:
            raise ValueError("Multi-scale testing does not support keypoint models")
        self.cfg = cfg.clone()
        self.model = model
        self.tta_mapper = tta_mapper if tta_mapper is not None else ProposalDatasetMapperTTA(cfg)
        self.batch_size = batch_size
        self.settings = BoxRefinementSettings.from_config(cfg)

    def _get_augmented_boxes(self, augmented_inputs, tfms):
        """Every scale's detections before NMS, mapped back to the original image.

        Returns:
            boxes (M, 4), scores (M,), classes (M,) of all scales together.
        """
        candidates = []
        for start in range(0, len(augmented_inputs), self.batch_size):
            batch = augmented_inputs[start : start + self.batch_size]
            candidates.extend(candidate_detections(self.model, batch, self.settings)[2])
        boxes = []
        for detections, tfm in zip(candidates, tfms):
            scaled = detections.pred_boxes.tensor
            original = tfm.inverse().apply_box(scaled.cpu().numpy())
            boxes.append(torch.as_tensor(original, device=scaled.device))
        scores = torch.cat([x.scores for x in candidates])
        classes = torch.cat([x.pred_classes for x in candidates])
        return torch.cat(boxes), scores, classes

    def _merge_detections(self, all_boxes, all_scores, all_classes, shape_hw):
        """One per-class NMS (and box voting, if on) over all scales' detections, and the
        per-image cap."""
        boxes = Boxes(all_boxes)
        boxes.clip(shape_hw)
        pooled = Instances(shape_hw, pred_boxes=boxes, scores=all_scores, pred_classes=all_classes)
        # Boxes empty after clipping are dropped, as single-scale postprocessing drops them.
        return select_detections(pooled[boxes.nonempty()], self.settings)
