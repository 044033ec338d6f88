"""select_hard_examples against a direct, slow implementation of the authors' hard-RoI rule."""

import math
import random

import pytest
import torch
from helpers import DEVICE

from ohem_d2.modeling.ohem import select_hard_examples

BG = 3  # background label: 3 foreground classes


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_select(
    losses, boxes, labels, batch_size, nms_thresh, nms_per_label, positive_fraction=-1.0
):
    """The rule as written in the paper and the authors' code, one RoI at a time.

    Candidates are the non-ignored RoIs, visited hardest first (lower index first on ties);
    a RoI is dropped if its IoU with an already kept RoI (of the same label, if per label)
    exceeds the threshold; the first ``batch_size`` kept RoIs are the hard set.
    """
    order = sorted((i for i in range(len(losses)) if labels[i] >= 0), key=lambda i: (-losses[i], i))
    kept = []
    for i in order:
        suppressed = nms_thresh < 1.0 and any(
            (not nms_per_label or labels[j] == labels[i]) and _iou(boxes[i], boxes[j]) > nms_thresh
            for j in kept
        )
        if not suppressed:
            kept.append(i)
    if positive_fraction <= 0:
        return kept[:batch_size], len(kept)
    fg = [i for i in kept if labels[i] != BG][: math.floor(batch_size * positive_fraction)]
    bg = [i for i in kept if labels[i] == BG][: batch_size - len(fg)]
    return sorted(fg + bg, key=kept.index), len(kept)


def _select(losses, boxes, labels, batch_size=128, nms_thresh=0.7, nms_per_label=True, **kw):
    keep, num_after_nms = select_hard_examples(
        torch.tensor(losses, dtype=torch.float32, device=DEVICE),
        torch.tensor(boxes, dtype=torch.float32, device=DEVICE),
        torch.tensor(labels, dtype=torch.int64, device=DEVICE),
        batch_size=batch_size,
        nms_thresh=nms_thresh,
        nms_per_label=nms_per_label,
        background_label=BG,
        **kw,
    )
    assert keep.dtype == torch.int64
    return keep.tolist(), num_after_nms


def _check_against_reference(losses, boxes, labels, **kw):
    got = _select(losses, boxes, labels, **kw)
    ref_kw = {"positive_fraction": kw.pop("positive_fraction", -1.0)}
    ref = reference_select(
        torch.tensor(losses, dtype=torch.float32).tolist(),
        boxes,
        labels,
        kw.get("batch_size", 128),
        kw.get("nms_thresh", 0.7),
        kw.get("nms_per_label", True),
        **ref_kw,
    )
    assert got == (ref[0], ref[1])
    return got


A = [0.0, 0.0, 10.0, 10.0]
A_NEAR = [0.0, 0.0, 10.0, 11.0]  # IoU with A: 10/11 > 0.7
A_FAR = [0.0, 0.0, 10.0, 15.0]  # IoU with A: 2/3 < 0.7
C = [20.0, 20.0, 30.0, 30.0]


def test_ties_keep_lower_index_first():
    boxes = [A, A_NEAR, C, A, C]
    losses = [1.0, 1.0, 1.0, 1.0, 2.0]
    keep, num_after_nms = _check_against_reference(losses, boxes, [BG] * 5)
    # 4 is hardest; among the tied rest, 0 suppresses 1 and 3, and 2 is C's duplicate of 4.
    assert keep == [4, 0] and num_after_nms == 2


def test_nms_threshold_is_strict_and_uses_the_loss_as_score():
    boxes = [A, A_FAR, A_NEAR]
    losses = [0.5, 0.9, 0.7]
    keep, _ = _check_against_reference(losses, boxes, [BG] * 3)
    # 1 (hardest) suppresses 2 (IoU 11/15 > 0.7) but not 0 (IoU 2/3).
    assert keep == [1, 0]


def test_fewer_rois_than_batch_size_keeps_all_survivors_hardest_first():
    boxes = [A, C, [40.0, 40.0, 60.0, 60.0]]
    keep, num_after_nms = _check_against_reference([0.1, 0.3, 0.2], boxes, [0, BG, 2])
    assert keep == [1, 2, 0] and num_after_nms == 3


def test_top_b_cut_after_nms():
    boxes = [[10.0 * i, 0.0, 10.0 * i + 8, 8.0] for i in range(6)]
    keep, num_after_nms = _check_against_reference(
        [0.1, 0.6, 0.2, 0.5, 0.4, 0.3], boxes, [BG, 1, BG, 0, BG, BG], batch_size=3
    )
    assert keep == [1, 3, 4] and num_after_nms == 6


def test_image_without_foreground():
    boxes = [A, A_NEAR, C, A_FAR]
    keep, _ = _check_against_reference([0.4, 0.3, 0.2, 0.1], boxes, [BG] * 4, batch_size=2)
    assert keep == [0, 2]


def test_single_roi():
    assert _check_against_reference([0.3], [A], [1], batch_size=64) == ([0], 1)
    assert _check_against_reference([0.3], [A], [1], batch_size=1) == ([0], 1)


def test_nms_per_label_only_suppresses_within_a_label():
    boxes = [A, A_NEAR]
    keep, _ = _check_against_reference([0.5, 0.4], boxes, [1, BG], nms_per_label=True)
    assert keep == [0, 1]
    keep, _ = _check_against_reference([0.5, 0.4], boxes, [1, BG], nms_per_label=False)
    assert keep == [0]


def test_nms_off_at_threshold_one():
    keep, num_after_nms = _check_against_reference([0.5, 0.4], [A, A], [BG, BG], nms_thresh=1.0)
    assert keep == [0, 1] and num_after_nms == 2


def test_ignored_rois_are_never_candidates():
    keep, num_after_nms = _check_against_reference([9.0, 0.1, 0.2], [A, C, A_NEAR], [-1, BG, BG])
    # The ignored RoI 0 neither gets selected nor suppresses RoI 2.
    assert keep == [2, 1] and num_after_nms == 2
    assert _select([1.0, 2.0], [A, C], [-1, -1]) == ([], 0)
    empty = _select([], torch.zeros(0, 4).tolist(), [])
    assert empty == ([], 0)


def test_positive_fraction_caps_foreground_and_fills_with_hardest_background():
    boxes = [[10.0 * i, 0.0, 10.0 * i + 8, 8.0] for i in range(8)]
    labels = [0, 1, 2, 0, BG, BG, BG, BG]
    losses = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    keep, _ = _check_against_reference(losses, boxes, labels, batch_size=4, positive_fraction=0.25)
    assert keep == [0, 4, 5, 6]
    keep, _ = _check_against_reference(losses, boxes, labels, batch_size=4, positive_fraction=1.0)
    assert keep == [0, 1, 2, 3]
    # Not enough background: the set is smaller, as in Detectron2 and mmdetection.
    keep, _ = _check_against_reference(
        losses[:5], boxes[:5], labels[:5], batch_size=4, positive_fraction=0.5
    )
    assert keep == [0, 1, 4]


@pytest.mark.parametrize("seed", range(4))
def test_random_images_match_the_reference(seed):
    rng = random.Random(seed)
    for _ in range(40):
        n = rng.randint(1, 60)
        # Clustered boxes so that NMS has work to do; integer coordinates, quantised losses
        # so that ties are frequent.
        centers = [(rng.randint(0, 80), rng.randint(0, 80)) for _ in range(rng.randint(1, 5))]
        boxes = []
        for _ in range(n):
            cx, cy = rng.choice(centers)
            x0, y0 = cx + rng.randint(-4, 4), cy + rng.randint(-4, 4)
            boxes.append([x0, y0, x0 + rng.randint(5, 30), y0 + rng.randint(5, 30)])
        boxes = [[float(v) for v in b] for b in boxes]
        labels = [rng.choice([-1, 0, 1, 2, BG, BG, BG]) for _ in range(n)]
        losses = [rng.randint(0, 6) / 4.0 for _ in range(n)]
        _check_against_reference(
            losses,
            boxes,
            labels,
            batch_size=rng.choice([1, 3, 8, 64]),
            nms_thresh=rng.choice([0.3, 0.5, 0.7, 1.0]),
            nms_per_label=rng.random() < 0.5,
            positive_fraction=rng.choice([-1.0, -1.0, 0.25, 1.0]),
        )


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        _select([0.1], [A], [BG], batch_size=0)
    with pytest.raises(ValueError):
        _select([0.1], [A], [BG], positive_fraction=1.5)
