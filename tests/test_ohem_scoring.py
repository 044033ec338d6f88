"""Per-RoI losses against FastRCNNOutputLayers.losses(), and the readonly pass."""

import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import DEVICE, on_device
from torch import nn

from ohem_d2.modeling.ohem import (
    ReadonlyScorer,
    check_box_predictor_supported,
    per_roi_losses,
    readonly_mode,
)

K = 3  # foreground classes
IMAGE_SIZE = (96, 128)


def _predictor(**kwargs):
    torch.manual_seed(0)
    predictor = FastRCNNOutputLayers(
        ShapeSpec(channels=6),
        box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=K,
        **kwargs,
    )
    # Larger weights than the default init, so that every loss term matters.
    for p in predictor.parameters():
        nn.init.normal_(p, std=0.3)
    return predictor.to(DEVICE)


def _random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 60
    wh = torch.rand(n, 2, generator=generator) * 30 + 4
    return torch.cat([xy, xy + wh], dim=1)


def _labelled_proposals(generator, sizes=(9, 5, 7), with_gt=(True, False, True)):
    """Labelled RoIs as label_proposals makes them, on DEVICE; the second image has no
    ground truth."""
    proposals = []
    for n, has_gt in zip(sizes, with_gt):
        p = Instances(IMAGE_SIZE)
        p.proposal_boxes = Boxes(_random_boxes(n, generator))
        if has_gt:
            p.gt_classes = torch.randint(0, K + 1, (n,), generator=generator)
            p.gt_boxes = Boxes(p.proposal_boxes.tensor + torch.randn(n, 4, generator=generator))
        else:
            p.gt_classes = torch.full((n,), K)
        proposals.append(p)
    return on_device(proposals)


LOSS_SETTINGS = [
    {},
    {"smooth_l1_beta": 0.5},
    {"box_reg_loss_type": "giou"},
    {"cls_agnostic_bbox_reg": True},
    {"cls_agnostic_bbox_reg": True, "box_reg_loss_type": "giou"},
    {"loss_weight": {"loss_cls": 0.7, "loss_box_reg": 2.5}},
    {"loss_weight": 0.5},
    {"use_sigmoid_ce": True},
]


@pytest.mark.parametrize("settings", LOSS_SETTINGS, ids=str)
def test_mean_per_roi_loss_equals_detectron2_losses(settings):
    predictor = _predictor(**settings)
    g = torch.Generator().manual_seed(1)
    proposals = _labelled_proposals(g)
    predictions = predictor(torch.randn(sum(len(p) for p in proposals), 6, generator=g).to(DEVICE))
    with EventStorage():
        expected = predictor.losses(predictions, proposals)
        per_roi = per_roi_losses(predictor, predictions, proposals)
        per_roi_cls = per_roi_losses(predictor, predictions, proposals, hardness="cls")
        # Any subset, e.g. a hard set, has the same property.
        subset = [p[: len(p) // 2 + 1] for p in proposals]
        sub_predictions = predictor(
            torch.randn(
                sum(len(p) for p in subset), 6, generator=torch.Generator().manual_seed(2)
            ).to(DEVICE)
        )
        expected_sub = predictor.losses(sub_predictions, subset)
        per_roi_sub = per_roi_losses(predictor, sub_predictions, subset)
    assert per_roi.shape == (sum(len(p) for p in proposals),)
    assert expected["loss_box_reg"] > 0
    total = expected["loss_cls"] + expected["loss_box_reg"]
    torch.testing.assert_close(per_roi.mean(), total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_roi_cls.mean(), expected["loss_cls"], rtol=1e-5, atol=1e-6)
    total_sub = expected_sub["loss_cls"] + expected_sub["loss_box_reg"]
    torch.testing.assert_close(per_roi_sub.mean(), total_sub, rtol=1e-5, atol=1e-6)
    assert not per_roi.requires_grad


def test_per_roi_loss_by_hand():
    """One foreground and one background RoI, the paper's loss written out."""
    predictor = _predictor(smooth_l1_beta=1.0)
    p = Instances(IMAGE_SIZE)
    p.proposal_boxes = Boxes(torch.tensor([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 8.0, 8.0]]))
    p.gt_boxes = Boxes(torch.tensor([[12.0, 8.0, 34.0, 50.0], [0.0, 0.0, 8.0, 8.0]]))
    p.gt_classes = torch.tensor([1, K])
    logits = torch.tensor([[0.2, 1.5, -0.3, 0.1], [0.0, 0.4, 0.3, 2.0]])
    deltas = torch.zeros(2, 4 * K)
    deltas[0, 4:8] = torch.tensor([0.1, -0.2, 0.3, 0.05])  # class 1's deltas
    # Targets, by the Fast R-CNN parameterisation with weights (10, 10, 5, 5).
    px, py, pw, ph = 20.0, 30.0, 20.0, 40.0
    gx, gy, gw, gh = 23.0, 29.0, 22.0, 42.0
    targets = [
        10 * (gx - px) / pw,
        10 * (gy - py) / ph,
        5 * math.log(gw / pw),
        5 * math.log(gh / ph),
    ]

    def smooth_l1(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    box = sum(smooth_l1(d - t) for d, t in zip([0.1, -0.2, 0.3, 0.05], targets))
    ce = [
        -math.log(math.exp(row[label]) / sum(math.exp(v) for v in row))
        for row, label in zip(logits.tolist(), [1, K])
    ]
    got = per_roi_losses(predictor, on_device((logits, deltas)), [on_device(p)])
    torch.testing.assert_close(got.cpu(), torch.tensor([ce[0] + box, ce[1]]), rtol=1e-5, atol=1e-6)


def test_ignored_rois_score_zero_and_do_not_change_the_others():
    predictor = _predictor()
    g = torch.Generator().manual_seed(3)
    (p,) = _labelled_proposals(g, sizes=(6,), with_gt=(True,))
    predictions = predictor(torch.randn(6, 6, generator=g).to(DEVICE))
    before = per_roi_losses(predictor, predictions, [p])
    p.gt_classes[2] = -1
    after = per_roi_losses(predictor, predictions, [p])
    assert after[2] == 0
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(after[keep], before[keep])


def test_unsupported_settings_raise_value_error():
    for bad in [{"box_reg_loss_type": "diou"}, {"box_reg_loss_type": "ciou"}]:
        predictor = _predictor(**bad)
        with pytest.raises(ValueError, match="box regression"):
            check_box_predictor_supported(predictor)
        g = torch.Generator().manual_seed(0)
        proposals = _labelled_proposals(g)
        predictions = predictor(torch.randn(21, 6).to(DEVICE))
        with pytest.raises(ValueError):
            per_roi_losses(predictor, predictions, proposals)
    fed = _predictor()
    fed.use_fed_loss = True
    with pytest.raises(ValueError, match="federated"):
        check_box_predictor_supported(fed)
    with pytest.raises(ValueError, match="hardness"):
        ReadonlyScorer(hardness="box")


class _TinyBoxHead(nn.Module):
    """pooler -> FastRCNNConvFCHead (+ optional dropout / batch norm) -> predictor."""

    def __init__(self, dropout=0.0, batch_norm=False):
        super().__init__()
        torch.manual_seed(0)
        self.pooler = ROIPooler(4, scales=(1.0 / 8,), sampling_ratio=2, pooler_type="ROIAlignV2")
        self.head = FastRCNNConvFCHead(
            ShapeSpec(channels=5, height=4, width=4), conv_dims=[], fc_dims=[12, 6]
        )
        self.extra = nn.Sequential(
            nn.BatchNorm1d(6) if batch_norm else nn.Identity(), nn.Dropout(dropout)
        )
        self.predictor = _predictor()
        self.to(DEVICE)

    def forward(self, features, boxes):
        return self.predictor(self.extra(self.head(self.pooler(features, boxes))))


def _score(model, features, proposals, **scorer_kwargs):
    scorer = ReadonlyScorer(**scorer_kwargs)
    return scorer(
        features,
        proposals,
        box_forward=model,
        box_predictor=model.predictor,
        readonly_modules=[model.head, model.extra, model.predictor],
    )


def _features_and_proposals(sizes=(40, 1, 23)):
    g = torch.Generator().manual_seed(4)
    features = torch.randn(len(sizes), 5, 12, 16, generator=g)
    features = [features.to(DEVICE).requires_grad_()]  # a leaf that requires grad
    return features, _labelled_proposals(g, sizes=sizes, with_gt=(True,) * len(sizes))


def test_chunk_size_does_not_change_the_losses():
    model = _TinyBoxHead().train()
    features, proposals = _features_and_proposals()
    results = [_score(model, features, proposals, chunk_size=c) for c in (0, 7, 512)]
    reference_losses, reference_predictions = results[0]
    assert [len(x) for x in reference_losses] == [40, 1, 23]
    for losses, predictions in results[1:]:
        for a, b in zip(losses, reference_losses):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(predictions, reference_predictions):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The readonly pass builds no graph, although the features require grad.
    assert not any(x.requires_grad for x in reference_losses + list(reference_predictions))


def test_readonly_pass_equals_a_plain_forward_of_each_image():
    model = _TinyBoxHead().eval()
    features, proposals = _features_and_proposals()
    losses, _ = _score(model, features, proposals, chunk_size=7, train_mode=False)
    with torch.no_grad(), EventStorage():
        for i, p in enumerate(proposals):
            predictions = model([features[0][i : i + 1]], [p.proposal_boxes])
            expected = model.predictor.losses(predictions, [p])
            torch.testing.assert_close(losses[i].mean(), sum(expected.values()), rtol=1e-5, atol=0)


def test_image_without_rois():
    model = _TinyBoxHead()
    features, proposals = _features_and_proposals(sizes=(5, 0))
    losses, (scores, deltas) = _score(model, features, proposals, chunk_size=2)
    assert [len(x) for x in losses] == [5, 0]
    assert scores.shape == (5, K + 1) and deltas.shape == (5, 4 * K)


def test_train_mode_runs_dropout_and_eval_mode_is_deterministic():
    model = _TinyBoxHead(dropout=0.5).train()
    features, proposals = _features_and_proposals()
    torch.manual_seed(0)
    a, _ = _score(model, features, proposals, train_mode=True)
    b, _ = _score(model, features, proposals, train_mode=True)
    assert not torch.equal(torch.cat(a), torch.cat(b))
    c, _ = _score(model, features, proposals, train_mode=False)
    d, _ = _score(model, features, proposals, train_mode=False)
    assert torch.equal(torch.cat(c), torch.cat(d))
    assert model.training and all(m.training for m in model.modules())


def test_batch_norm_uses_running_statistics_and_is_left_unchanged():
    model = _TinyBoxHead(batch_norm=True).train()
    bn = model.extra[0]
    bn.running_mean.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    features, proposals = _features_and_proposals()
    results = [_score(model, features, proposals, chunk_size=c)[0] for c in (0, 7)]
    torch.testing.assert_close(torch.cat(results[0]), torch.cat(results[1]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert bn.training


def test_readonly_mode_restores_modes_on_error():
    model = _TinyBoxHead(dropout=0.5).train()
    model.head.eval()  # a submodule deliberately in eval mode stays so
    modes = {name: m.training for name, m in model.named_modules()}
    with pytest.raises(RuntimeError), readonly_mode([model], train_mode=False):
        assert not any(m.training for m in model.modules())
        raise RuntimeError
    with readonly_mode([model], train_mode=True):
        assert model.extra[1].training and not model.head.training
    assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_naming_the_iteration(bad):
    model = _TinyBoxHead()
    features, proposals = _features_and_proposals()
    with torch.no_grad():
        model.predictor.cls_score.bias[1] = bad
    with EventStorage(start_iter=41), pytest.raises(FloatingPointError, match="iteration 41"):
        _score(model, features, proposals)
