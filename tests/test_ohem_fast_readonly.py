"""The approximate readonly pass (MODEL.ROI_HEADS.OHEM.FAST_READONLY): low-rank fc layers."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage
from helpers import DEVICE
from test_ohem_roi_heads import _batch as roi_heads_batch
from test_ohem_roi_heads import _build as build_roi_head
from test_ohem_roi_heads import _cfg as roi_heads_cfg
from torch import nn

from ohem_d2.config import add_ohem_config
from ohem_d2.modeling.ohem import HardExampleMiner, LowRankReadonly, build_readonly_approximation


def _head(in_dim=64, hidden=48, out_dim=32):
    """Two linear layers; no activation between them, so low-rank inputs stay low rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)).to(DEVICE)


def _low_rank_inputs(n=200, in_dim=64, rank=4):
    """Inputs spanning a ``rank``-dimensional subspace: the layers' outputs then have rank 4."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, rank, generator=g) @ torch.randn(rank, in_dim, generator=g)).to(DEVICE)


def test_off_by_default():
    cfg = get_cfg()
    add_ohem_config(cfg)
    fast = cfg.MODEL.ROI_HEADS.OHEM.FAST_READONLY
    assert fast.MODE == ""
    assert build_readonly_approximation(fast.MODE, rank=fast.RANK, refresh_period=1) is None
    assert HardExampleMiner(cfg).scorer.approximation is None
    with pytest.raises(ValueError, match="MODE"):
        build_readonly_approximation("fp8", rank=8, refresh_period=1)
    cfg.MODEL.ROI_HEADS.OHEM.FAST_READONLY.MODE = "lowrank"
    cfg.MODEL.ROI_HEADS.OHEM.FAST_READONLY.RANK = 0
    with pytest.raises(ValueError, match="FAST_READONLY.RANK"):
        HardExampleMiner(cfg)


def test_first_pass_is_exact_then_factors_reproduce_low_rank_outputs():
    head = _head()
    x = _low_rank_inputs()
    exact = head(x)
    approx = LowRankReadonly(rank=8, refresh_period=3, num_layers=0)
    with torch.no_grad():
        with approx([head]):
            first = head(x)
        torch.testing.assert_close(first, exact)  # calibration pass: exact
        # Both layers get cheaper at rank 8: 8 * (64 + 48) < 64 * 48, 8 * (48 + 32) < 48 * 32.
        assert len(approx.layers) == 2
        with approx([head]):
            second = head(x)
    # Outputs of rank <= 4 are reproduced by rank-8 factors up to rounding.
    torch.testing.assert_close(second, exact, rtol=1e-4, atol=1e-4)
    assert not torch.equal(second, exact)  # ... but computed differently


def test_refresh_period_and_no_global_rng_use():
    head = _head()
    x = _low_rank_inputs()
    approx = LowRankReadonly(rank=2, refresh_period=2)
    calls = []
    layer = head[0]
    with torch.no_grad():
        for _ in range(5):
            torch.manual_seed(7)
            with approx([head]):
                head(x)
            calls.append(torch.randn(()))  # the global RNG is where the seed left it
            state = approx.layers[id(layer.weight)]
            calls[-1] = (float(calls[-1]), state.passes_since_refresh)
    assert len({c[0] for c in calls}) == 1
    # Passes 1, 3, 5 are exact and refresh the factors.
    assert [c[1] for c in calls] == [1, 2, 1, 2, 1]


def test_num_layers_factorises_the_first_layers_only():
    head = _head()
    x = _low_rank_inputs(rank=16)  # outputs of rank 16: a rank-2 stand-in is visibly wrong
    approx = LowRankReadonly(rank=2, refresh_period=5, num_layers=1)
    with torch.no_grad():
        for _ in range(2):  # the first pass calibrates
            with approx([head]):
                hidden = head[0](x)
                out = head[1](hidden)
    assert list(approx.layers) == [id(head[0].weight)]
    with torch.no_grad():
        assert not torch.allclose(hidden, head[0](x), atol=1e-2)  # approximated
        torch.testing.assert_close(out, head[1](hidden))  # exact on its input
    with pytest.raises(ValueError, match="num_layers"):
        LowRankReadonly(rank=2, refresh_period=5, num_layers=-1)


def test_small_layers_are_left_exact():
    head = _head(in_dim=8, hidden=8, out_dim=8)
    x = torch.randn(10, 8).to(DEVICE)
    approx = LowRankReadonly(rank=4, refresh_period=1)
    with torch.no_grad(), approx([head]):
        out = head(x)
    assert approx.layers == {}
    torch.testing.assert_close(out, head(x))


def test_ohem_head_trains_with_lowrank_readonly():
    # The OHEM-head set-up of test_ohem_roi_heads, with 64-d fcs: fc1 is 128 -> 64.
    cfg = roi_heads_cfg("OHEMROIHeads")
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_HEADS.OHEM.FAST_READONLY.MODE = "lowrank"
    cfg.MODEL.ROI_HEADS.OHEM.FAST_READONLY.RANK = 8
    head = build_roi_head(cfg)
    approximation = head.miner.scorer.approximation
    assert isinstance(approximation, LowRankReadonly)

    features, proposals, targets = roi_heads_batch("OHEMROIHeads")
    for it in range(2):
        with EventStorage(it):
            _, losses = head(None, features, proposals, targets)
            sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
    # NUM_LAYERS 1: of the layers that rank 8 makes cheaper (fc1 128 -> 64, fc2 64 -> 64,
    # bbox_pred 64 -> 12; not cls_score 64 -> 4), only the first, fc1 on the pooled features.
    assert list(approximation.layers) == [id(head.box_head.fc1.weight)]
    assert all(layer.up is not None for layer in approximation.layers.values())
