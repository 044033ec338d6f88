"""pool_rois: the readonly pass's RoI pooling split across CPU threads equals one call."""

import threading

import pytest
import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from ohem_d2.modeling.ohem.pooling import MIN_ROIS_PER_THREAD, pool_rois


def random_boxes(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    wh = torch.rand(n, 2, generator=g) * size * 0.5 + 1
    return Boxes(torch.cat([xy, xy + wh], dim=1))


@pytest.mark.parametrize(
    "pooler_type,scales",
    [("ROIPool", (1 / 16,)), ("ROIAlignV2", (1 / 4, 1 / 8, 1 / 16, 1 / 32))],
)
@pytest.mark.parametrize("num_threads", [2, 3])
def test_equals_one_call(pooler_type, scales, num_threads):
    pooler = ROIPooler(7, scales, sampling_ratio=0, pooler_type=pooler_type)
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(1, 8, int(256 * s), int(320 * s), generator=g) for s in scales]
    boxes = random_boxes(3 * MIN_ROIS_PER_THREAD + 5, 256)
    expected = pooler(features, [boxes])
    got = pool_rois(pooler, features, boxes, num_threads=num_threads)
    assert torch.equal(got, expected)


class RecordingPooler(torch.nn.Module):
    """A pooler that records the threads it runs in and the grad mode it sees."""

    def __init__(self):
        super().__init__()
        self.inner = ROIPooler(7, (1 / 16,), sampling_ratio=0, pooler_type="ROIPool")
        self.threads, self.grad_modes, self.calls = set(), set(), 0

    def forward(self, features, boxes):
        self.calls += 1
        self.threads.add(threading.get_ident())
        self.grad_modes.add(torch.is_grad_enabled())
        return self.inner(features, boxes)


@pytest.mark.parametrize("grad", [False, True])
def test_threads_and_grad_mode(grad):
    pooler = RecordingPooler()
    features = [torch.randn(1, 4, 16, 20, requires_grad=True)]
    boxes = random_boxes(2 * MIN_ROIS_PER_THREAD, 256)
    with torch.set_grad_enabled(grad):
        out = pool_rois(pooler, features, boxes, num_threads=2)
    # Two parts, pooled on the pool's threads (which of them takes which part is up to it).
    assert pooler.calls == 2
    assert threading.get_ident() not in pooler.threads
    assert pooler.grad_modes == {grad}
    assert out.requires_grad == grad
    if grad:  # gradients reach the features as from one call
        out.square().sum().backward()
        expected = torch.autograd.grad(pooler.inner(features, [boxes]).square().sum(), features)
        assert torch.allclose(features[0].grad, expected[0])


def test_few_rois_one_call():
    pooler = RecordingPooler()
    features = [torch.randn(1, 4, 16, 20)]
    pool_rois(pooler, features, random_boxes(2 * MIN_ROIS_PER_THREAD - 1, 256), num_threads=2)
    assert pooler.calls == 1
    assert pooler.threads == {threading.get_ident()}
