"""Precision / recall / F1 at a score threshold and D-ECE, against a hand computation; the
per-class Platt scaling against a known map, and its cross-fitting."""

import numpy as np
import pytest
from detectron2.structures import BoxMode

from ohem_d2.engine.calibration import (
    apply_platt,
    detection_ece,
    fit_platt,
    match_detections,
    score_quality,
    threshold_statistics,
)


def _record(image_id, boxes):
    return {
        "image_id": image_id,
        "annotations": [
            {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c} for c, box in boxes
        ],
    }


DATASET = [
    _record(1, [(0, [0, 0, 10, 10]), (1, [20, 20, 30, 30])]),
    _record(2, [(0, [0, 0, 10, 10])]),
]


def _det(image_id, category_id, xywh, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": xywh, "score": score}


DETECTIONS = [
    _det(1, 0, [0, 0, 10, 10], 0.9),  # a: matches image 1's class-0 box (IoU 1)
    _det(1, 0, [1, 0, 10, 10], 0.65),  # b: IoU 0.82 with the same box, already taken
    _det(1, 0, [20, 20, 10, 10], 0.62),  # c: on the class-1 box, wrong class
    _det(1, 1, [20, 20, 10, 10], 0.3),  # d: matches the class-1 box
    _det(2, 0, [0, 0, 10, 4], 0.55),  # e: IoU 0.4, too low
    _det(2, 0, [0, 0, 10, 6], 0.05),  # f: IoU 0.6 (e took nothing)
]


def test_matching_by_hand():
    scores, matched, num_gt = match_detections(DETECTIONS, DATASET)
    assert scores.tolist() == [0.9, 0.65, 0.62, 0.55, 0.3, 0.05]
    assert matched.tolist() == [True, False, False, False, True, True]
    assert num_gt == 3


def test_threshold_statistics_by_hand():
    # At >= 0.5: a, b, c, e kept; a is the one true positive of 3 boxes.
    stats = threshold_statistics(*match_detections(DETECTIONS, DATASET), 2)
    assert stats["precision"] == pytest.approx(1 / 4)
    assert stats["recall"] == pytest.approx(1 / 3)
    assert stats["f1"] == pytest.approx(2 / 7)  # 2 P R / (P + R)
    assert stats["detections_per_image"] == pytest.approx(2.0)
    # The threshold is inclusive: at 0.55, e is kept and c (0.62) too.
    assert threshold_statistics(*match_detections(DETECTIONS, DATASET), 2, score_thresh=0.55)[
        "precision"
    ] == pytest.approx(1 / 4)
    # Nothing kept: 0, not a division error.
    empty = threshold_statistics(*match_detections(DETECTIONS, DATASET), 2, score_thresh=0.95)
    assert empty == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "detections_per_image": 0.0}


def test_d_ece_by_hand():
    # Bins of 0.1: [0.9] a matched: |1 - 0.9|; [0.6] b, c unmatched: |0 - 0.635| twice;
    # [0.5] e: 0.55; [0.3] d matched: 0.7; [0.0] f matched: 0.95. Six detections.
    scores, matched, _ = match_detections(DETECTIONS, DATASET)
    expected = (0.1 + 2 * 0.635 + 0.55 + 0.7 + 0.95) / 6
    assert detection_ece(scores, matched) == pytest.approx(expected)
    assert detection_ece(scores[:0], matched[:0]) is None


def test_perfect_scores_have_no_calibration_error():
    # A score of exactly 1.0 falls in the last bin; every such detection matched: D-ECE 0.
    dets = [_det(1, 0, [0, 0, 10, 10], 1.0), _det(1, 1, [20, 20, 10, 10], 1.0)]
    scores, matched, _ = match_detections(dets, DATASET[:1])
    assert detection_ece(scores, matched) == 0.0


def test_score_quality_keys_and_unknown_image():
    out = score_quality(DETECTIONS, DATASET)
    assert set(out) == {
        "precision@0.5",
        "recall@0.5",
        "f1@0.5",
        "detections_per_image@0.5",
        "d_ece",
    }
    with pytest.raises(ValueError, match="not in the dataset"):
        match_detections([_det(7, 0, [0, 0, 1, 1], 0.5)], DATASET)


def test_platt_recovers_a_known_calibration_map():
    """Detections whose true chance of matching is sigmoid(2 logit(s) - 1): the fit finds
    a = 2, b = -1; a class without detections keeps the identity."""
    from scipy.special import expit, logit

    rng = np.random.default_rng(0)
    scores = rng.uniform(0.02, 0.98, 20000)
    matched = rng.uniform(size=scores.size) < expit(2 * logit(scores) - 1)
    params = fit_platt(scores, matched, np.zeros(scores.size, int), 2)
    assert params[0] == pytest.approx([2.0, -1.0], abs=0.1)
    assert params[1].tolist() == [1.0, 0.0]
    assert apply_platt([0.3, 0.7], [1, 1], params) == pytest.approx([0.3, 0.7])


def test_cross_fitting_scores_each_half_by_the_other():
    """Even images: one detection on a true box; odd images: one on nothing. Each half is
    scored by the map fitted on the other, so the even ones (fitted on misses) sink below
    the kept range and the odd ones (fitted on hits) rise."""
    from studies.calibration import cross_fitted

    dataset = [_record(i, [(0, [0, 0, 10, 10])] if i % 2 == 0 else []) for i in range(8)]
    detections = [_det(i, 0, [0, 0, 10, 10], 0.3) for i in range(8)]
    out = {d["image_id"]: d["score"] for d in cross_fitted(detections, dataset, 1)}
    assert all(out[i] > 0.5 for i in range(1, 8, 2))
    assert all(out.get(i, 0.0) < 0.3 for i in range(0, 8, 2))
