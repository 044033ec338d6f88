"""MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION: class counts in training, the logit shift at
inference, checked against hand arithmetic and a stock head with the shift in its bias."""

import copy
import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from helpers import DEVICE
from test_ohem_roi_heads import _batch, _build, _cfg, _train_step

NAME = "OHEMROIHeads"


def _head(prior_correction=True, name=NAME, **opts):
    cfg = _cfg(name)
    cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION = prior_correction
    for key, value in opts.items():
        cfg.MODEL.ROI_HEADS.OHEM[key] = value
    return _build(cfg)


def _set_counts(head):
    # K = 3 and background; with one added to each count:
    #   all  = (10, 20, 30, 940) / 1000 = (0.01, 0.02, 0.03, 0.94)
    #   hard = (40, 20, 10, 30) / 100   = (0.4, 0.2, 0.1, 0.3)
    head.ohem_class_counts_all.copy_(torch.tensor([9, 19, 29, 939]))
    head.ohem_class_counts_hard.copy_(torch.tensor([39, 19, 9, 29]))


def test_shift_is_log_prior_ratio_by_hand():
    head = _head()
    _set_counts(head)
    expected = [math.log(0.01 / 0.4), math.log(0.02 / 0.2), math.log(0.03 / 0.1)]
    expected.append(math.log(0.94 / 0.3))
    torch.testing.assert_close(head.class_prior_shift().cpu(), torch.tensor(expected))


@pytest.mark.parametrize(
    "target, per_class, expected",
    [
        # The foreground share of all RoIs (0.06), each class as in all RoIs.
        ("ALL_ROIS", True, [0.01, 0.02, 0.03, 0.94]),
        # The foreground share of all RoIs, split as in the hard sets (4 : 2 : 1).
        ("ALL_ROIS", False, [0.06 * 4 / 7, 0.06 * 2 / 7, 0.06 * 1 / 7, 0.94]),
        # The stock sampler's 25 % foreground (ROI_HEADS.POSITIVE_FRACTION), split as in
        # all RoIs (1 : 2 : 3), or as in the hard sets.
        ("STOCK_SAMPLER", True, [0.25 / 6, 0.25 * 2 / 6, 0.25 * 3 / 6, 0.75]),
        ("STOCK_SAMPLER", False, [0.25 * 4 / 7, 0.25 * 2 / 7, 0.25 * 1 / 7, 0.75]),
    ],
)
def test_shift_to_each_target_by_hand(target, per_class, expected):
    head = _head(PRIOR_CORRECTION_TARGET=target, PRIOR_CORRECTION_PER_CLASS=per_class)
    _set_counts(head)
    hard = [0.4, 0.2, 0.1, 0.3]
    shift = [math.log(t / h) for t, h in zip(expected, hard)]
    torch.testing.assert_close(head.class_prior_shift().cpu(), torch.tensor(shift))
    if not per_class:  # the foreground classes all move by the same amount
        assert len({round(x, 5) for x in head.class_prior_shift()[:-1].tolist()}) == 1


def test_unknown_target_refused():
    with pytest.raises(ValueError, match="PRIOR_CORRECTION_TARGET"):
        _head(PRIOR_CORRECTION_TARGET="ALL")


def test_inference_equals_stock_head_with_shift_in_bias():
    head = _head()
    _set_counts(head)
    head.eval()
    cfg = _cfg(NAME)
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    stock = build_roi_heads(cfg, {"res4": ShapeSpec(channels=8, stride=16)}).to(DEVICE).eval()
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("ohem_class")}
    stock.load_state_dict(state)
    with torch.no_grad():
        stock.box_predictor.cls_score.bias += head.class_prior_shift()
        features, proposals, _ = _batch(NAME)
        out, _ = head(None, features, proposals)
        ref, _ = stock(None, features, proposals)
    assert sum(len(x) for x in ref) > 0
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.scores, b.scores)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.pred_classes, b.pred_classes)


def test_training_is_unchanged_and_counts_what_was_mined():
    heads = [_head(True), _head(False)]
    records = []
    for head in heads:
        opt = torch.optim.SGD(head.parameters(), lr=0.1)
        hard_sets, losses = [], []
        for step in range(2):
            torch.manual_seed(step)  # same dropout draws for both heads
            hard, loss, _ = _train_step(head, *_batch(NAME, seed=step), start_iter=step)
            opt.step()
            opt.zero_grad()
            hard_sets += hard
            losses.append({k: v.item() for k, v in loss.items()})
        records.append((hard_sets, losses))
    assert records[0][1] == records[1][1]
    for p, q in zip(heads[0].parameters(), heads[1].parameters()):
        assert torch.equal(p, q)
    hard_labels = torch.cat([h.gt_classes for h in records[0][0]])
    assert heads[0].ohem_class_counts_hard.tolist() == [
        int((hard_labels == k).sum()) for k in range(4)
    ]
    # Every labelled candidate is counted once: 30 proposals + the ground truth per image.
    assert int(heads[0].ohem_class_counts_all.sum()) == 2 * (60 + 2 + 3)
    assert int(heads[0].ohem_class_counts_all[3]) > int(heads[0].ohem_class_counts_hard[3])


def test_paper_head_state_dict_is_the_parents():
    cfg = _cfg(NAME)
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    stock = build_roi_heads(cfg, {"res4": ShapeSpec(channels=8, stride=16)})
    assert set(_head(False).state_dict()) == set(stock.state_dict())
    extra = set(_head(True).state_dict()) - set(stock.state_dict())
    assert extra == {"ohem_class_counts_all", "ohem_class_counts_hard"}


def test_without_counts_inference_refuses():
    head = _head().eval()
    features, proposals, _ = _batch(NAME)
    with pytest.raises(RuntimeError, match="no class counts"):
        head(None, features, proposals)


def test_counts_survive_deepcopy_and_cascade_refuses():
    head = _head()
    _set_counts(head)
    clone = copy.deepcopy(head).eval()
    clone.ohem_class_counts_hard.fill_(0)
    # The copy's hook reads the copy's counts, not the original's.
    x = torch.randn(5, 16).to(DEVICE)
    with torch.no_grad():
        shifted, _ = clone.box_predictor(x)
        plain, _ = clone.train().box_predictor(x)
    torch.testing.assert_close(shifted - plain, clone.class_prior_shift().expand(5, -1))
    assert not torch.equal(clone.class_prior_shift(), head.class_prior_shift())
    with pytest.raises(ValueError, match="single-stage"):
        _head(name="OHEMCascadeROIHeads")


def test_uncorrected_gives_the_scores_as_trained():
    head = _head()
    _set_counts(head)
    head.eval()
    plain = _head(False).eval()
    plain.load_state_dict(
        {k: v for k, v in head.state_dict().items() if not k.startswith("ohem_class")}
    )
    features, proposals, _ = _batch(NAME)
    with torch.no_grad():
        with head.uncorrected():
            out, _ = head(None, features, proposals)
        ref, _ = plain(None, features, proposals)
        shifted, _ = head(None, features, proposals)  # the shift is back after the block
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)
    assert any(
        len(a) != len(b) or not torch.allclose(a.scores, b.scores) for a, b in zip(shifted, ref)
    )


def test_sigmoid_scores_are_refused_naming_both_keys():
    cfg = _cfg(NAME)
    cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION = True
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = True
    with pytest.raises(ValueError, match="PRIOR_CORRECTION.*USE_SIGMOID_CE"):
        _build(cfg)
