"""The hard set plus a weighted random remainder (MODEL.ROI_HEADS.OHEM.REMAINDER): its draws
and weights against hand computations, its unbiasedness by Monte Carlo, and the heads that
train on it."""

import pytest
import torch
from detectron2.utils.events import EventStorage
from test_ohem_roi_heads import HEADS, _batch, _build, _cfg, _spy_on_losses, _train_step

from ohem_d2.modeling.ohem import HardExampleMiner
from ohem_d2.modeling.ohem.remainder import draw_remainder
from ohem_d2.modeling.ohem.scoring import weighted_box_losses

BG = 2  # two foreground classes, background label 2
# 10 RoIs: 3 foreground (0-2), 7 background (3-9), and one ignored (10).
LABELS = torch.tensor([0, 0, 1, 2, 2, 2, 2, 2, 2, 2, -1])
LOSSES = torch.tensor([5.0, 1.0, 3.0, 4.0, 0.5, 0.1, 0.2, 1.0, 0.3, 0.1, 9.0])
HARD = torch.tensor([0, 3])


def _draw(**kwargs):
    args = dict(num=4, background_label=BG)
    args.update(kwargs)
    return draw_remainder(LOSSES, LABELS, HARD, **args)


def test_uniform_remainder_all_rois_by_hand():
    torch.manual_seed(0)
    keep, weights = _draw()
    # N = 10 labelled, 3 fg (share 0.3) and 7 bg (0.7): each RoI weighs 0.1 in its stratum.
    # Draws: round(4 * 0.3) = 1 of the 2 fg left, 3 of the 6 bg left.
    assert keep[:2].tolist() == [0, 3]
    drawn = keep[2:].tolist()
    assert len(drawn) == 4 and len(set(drawn)) == 4  # without replacement
    assert sum(i in (1, 2) for i in drawn) == 1 and sum(4 <= i <= 9 for i in drawn) == 3
    expected = [0.1, 0.1] + [0.1 * 2 / 1 if i in (1, 2) else 0.1 * 6 / 3 for i in drawn]
    torch.testing.assert_close(weights, torch.tensor(expected))
    assert float(weights.sum()) == pytest.approx(1.0)


def test_uniform_remainder_stock_sampler_by_hand():
    torch.manual_seed(0)
    keep, weights = _draw(target_fg_fraction=0.25)
    drawn = keep[2:].tolist()
    # fg 0.25 over 3 RoIs, bg 0.75 over 7; one fg draw from 2, three bg draws from 6.
    fg, bg = 0.25 / 3, 0.75 / 7
    expected = [fg, bg] + [fg * 2 if i in (1, 2) else bg * 2 for i in drawn]
    torch.testing.assert_close(weights, torch.tensor(expected))
    assert float(weights.sum()) == pytest.approx(1.0)


def test_importance_weights_by_hand():
    # Background only, hard set empty: the pool is the 7 background RoIs, q = loss / sum
    # (alpha 1, no smoothing); a draw of RoI i weighs 0.7/7 * 7/4 * (1 / (7 q_i)) ** k.
    bg_losses = LOSSES[3:10].double()
    q = bg_losses / bg_losses.sum()
    for k in (1.0, 0.5, 0.0):
        torch.manual_seed(0)
        keep, weights = draw_remainder(
            LOSSES, LABELS, HARD[:0], num=4, background_label=BG,
            target_fg_fraction=0.0 + 1e-9, alpha=1.0, smoothing=0.0, weight_exponent=k,
        )  # fmt: skip
        fg_draws = [i for i in keep.tolist() if i < 3]
        bg_draws = [i for i in keep.tolist() if 3 <= i <= 9]
        assert not fg_draws and len(bg_draws) == 4  # round(4 * ~0) = 0 foreground draws
        share = 1 - 1e-9
        expected = [share / 7 * 7 / 4 * (1 / (7 * float(q[i - 3]))) ** k for i in bg_draws]
        torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))


def test_allocation_at_the_edges():
    torch.manual_seed(0)
    # Without foreground, every draw is background (and uniform draws stop at the pool).
    labels = torch.tensor([2, 2, 2, 2, 2])
    keep, weights = draw_remainder(
        torch.ones(5), labels, torch.tensor([0]), num=10, background_label=BG
    )
    assert sorted(keep.tolist()) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(weights, torch.full((5,), 0.2))
    # A foreground stratum all in the hard set gives its draws to the background.
    keep, _ = (
        _draw(hard=None)
        if False
        else draw_remainder(LOSSES, LABELS, torch.tensor([0, 1, 2]), num=4, background_label=BG)
    )
    assert all(3 <= i <= 9 for i in keep[3:].tolist()) and len(keep) == 7


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # uniform, ALL_ROIS
        dict(target_fg_fraction=0.25),
        dict(target_fg_fraction=0.25, alpha=1.0, smoothing=0.5),
        dict(alpha=2.0, smoothing=0.1),
    ],
)
def test_weighted_minibatch_loss_is_unbiased(kwargs):
    """Monte Carlo: the mean over many draws of sum(w * loss) equals the target's mean loss,
    sum over strata of pi_s * (mean loss of the stratum), within 4 standard errors."""
    g = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.randint(0, 2, (12,)), torch.full((48,), BG), torch.tensor([-1])])
    losses = torch.rand(61, generator=g) ** 3 * 4
    hard = torch.sort(torch.where(labels >= 0, losses, -1.0), descending=True).indices[:5]
    fg, bg = (labels >= 0) & (labels != BG), labels == BG
    f = kwargs.get("target_fg_fraction")
    share = float(fg.sum()) / float((fg | bg).sum()) if f is None else f
    target = share * losses[fg].mean() + (1 - share) * losses[bg].mean()
    torch.manual_seed(2)
    estimates = []
    for _ in range(4000):
        keep, weights = draw_remainder(losses, labels, hard, num=6, background_label=BG, **kwargs)
        estimates.append(float((weights.double() * losses[keep].double()).sum()))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    standard_error = float(estimates.std()) / len(estimates) ** 0.5
    assert abs(float(estimates.mean()) - float(target)) < 4 * standard_error + 1e-6


def test_tempered_weights_are_biased_toward_hard_rois():
    """k = 0 keeps the draws' preference for high losses: the estimate exceeds the mean."""
    g = torch.Generator().manual_seed(1)
    labels = torch.full((40,), BG)
    losses = torch.rand(40, generator=g) ** 3 * 4
    torch.manual_seed(2)
    estimates = [
        float((w.double() * losses[k].double()).sum())
        for k, w in (
            draw_remainder(
                losses,
                labels,
                labels[:0],
                num=8,
                background_label=BG,
                alpha=1.0,
                smoothing=0.0,
                weight_exponent=0.0,
            )  # fmt: skip
            for _ in range(2000)
        )
    ]
    # With q proportional to the loss, E[loss of a draw] = sum(l^2) / sum(l).
    expected = float((losses.double() ** 2).sum() / losses.double().sum())
    assert sum(estimates) / len(estimates) == pytest.approx(expected, rel=0.03)
    assert expected > 1.5 * float(losses.mean())


def test_uniform_weights_give_the_predictors_own_losses():
    """A second implementation: equal weights, N images / R RoIs on each of the batch's R,
    reproduce FastRCNNOutputLayers' own loss_cls and loss_box_reg (means over the R RoIs)."""
    name = "OHEMROIHeads"
    head = _build(_cfg(name))
    features, proposals, targets = _batch(name)
    with EventStorage():
        candidates = head.label_proposals(proposals, targets)
        predictor = head.box_predictor
        boxes = [p.proposal_boxes for p in candidates]
        predictions = predictor(head.box_head(head.box_pooler([features["res4"]], boxes)))
        total = sum(len(p) for p in candidates)
        for p in candidates:
            p.ohem_weight = torch.full((len(p),), 2.0 / total, device=p.gt_classes.device)
        weighted = weighted_box_losses(predictor, predictions, candidates)
        stock = predictor.losses(predictions, candidates)
    assert stock["loss_box_reg"] > 0
    for key in stock:
        torch.testing.assert_close(weighted[key], stock[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", HEADS)
def test_heads_train_on_the_weighted_minibatch(name, monkeypatch):
    cfg = _cfg(name)
    cfg.MODEL.ROI_HEADS.OHEM.REMAINDER.NUM_PER_IMAGE = 2
    cfg.MODEL.ROI_HEADS.OHEM.REMAINDER.TARGET = "STOCK_SAMPLER"
    head = _build(cfg)
    stock_calls = _spy_on_losses(monkeypatch, head)
    spy = vars(head.box_predictor[0] if "Cascade" in name else head.box_predictor)["losses"]
    weighted_calls = []

    def recording(predictor, predictions, proposals):
        out = weighted_box_losses(predictor, predictions, proposals)
        weighted_calls.append((proposals, out))
        return out

    monkeypatch.setattr("ohem_d2.modeling.ohem.roi_heads.weighted_box_losses", recording)
    torch.manual_seed(0)
    _, losses, _ = _train_step(head, *_batch(name))
    assert all(torch.isfinite(v) for v in losses.values())
    assert not stock_calls  # every stage trained on the weighted losses
    assert len(weighted_calls) == (3 if "Cascade" in name else 1)
    hard, expected = weighted_calls[0]
    # 4 hard + 2 drawn per image, each with its weight; the losses are the weighted ones.
    assert [len(h) for h in hard] == [6, 6]
    assert all(h.has("ohem_weight") for h in hard)
    suffix = "_stage0" if "Cascade" in name else ""
    for key, value in expected.items():
        assert torch.equal(losses[key + suffix], value)
    # The predictor's own losses (here the spy) are back after the step.
    predictor = head.box_predictor[0] if "Cascade" in name else head.box_predictor
    assert vars(predictor)["losses"] is spy


def test_off_is_the_paper_and_bad_settings_are_refused():
    name = "OHEMROIHeads"
    head = _build(_cfg(name))
    assert head.miner.remainder_num == 0
    hard, _, _ = _train_step(head, *_batch(name))
    assert not any(h.has("ohem_weight") for h in hard)
    kwargs = dict(batch_size_per_image=4)
    with pytest.raises(ValueError, match="REMAINDER.NUM_PER_IMAGE"):
        HardExampleMiner(remainder_num=5, **kwargs)
    with pytest.raises(ValueError, match="EASY_BG_FRACTION"):
        HardExampleMiner(remainder_num=2, easy_bg_fraction=0.25, **kwargs)
    with pytest.raises(ValueError, match="WEIGHT_EXPONENT"):
        HardExampleMiner(remainder_num=2, remainder_exponent=1.5, **kwargs)
    cfg = _cfg(name)
    cfg.MODEL.ROI_HEADS.OHEM.REMAINDER.NUM_PER_IMAGE = 2
    cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION = True
    with pytest.raises(ValueError, match="PRIOR_CORRECTION cannot be combined"):
        _build(cfg)
    cfg = _cfg(name)
    cfg.MODEL.ROI_HEADS.OHEM.REMAINDER.TARGET = "HALF"
    with pytest.raises(ValueError, match="REMAINDER.TARGET"):
        _build(cfg)
