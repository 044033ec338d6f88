"""The three OHEM ROI heads, built from a Detectron2 cfg on small hand-built features."""

import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import (
    CascadeROIHeads,
    Res5ROIHeads,
    StandardROIHeads,
    build_roi_heads,
)
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from helpers import DEVICE, on_device

from ohem_d2.config import add_ohem_config
from ohem_d2.modeling.ohem import (
    HardExampleMiner,
    OHEMCascadeROIHeads,
    OHEMRes5ROIHeads,
    OHEMROIHeads,
)

K = 3  # foreground classes
IMAGE_SIZE = (128, 160)
HEADS = ["OHEMROIHeads", "OHEMRes5ROIHeads", "OHEMCascadeROIHeads"]
PARENTS = {
    "OHEMROIHeads": "StandardROIHeads",
    "OHEMRes5ROIHeads": "Res5ROIHeads",
    "OHEMCascadeROIHeads": "CascadeROIHeads",
}
OHEM_KEYS = ["num_candidates", "num_after_nms", "fg_fraction", "mean_loss_all", "mean_loss_hard"]


def _channels(name):
    return 32 if "Res5" in name else 8


def _cfg(name, mask_on=False):
    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.MODEL.DEVICE = DEVICE
    cfg.MODEL.MASK_ON = mask_on
    cfg.MODEL.ROI_HEADS.NAME = name
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 6
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 4
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 2
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = "Cascade" in name
    # Res5 head: 32 input channels, 64 output channels.
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 4
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlignV2"
    return cfg


def _build(cfg):
    torch.manual_seed(0)
    name = cfg.MODEL.ROI_HEADS.NAME
    head = build_roi_heads(cfg, {"res4": ShapeSpec(channels=_channels(name), stride=16)})
    return head.to(DEVICE).train()


def _batch(name, seed=0, num_proposals=30, image_without_gt=False):
    """Features (2, C, 8, 10) at stride 16, random proposals and 2-3 objects per image, drawn
    on the CPU and put on DEVICE (the features a leaf that requires grad)."""
    g = torch.Generator().manual_seed(seed)
    res4 = torch.randn(2, _channels(name), 8, 10, generator=g)
    features = {"res4": res4.to(DEVICE).requires_grad_()}
    gt = [
        torch.tensor([[10.0, 10.0, 50.0, 60.0], [70.0, 40.0, 130.0, 110.0]]),
        torch.tensor([[20.0, 30.0, 90.0, 100.0], [100.0, 5.0, 150.0, 50.0], [5, 70, 40, 120]]),
    ]
    proposals, targets = [], []
    for i, gt_boxes in enumerate(gt):
        # Half jittered around the objects (foreground), half anywhere (mostly background).
        near = gt_boxes[torch.randint(len(gt_boxes), (num_proposals // 2,), generator=g)]
        near = near + torch.randn(near.shape, generator=g) * 6
        xy = torch.rand(num_proposals - len(near), 2, generator=g) * 120
        far = torch.cat([xy, xy + torch.rand(len(xy), 2, generator=g) * 40 + 6], dim=1)
        p = Instances(IMAGE_SIZE)
        p.proposal_boxes = Boxes(torch.cat([near, far]))
        p.proposal_boxes.clip(IMAGE_SIZE)
        p.objectness_logits = torch.zeros(num_proposals)
        t = Instances(IMAGE_SIZE)
        if image_without_gt and i == 1:
            gt_boxes = gt_boxes[:0]
        t.gt_boxes = Boxes(gt_boxes)
        t.gt_classes = torch.arange(len(gt_boxes)) % K
        t.gt_masks = PolygonMasks([[b[[0, 1, 2, 1, 2, 3, 0, 3]].numpy()] for b in gt_boxes])
        proposals.append(p)
        targets.append(t)
    return features, on_device(proposals), on_device(targets)


def _train_step(head, features, proposals, targets, start_iter=0):
    with EventStorage(start_iter) as storage:
        hard, losses = head(None, features, proposals, targets)
        sum(losses.values()).backward()
        scalars = {k: v[0] for k, v in storage.latest().items()}
    return hard, losses, scalars


def _spy_on_losses(monkeypatch, head):
    """Record the proposals that the (first-stage) box predictor's losses() is called with."""
    predictor = head.box_predictor[0] if isinstance(head, CascadeROIHeads) else head.box_predictor
    calls = []
    original = predictor.losses

    def losses(predictions, proposals):
        calls.append(proposals)
        return original(predictions, proposals)

    monkeypatch.setattr(predictor, "losses", losses)
    return calls


@pytest.mark.parametrize("name", HEADS)
def test_heads_build_from_cfg_and_train(name, monkeypatch):
    head = _build(_cfg(name))
    assert type(head).__name__ == name
    parent = {"OHEMROIHeads": StandardROIHeads, "OHEMRes5ROIHeads": Res5ROIHeads}
    assert isinstance(head, parent.get(name, CascadeROIHeads))
    trained_on = _spy_on_losses(monkeypatch, head)
    _, losses, scalars = _train_step(head, *_batch(name))
    assert losses and all(torch.isfinite(v) for v in losses.values())
    (hard,) = trained_on
    assert [len(h) for h in hard] == [6, 6]
    for p in head.parameters():
        if p.requires_grad:
            assert p.grad is not None
    prefixes = [f"stage{k}/" for k in range(3)] if "Cascade" in name else [""]
    for prefix in prefixes:
        for key in OHEM_KEYS:
            assert f"{prefix}ohem/{key}" in scalars
    if "Cascade" in name:
        assert {f"loss_cls_stage{k}" for k in range(3)} <= set(losses)


@pytest.mark.parametrize("name", HEADS)
def test_equivalence_with_detectron2_head_without_nms_and_subsampling(name):
    cfg = _cfg(name)
    cfg.MODEL.ROI_HEADS.OHEM.NMS_THRESH = 1.0
    cfg.MODEL.ROI_HEADS.OHEM.READONLY_TRAIN_MODE = False
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 1000  # > proposals + ground truth
    ref_cfg = cfg.clone()
    ref_cfg.MODEL.ROI_HEADS.NAME = PARENTS[name]
    ref_cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 1.0  # Detectron2 then samples everything
    head, ref = _build(cfg), _build(ref_cfg)
    ref.load_state_dict(head.state_dict())

    _, losses, _ = _train_step(head, *_batch(name, image_without_gt=True))
    features, proposals, targets = _batch(name, image_without_gt=True)
    _, ref_losses, _ = _train_step(ref, features, proposals, targets)

    assert set(losses) == set(ref_losses)
    for key in losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=0, atol=1e-5)
    assert ref_losses.get("loss_box_reg", ref_losses.get("loss_box_reg_stage0")) > 0
    for (pname, p), q in zip(head.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=pname)


def test_gradients_come_from_the_hard_rois_only():
    name = "OHEMROIHeads"
    head = _build(_cfg(name))
    ref = copy.deepcopy(head)
    grad_enabled_calls = []
    head.box_head.register_forward_hook(
        lambda m, inputs, out: (
            grad_enabled_calls.append(len(inputs[0])) if torch.is_grad_enabled() else None
        )
    )
    features, proposals, targets = _batch(name)
    hard, losses, scalars = _train_step(head, features, proposals, targets)
    assert scalars["ohem/num_candidates"] > 2 * len(hard[0])  # mining did drop RoIs
    # Autograd saw one forward of the box head: on the hard RoIs, nothing else.
    assert grad_enabled_calls == [sum(len(h) for h in hard)]

    # Independent reference: Detectron2's losses on the hard RoIs alone, same weights/inputs.
    ref_features = features["res4"].detach().clone().requires_grad_()
    with EventStorage():
        box_features = ref.box_pooler([ref_features], [h.proposal_boxes for h in hard])
        predictions = ref.box_predictor(ref.box_head(box_features))
        ref_losses = ref.box_predictor.losses(predictions, hard)
        sum(ref_losses.values()).backward()
    for key in losses:
        torch.testing.assert_close(losses[key], ref_losses[key])
    torch.testing.assert_close(features["res4"].grad, ref_features.grad)
    for (pname, p), q in zip(head.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=pname)


@pytest.mark.parametrize("name", ["OHEMRes5ROIHeads", "OHEMCascadeROIHeads"])
def test_autograd_sees_only_the_hard_rois(name, monkeypatch):
    head = _build(_cfg(name))
    trained_on = _spy_on_losses(monkeypatch, head)
    stage_heads = head.box_head if "Cascade" in name else [head.res5]
    grad_enabled_calls = {k: [] for k in range(len(stage_heads))}
    for k, module in enumerate(stage_heads):
        module.register_forward_hook(
            lambda m, inputs, out, k=k: (
                grad_enabled_calls[k].append(len(inputs[0])) if torch.is_grad_enabled() else None
            )
        )
    _, _, scalars = _train_step(head, *_batch(name))
    (hard,) = trained_on
    assert grad_enabled_calls[0] == [sum(len(h) for h in hard)] == [12]
    assert all(calls == [12] for calls in grad_enabled_calls.values())
    assert all(v > 12 for k, v in scalars.items() if k.endswith("ohem/num_candidates"))


@pytest.mark.parametrize("name", ["OHEMROIHeads", "OHEMCascadeROIHeads"])
def test_readonly_chunk_size_does_not_change_the_result(name, monkeypatch):
    results = []
    for chunk_size in (0, 7, 512):
        cfg = _cfg(name)
        cfg.MODEL.ROI_HEADS.OHEM.READONLY_CHUNK_SIZE = chunk_size
        head = _build(cfg)
        trained_on = _spy_on_losses(monkeypatch, head)
        _, losses, scalars = _train_step(head, *_batch(name))
        results.append((trained_on[0], losses, scalars))
    (ref_hard, ref_losses, ref_scalars) = results[0]
    for hard, losses, scalars in results[1:]:
        for h, r in zip(hard, ref_hard):
            assert torch.equal(h.proposal_boxes.tensor, r.proposal_boxes.tensor)
            assert torch.equal(h.gt_classes, r.gt_classes)
        for key in losses:
            torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-5, atol=1e-6)
        assert scalars.keys() == ref_scalars.keys()
        for key in scalars:
            assert scalars[key] == pytest.approx(ref_scalars[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("name", HEADS)
def test_non_finite_readonly_loss_raises_naming_the_iteration(name):
    head = _build(_cfg(name))
    features, proposals, targets = _batch(name)
    with torch.no_grad():
        features["res4"][1, :, 2:5, 2:5] = float("nan")
    with pytest.raises(FloatingPointError, match="iteration 123"):
        _train_step(head, features, proposals, targets, start_iter=123)


def test_diagnostics_describe_the_mining():
    name = "OHEMROIHeads"
    head = _build(_cfg(name))
    features, proposals, targets = _batch(name)
    hard, losses, scalars = _train_step(head, features, proposals, targets)
    num_candidates = sum(len(p) + len(t) for p, t in zip(proposals, targets)) / 2
    assert scalars["ohem/num_candidates"] == num_candidates
    assert len(hard[0]) <= scalars["ohem/num_after_nms"] < num_candidates
    fg = sum(int((h.gt_classes < K).sum()) for h in hard)
    assert scalars["ohem/fg_fraction"] == pytest.approx(fg / sum(len(h) for h in hard))
    # The readonly pass (no dropout here) agrees with the trainable one on the hard set.
    total = float(losses["loss_cls"] + losses["loss_box_reg"])
    assert scalars["ohem/mean_loss_hard"] == pytest.approx(total, rel=1e-5)
    assert scalars["ohem/mean_loss_hard"] > scalars["ohem/mean_loss_all"]


@pytest.mark.parametrize("name", HEADS)
def test_mask_head_trains_on_the_foreground_of_the_hard_set(name, monkeypatch):
    head = _build(_cfg(name, mask_on=True))
    trained_on = _spy_on_losses(monkeypatch, head)
    mask_inputs = []
    head.mask_head.register_forward_pre_hook(lambda m, args: mask_inputs.append(args[1]))
    _, losses, _ = _train_step(head, *_batch(name))
    assert torch.isfinite(losses["loss_mask"])
    (hard,) = trained_on
    (mask_instances,) = mask_inputs
    for h, m in zip(hard, mask_instances):
        fg = h[h.gt_classes < K]
        assert len(fg) > 0
        assert torch.equal(m.proposal_boxes.tensor, fg.proposal_boxes.tensor)


@pytest.mark.parametrize("name", HEADS)
def test_images_without_annotations_train_on_hardest_background(name, monkeypatch):
    """DATALOADER.FILTER_EMPTY_ANNOTATIONS False: an image with no ground truth has only
    background candidates; the hard set is its hardest background RoIs (no box or mask
    loss from it), and a batch of two such images trains without error."""
    cfg = _cfg(name, mask_on=True)
    cfg.MODEL.ROI_HEADS.OHEM.NMS_THRESH = 1.0  # so that the top-6 can be checked by hand
    cfg.MODEL.ROI_HEADS.OHEM.READONLY_TRAIN_MODE = False
    head = _build(cfg)
    trained_on = _spy_on_losses(monkeypatch, head)
    features, proposals, targets = _batch(name)
    targets = [t[:0] for t in targets]  # the same fields, no instance
    # The readonly scores of every RoI, to find the hardest background by hand.
    predictor = head.box_predictor[0] if "Cascade" in name else head.box_predictor
    scores = []
    predictor.register_forward_hook(lambda m, i, out: scores.append(out[0].detach()))
    _, losses, scalars = _train_step(head, features, proposals, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses.get("loss_box_reg", losses.get("loss_box_reg_stage0")).detach()) == 0
    assert float(losses["loss_mask"].detach()) == 0
    (hard,) = trained_on
    assert scalars[("stage0/" if "Cascade" in name else "") + "ohem/fg_fraction"] == 0.0
    readonly = torch.cat(scores[:2]) if len(scores[0]) == 30 else scores[0]
    for i, h in enumerate(hard):
        assert (h.gt_classes == K).all() and len(h) == 6
        background_loss = -torch.log_softmax(readonly[30 * i : 30 * (i + 1)], dim=1)[:, K]
        expected = proposals[i].proposal_boxes.tensor[background_loss.argsort(descending=True)[:6]]
        assert torch.equal(h.proposal_boxes.tensor, expected)


def test_positive_fraction_and_ignored_rois_from_cfg(monkeypatch):
    name = "OHEMROIHeads"
    cfg = _cfg(name)
    cfg.MODEL.ROI_HEADS.OHEM.POSITIVE_FRACTION = 0.34  # at most 2 of 6 foreground
    cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS = [0.1, 0.5]  # bg_lo 0.1: IoU < 0.1 is ignored
    cfg.MODEL.ROI_HEADS.IOU_LABELS = [-1, 0, 1]
    head = _build(cfg)
    trained_on = _spy_on_losses(monkeypatch, head)
    features, proposals, targets = _batch(name)
    _, _, scalars = _train_step(head, features, proposals, targets)
    (hard,) = trained_on
    for h in hard:
        assert (h.gt_classes >= 0).all()
        assert int((h.gt_classes < K).sum()) == 2 and len(h) == 6
    total = sum(len(p) + len(t) for p, t in zip(proposals, targets)) / 2
    assert scalars["ohem/num_candidates"] < total


@pytest.mark.parametrize("name", HEADS)
def test_inference_is_the_parents(name):
    cfg = _cfg(name)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    ref_cfg = cfg.clone()
    ref_cfg.MODEL.ROI_HEADS.NAME = PARENTS[name]
    head, ref = _build(cfg).eval(), _build(ref_cfg).eval()
    ref.load_state_dict(head.state_dict())
    features, proposals, _ = _batch(name)
    with torch.no_grad():
        out, _ = head(None, features, proposals)
        ref_out, _ = ref(None, features, proposals)
    assert len(out[0]) > 0
    for a, b in zip(out, ref_out):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)


def test_explicit_construction_without_cfg_for_lazy_config_users():
    """The heads are @configurable: built objects as keyword arguments also work."""
    cfg = _cfg("StandardROIHeads")
    kwargs = StandardROIHeads.from_config(cfg, {"res4": ShapeSpec(channels=8, stride=16)})
    miner = HardExampleMiner(batch_size_per_image=4, nms_thresh=0.5, readonly_chunk_size=5)
    head = OHEMROIHeads(miner=miner, **kwargs).to(DEVICE).train()
    hard, losses, _ = _train_step(head, *_batch("OHEMROIHeads"))
    assert [len(h) for h in hard] == [4, 4]
    assert torch.isfinite(sum(losses.values()))
    from_cfg = HardExampleMiner(_cfg("OHEMROIHeads"))
    assert (from_cfg.batch_size_per_image, from_cfg.nms_thresh, from_cfg.nms_per_label) == (
        6,
        0.7,
        True,
    )
    assert from_cfg.scorer.chunk_size == 1024 and from_cfg.scorer.train_mode


def test_unsupported_settings_fail_at_build_time():
    cfg = _cfg("OHEMROIHeads")
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "diou"
    with pytest.raises(ValueError, match="box regression"):
        _build(cfg)
    cfg = _cfg("OHEMRes5ROIHeads")
    cfg.MODEL.ROI_HEADS.OHEM.POSITIVE_FRACTION = 0.0
    with pytest.raises(ValueError, match="positive_fraction"):
        _build(cfg)
    assert OHEMRes5ROIHeads and OHEMCascadeROIHeads  # exported names
