"""ROI heads that train on the hard RoIs mined by OHEM instead of a random fg/bg sample.

One training step of an OHEM head:

1. label: every proposal (plus the ground-truth boxes) is labelled by Detectron2's own
   ``ROIHeads.label_and_sample_proposals`` with the head's matcher, its subsampling step
   replaced by "keep every RoI" (:func:`label_without_sampling`);
2. mine: :class:`HardExampleMiner` scores them all with the head's :class:`ReadonlyHead` and
   keeps the hard RoIs;
3. train: the parent head's own ``forward`` (box, mask and keypoint losses) runs on the hard
   set unchanged.

Inference is the parent's, unless ``MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION`` (beyond the
paper) shifts the class logits from the hard sets' class prior to that of all RoIs.

Deployment is Detectron2's: tracing works for every head, and TorchScript scripting
(``detectron2.export.scripting_with_instances``) for :class:`OHEMROIHeads` and
:class:`OHEMRes5ROIHeads`, as for their parents.
"""

import contextlib
import functools

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    Res5ROIHeads,
    ROIHeads,
    StandardROIHeads,
)
from detectron2.structures import ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from ..ddp import unwrap_ddp
from .distributed import sum_over_processes
from .labelling import label_without_sampling
from .miner import HardExampleMiner
from .readonly_net import readonly_head
from .scoring import check_box_predictor_supported, weighted_box_losses
from .settings import check_settings

__all__ = [
    "OHEMCascadeROIHeads",
    "OHEMHeadMixin",
    "OHEMROIHeads",
    "OHEMRes5ROIHeads",
    "scores_as_trained",
]


class OHEMHeadMixin:
    """What the OHEM heads share: the miner, and labelling of all proposals.

    Put it before a Detectron2 ROI head class in the bases. The single-stage ``forward`` here
    labels (:meth:`label_proposals`), mines (:meth:`mine_hard_examples`) and hands the hard
    set to the parent's ``forward``, whose ``label_and_sample_proposals`` hook then passes it
    through. The labelling is Detectron2's ``ROIHeads`` one: a parent class that overrides
    ``label_and_sample_proposals`` has its override bypassed.

    TorchScript cannot compile ``super()``: a head that is to be scripted defines
    ``_scriptable_inference(features, proposals)``, its parent's ``forward`` at inference,
    which the compiled ``forward`` calls instead.
    """

    @configurable
    def __init__(
        self,
        *,
        miner: HardExampleMiner,
        prior_correction: bool = False,
        prior_target: str = "ALL_ROIS",
        prior_per_class: bool = True,
        sampler_fg_fraction: float = 0.25,
        score_calibration: bool = False,
        **kwargs,
    ):
        """
        Args:
            miner: the hard example miner.
            prior_correction: beyond the paper (False: the paper). Count, in training, the
                classes of all labelled RoIs and of the hard sets (buffers
                ``ohem_class_counts_all`` / ``ohem_class_counts_hard``, saved with the
                model), and at inference add log(pi_all / pi_hard) to the class logits: the
                hard sets are mostly foreground, so the classifier learns a class prior far
                from the one it meets at test time, where most RoIs are background.
            prior_target: the prior of the correction (pi_all above): "ALL_ROIS", or
                "STOCK_SAMPLER", the prior of Detectron2's sampled minibatch: a share
                `sampler_fg_fraction` of foreground, the classes within it as in all RoIs.
            prior_per_class: False moves only the foreground / background split to the
                target; the foreground classes keep their proportions in the hard sets.
            sampler_fg_fraction: the stock sampler's foreground share
                (``ROI_HEADS.POSITIVE_FRACTION``).
            score_calibration: beyond the paper (False: the paper). At inference, map each
                detection's score by its class's Platt scaling (buffer
                ``ohem_score_calibration``, (K, 2) rows (a_c, b_c), saved with the model;
                the identity until fitted, see :mod:`ohem_d2.calibrate_scores`) and drop
                those under the predictor's score threshold after it.
            kwargs: the arguments of the parent ROI head.
        """
        super().__init__(**kwargs)
        self.miner = miner
        predictors = self.box_predictor
        for predictor in predictors if isinstance(predictors, nn.ModuleList) else [predictors]:
            check_box_predictor_supported(predictor)
        self.prior_correction = prior_correction
        check_settings(prior_target=prior_target)
        if prior_target == "STOCK_SAMPLER":
            check_settings(sampler_fg_fraction=sampler_fg_fraction)
        self.prior_target = prior_target
        self.prior_per_class = prior_per_class
        self.sampler_fg_fraction = sampler_fg_fraction
        self._shift_scores = True  # False inside uncorrected()
        self.score_calibration = score_calibration
        if score_calibration:
            identity = torch.tensor([[1.0, 0.0]]).repeat(self.num_classes, 1)
            self.register_buffer("ohem_score_calibration", identity)
        if prior_correction and miner.remainder_num:
            raise ValueError(
                "MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION cannot be combined with "
                "MODEL.ROI_HEADS.OHEM.REMAINDER.NUM_PER_IMAGE > 0: the weighted remainder "
                "already trains the classifier toward REMAINDER.TARGET's class make-up, not "
                "the hard sets' that the correction undoes; turn one of them off"
            )
        if prior_correction:
            if isinstance(predictors, nn.ModuleList):
                raise ValueError(
                    "MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION supports single-stage heads "
                    f"(OHEMROIHeads, OHEMRes5ROIHeads), not {type(self).__name__}"
                )
            if getattr(predictors, "use_sigmoid_ce", False):
                raise ValueError(
                    "MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION shifts softmax logits by a log "
                    "prior ratio, which does not hold for independent sigmoid scores "
                    "(MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE True); turn one of them off"
                )
            # Only with the option on, so that a paper-OHEM model's state_dict is the
            # parent head's, key for key. int64: model.to(dtype) leaves them exact.
            counts = torch.zeros(self.num_classes + 1, dtype=torch.int64)
            self.register_buffer("ohem_class_counts_all", counts)
            self.register_buffer("ohem_class_counts_hard", counts.clone())
            predictors.register_forward_hook(self._correct_class_prior)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["miner"] = HardExampleMiner(cfg)
        ret["prior_correction"] = cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION
        ret["prior_target"] = cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_TARGET
        ret["prior_per_class"] = cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_PER_CLASS
        ret["sampler_fg_fraction"] = cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION
        ret["score_calibration"] = cfg.MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION
        return ret

    def class_prior_shift(self) -> torch.Tensor:
        """(K+1,) log(pi_target / pi_hard) per class (background last), from the counts of
        training with one added to each (so that a class never mined stays finite).

        pi_target is pi_all, the prior of all labelled RoIs, for ``prior_target`` "ALL_ROIS";
        for "STOCK_SAMPLER", background 1 - f and foreground class k f * pi_all[k] / (sum of
        pi_all over the foreground), f = ``sampler_fg_fraction``. Without
        ``prior_per_class``, the target's foreground share is split between the classes as in
        the hard sets instead."""
        counts_all = self.ohem_class_counts_all.double() + 1
        counts_hard = self.ohem_class_counts_hard.double() + 1
        if counts_all.sum() == counts_all.numel():
            raise RuntimeError(
                "MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION: this model has no class counts (it "
                "was not trained with the option on, or its checkpoint lacks "
                "roi_heads.ohem_class_counts_*); train with it, or turn it off"
            )
        prior_all = counts_all / counts_all.sum()
        prior_hard = counts_hard / counts_hard.sum()
        fg_share = 1 - prior_all[-1:]
        if self.prior_target == "STOCK_SAMPLER":
            fg_share = torch.full_like(fg_share, self.sampler_fg_fraction)
        within_fg = (prior_all if self.prior_per_class else prior_hard)[:-1]
        target = torch.cat([fg_share * within_fg / within_fg.sum(), 1 - fg_share])
        return (target.log() - prior_hard.log()).float()

    @contextlib.contextmanager
    def uncorrected(self):
        """Inside the block, inference gives the scores as trained, without the prior shift
        or the score calibration:
        the paper's OHEM from a model trained with ``PRIOR_CORRECTION`` on (its training is
        the paper's), or a training-loss probe. A no-op without the option."""
        was, self._shift_scores = self._shift_scores, False
        try:
            yield self
        finally:
            self._shift_scores = was

    def _correct_class_prior(self, predictor, inputs, outputs):
        """Forward hook of the box predictor: at inference, shift the class logits."""
        if self.training or not self._shift_scores:
            return outputs
        scores, deltas = outputs
        return scores + self.class_prior_shift().to(scores), deltas

    @torch.no_grad()
    def _count_classes(self, candidates, hard):
        """Add the classes of all labelled candidates and of the hard sets to the counts, those
        of every process's images: each process adds the same sums, so the counts stay equal
        on every process, and a checkpoint (rank 0's) holds them all."""
        increments = []
        for buffer, instances in (
            (self.ohem_class_counts_all, candidates),
            (self.ohem_class_counts_hard, hard),
        ):
            labels = torch.cat([x.gt_classes for x in instances])
            labels = labels[labels >= 0]
            increments.append(torch.bincount(labels, minlength=buffer.numel()).to(buffer))
        increments = sum_over_processes(torch.stack(increments))
        self.ohem_class_counts_all += increments[0]
        self.ohem_class_counts_hard += increments[1]

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        """Detectron2's subsampling hook: here every proposal is kept (OHEM selects later)."""
        return label_without_sampling(matched_idxs, matched_labels, gt_classes, self.num_classes)

    def label_proposals(self, proposals, targets):
        """Step 1: label all proposals plus the ground-truth boxes with the head's matcher.

        Returns:
            list[Instances]: per image, all candidate RoIs with ``gt_classes`` (and the
            other ``gt_*`` fields of ``targets`` when the image has ground truth).
        """
        # Detectron2's labelling, named by its class: this head's own
        # label_and_sample_proposals (below) is the parent forward's hook, not the labelling.
        return ROIHeads.label_and_sample_proposals(self, proposals, targets)

    def label_and_sample_proposals(self, proposals, targets):
        """The parent forward's labelling hook. It receives the hard set, already labelled
        and mined by :meth:`forward` (mining needs the features, which the hook does not
        get), and passes it through."""
        return proposals

    def mine_hard_examples(self, features, proposals, targets):
        """Steps 1 and 2: label all `proposals` against `targets`; return each image's hard set."""
        candidates = self.label_proposals(proposals, targets)
        hard, _ = self.miner(
            [features[f] for f in self.in_features], candidates, readonly_head(self)
        )
        if self.prior_correction:
            self._count_classes(candidates, hard)
        return hard

    def forward(
        self,
        images: ImageList,
        features: dict[str, torch.Tensor],
        proposals: list[Instances],
        targets: list[Instances] | None = None,
    ) -> tuple[list[Instances], dict[str, torch.Tensor]]:
        """See :meth:`ROIHeads.forward`. In training, the parent trains on the hard set."""
        if self.training:
            assert targets, "'targets' argument is required during training"
            proposals = self.mine_hard_examples(features, proposals, targets)
            if _has_weights(proposals):
                with _weighted_losses(self.box_predictor):
                    return super().forward(images, features, proposals, targets)
            hard, losses = super().forward(images, features, proposals, targets)
            return hard, _global_mean(losses, ("loss_cls", "loss_box_reg"), proposals)
        if torch.jit.is_scripting():
            # A static branch: the compiler never sees the super() call below. Detectron2
            # scripts with `training` frozen to False, so it drops the mining above too.
            return self._scriptable_inference(features, proposals)
        results, losses = super().forward(images, features, proposals, targets)
        if self.score_calibration and self._shift_scores:
            results = [self._calibrate(r) for r in results]
        return results, losses

    def _calibrate(self, instances: Instances) -> Instances:
        """The detections with calibrated scores, those under the score threshold dropped."""
        predictor = self.box_predictor
        threshold = (
            predictor[-1] if isinstance(predictor, nn.ModuleList) else predictor
        ).test_score_thresh
        params = self.ohem_score_calibration.to(instances.scores)
        a, b = params[instances.pred_classes].unbind(dim=1)
        scores = torch.sigmoid(a * torch.logit(instances.scores, eps=1e-6) + b)
        keep = scores >= threshold
        instances = instances[keep]
        instances.scores = scores[keep]
        return instances

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` before compiling: refuse what cannot be scripted,
        saying why, rather than fail deep in the compiler."""
        if self.score_calibration:
            raise RuntimeError(
                "MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION: a model with this option on cannot "
                "be scripted; turn the option off to script it, or export it by tracing"
            )
        if self.prior_correction:
            raise RuntimeError(
                "MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION: a model with this option on cannot "
                "be scripted (its class prior shift is a Python forward hook on the box "
                "predictor); turn the option off to script it, or export it by tracing"
            )
        if not hasattr(self, "_scriptable_inference"):
            raise RuntimeError(
                f"{type(self).__name__} cannot be scripted: it has no "
                "_scriptable_inference (see OHEMHeadMixin; Detectron2's CascadeROIHeads "
                "cannot be scripted either); export it by tracing"
            )
        return self


@ROI_HEADS_REGISTRY.register()
class OHEMROIHeads(OHEMHeadMixin, StandardROIHeads):
    """:class:`StandardROIHeads` (VGG, C5, FPN, ... box-head models) trained with OHEM."""

    # Constants for TorchScript, as detectron2.export declares them on StandardROIHeads:
    # class annotations are not inherited, and without them the compiler reaches the mask
    # and keypoint heads a model does not have. tests/test_deploy.py pins them to the parent's.
    mask_on: torch.jit.Final[bool]
    keypoint_on: torch.jit.Final[bool]

    def _scriptable_inference(
        self, features: dict[str, torch.Tensor], proposals: list[Instances]
    ) -> tuple[list[Instances], dict[str, torch.Tensor]]:
        """:meth:`StandardROIHeads.forward` at inference, in a form TorchScript compiles."""
        instances = self._forward_box(features, proposals)
        return self.forward_with_given_boxes(features, instances), {}


@ROI_HEADS_REGISTRY.register()
class OHEMRes5ROIHeads(OHEMHeadMixin, Res5ROIHeads):
    """:class:`Res5ROIHeads` (the C4 models) trained with OHEM."""

    def _scriptable_inference(
        self, features: dict[str, torch.Tensor], proposals: list[Instances]
    ) -> tuple[list[Instances], dict[str, torch.Tensor]]:
        """:meth:`Res5ROIHeads.forward` at inference, in a form TorchScript compiles."""
        boxes = [x.proposal_boxes for x in proposals]
        box_features = self._shared_roi_transform([features[f] for f in self.in_features], boxes)
        predictions = self.box_predictor(box_features.mean(dim=[2, 3]))
        instances, _ = self.box_predictor.inference(predictions, proposals)
        return self.forward_with_given_boxes(features, instances), {}


@ROI_HEADS_REGISTRY.register()
class OHEMCascadeROIHeads(OHEMHeadMixin, CascadeROIHeads):
    """:class:`CascadeROIHeads` with OHEM at every stage.

    Stage k scores all its candidates with its own head and predictor and trains on its hard
    RoIs. The candidates of stage k+1 are all candidates of stage k, refined by stage k's
    readonly predictions and relabelled by stage k+1's matcher. Mask and keypoint heads train
    on stage 0's hard set, as Detectron2's train on its stage-0 sample.
    """

    # As in OHEMROIHeads: the constants detectron2.export declares on StandardROIHeads.
    mask_on: torch.jit.Final[bool]
    keypoint_on: torch.jit.Final[bool]

    def forward(self, images, features, proposals, targets=None):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        assert targets, "'targets' argument is required during training"
        hard, losses = self._forward_box_ohem(
            features, self.label_proposals(proposals, targets), targets
        )
        losses.update(self._forward_mask(features, hard))
        losses.update(self._forward_keypoint(features, hard))
        return hard, losses

    def _forward_box_ohem(self, features, candidates, targets):
        """Mine and train every stage.

        Args:
            features: dict of (N, C, H, W) feature maps.
            candidates: N Instances, all proposals labelled by :meth:`label_proposals`.
            targets: N Instances of ground truth.

        Returns:
            list[Instances]: stage 0's hard RoIs.
            dict[str, Tensor]: the box losses of every stage, ``loss_*_stage{k}``.
        """
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in candidates]
        storage = get_event_storage()
        losses, first_stage_hard = {}, None
        for k in range(self.num_cascade_stages):
            predictor = self.box_predictor[k]
            with storage.name_scope(f"stage{k}"):
                hard, readonly_predictions = self.miner(
                    features, candidates, readonly_head(self, k)
                )
                predictions = self._run_stage(features, hard, k)
                if _has_weights(hard):
                    stage_losses = weighted_box_losses(predictor, predictions, hard)
                else:
                    stage_losses = predictor.losses(predictions, hard)
                    stage_losses = _global_mean(stage_losses, ("loss_cls", "loss_box_reg"), hard)
            losses.update({f"{name}_stage{k}": v for name, v in stage_losses.items()})
            if k == 0:
                first_stage_hard = hard
            if k + 1 < self.num_cascade_stages:
                # All candidates move on, refined by the readonly predictions; the boxes are
                # detached, clipped and the empty ones dropped, as in Detectron2's cascade.
                refined_boxes = predictor.predict_boxes(readonly_predictions, candidates)
                candidates = self._create_proposals_from_boxes(refined_boxes, image_sizes)
                candidates = self._match_and_label_boxes(candidates, k + 1, targets)
        return first_stage_hard, losses


def _global_mean(losses, keys, hard):
    """The box losses as means over the hard RoIs of every process, not of this one's.

    Detectron2's losses are means over a process's RoIs, and DDP averages them over the
    processes: with hard sets of unequal sizes (the NMS can leave fewer than
    BATCH_SIZE_PER_IMAGE), N processes would then train otherwise than one process on the
    same images. Scaling each process's mean by its share of the RoIs makes DDP's average the
    mean over all of them. A no-op in a single process.
    """
    if comm.get_world_size() == 1:
        return losses
    count = sum(len(h) for h in hard)
    device = next(iter(losses.values())).device
    total = float(sum_over_processes(torch.tensor([float(count)], device=device)))
    if total == 0:
        return losses
    scale = count * comm.get_world_size() / total
    return {k: v * scale if k in keys else v for k, v in losses.items()}


def _has_weights(instances) -> bool:
    """Whether the mined RoIs carry the weights of the remainder (REMAINDER.NUM_PER_IMAGE)."""
    return len(instances) > 0 and instances[0].has("ohem_weight")


@contextlib.contextmanager
def _weighted_losses(box_predictor):
    """Inside the block, the box predictor's ``losses`` weigh each RoI by its
    ``ohem_weight`` (:func:`weighted_box_losses`): the parent head's forward calls
    ``box_predictor.losses`` itself, so this is where the weights can enter."""
    saved = vars(box_predictor).get("losses")  # an instance's own, if someone set one
    box_predictor.losses = functools.partial(weighted_box_losses, box_predictor)
    try:
        yield
    finally:
        if saved is None:
            del box_predictor.losses
        else:
            box_predictor.losses = saved


def scores_as_trained(model):
    """A context in which `model` (or its DDP wrapper) scores as trained: an OHEM head's
    inference-time prior correction and score calibration are off inside it; a no-op for any
    other head."""
    head = unwrap_ddp(model).roi_heads
    return getattr(head, "uncorrected", contextlib.nullcontext)()
