"""What a user who thresholds the scores gets: precision, recall and F1 at a score threshold,
and the detection expected calibration error (D-ECE; Küppers et al., CVPR-W 2020).

Both start from one matching of the detections that the evaluator kept (COCO results, as
:class:`COCOEvaluator` writes them) to the ground truth: per image and class, in descending
score, each detection takes the unmatched ground-truth box of its class with the highest IoU,
if that IoU is at least the threshold (COCO's greedy rule). Matching in descending score makes
the matches of the detections above any threshold independent of those below it.
"""

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, BoxMode, pairwise_iou

__all__ = [
    "apply_platt",
    "class_index",
    "detection_ece",
    "fit_platt",
    "match_detections",
    "matched_flags",
    "score_quality",
    "threshold_statistics",
]


def class_index(dataset_name=None):
    """Maps a COCO result's category_id to the model's class index: COCOEvaluator writes the
    dataset's ids when the dataset's metadata maps them, else the indices themselves."""
    meta = MetadataCatalog.get(dataset_name) if dataset_name else None
    mapping = meta.get("thing_dataset_id_to_contiguous_id", None) if meta is not None else None
    return (lambda c: mapping[c]) if mapping else (lambda c: c)


def _gt_boxes(record):
    boxes = [
        BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
        for a in record.get("annotations", [])
        if not a.get("iscrowd", 0)
    ]
    classes = [a["category_id"] for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    return torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), torch.tensor(classes)


def matched_flags(detections, dataset_dicts, *, iou_thresh=0.5, dataset_name=None):
    """Whether each of `detections` matched a ground-truth box, in their order.

    Args:
        detections: dicts with "image_id", "category_id", "bbox" (XYWH) and "score".
        dataset_dicts: Detectron2 dataset dicts (with "image_id" and "annotations").
        iou_thresh: the IoU a match needs.
        dataset_name: its metadata maps "category_id" to the class index, if it has a map.

    Returns:
        matched: (D,) bool, aligned with `detections`.
        num_gt: the number of ground-truth boxes (crowd boxes left out).
    """
    to_class = class_index(dataset_name)
    per_image = {}
    for index, d in enumerate(detections):
        per_image.setdefault(d["image_id"], []).append(index)
    matched, num_gt = np.zeros(len(detections), dtype=bool), 0
    for record in dataset_dicts:
        gt_boxes, gt_classes = _gt_boxes(record)
        num_gt += len(gt_classes)
        indices = sorted(
            per_image.pop(record["image_id"], []), key=lambda i: -detections[i]["score"]
        )
        if not indices:
            continue
        dets = [detections[i] for i in indices]
        boxes = torch.tensor(
            [BoxMode.convert(d["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for d in dets],
            dtype=torch.float64,
        )
        iou = pairwise_iou(Boxes(boxes), Boxes(gt_boxes))
        classes = torch.tensor([to_class(d["category_id"]) for d in dets])
        # A ground-truth box of another class, or one already taken, cannot be matched.
        iou[classes[:, None] != gt_classes[None, :]] = -1
        for row, index in enumerate(indices):
            best = int(iou[row].argmax()) if iou.shape[1] else -1
            if best >= 0 and bool(iou[row, best] >= iou_thresh):
                iou[:, best] = -1
                matched[index] = True
    if per_image:
        raise ValueError(f"detections for images not in the dataset: {sorted(per_image)[:5]}")
    return matched, num_gt


def match_detections(detections, dataset_dicts, *, iou_thresh=0.5, dataset_name=None):
    """:func:`matched_flags`, as (scores descending, their matched flags, num_gt)."""
    matched, num_gt = matched_flags(
        detections, dataset_dicts, iou_thresh=iou_thresh, dataset_name=dataset_name
    )
    scores = np.asarray([d["score"] for d in detections], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    return scores[order], matched[order], num_gt


def threshold_statistics(scores, matched, num_gt, num_images, *, score_thresh=0.5):
    """Precision, recall and F1 of the detections with score >= `score_thresh`, and how many
    such detections an image has on average (0 where undefined: no detection, no box)."""
    kept = scores >= score_thresh
    true_pos = int(matched[kept].sum())
    num_kept = int(kept.sum())
    precision = true_pos / num_kept if num_kept else 0.0
    recall = true_pos / num_gt if num_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "detections_per_image": num_kept / max(num_images, 1),
    }


def detection_ece(scores, matched, *, num_bins=10):
    """D-ECE: scores binned into `num_bins` equal bins of [0, 1] (1.0 in the last), and the
    mean over bins, weighted by their share of detections, of |fraction matched - mean score|.
    None without detections."""
    if len(scores) == 0:
        return None
    bins = np.minimum((np.asarray(scores) * num_bins).astype(int), num_bins - 1)
    error = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        error += in_bin.sum() * abs(matched[in_bin].mean() - scores[in_bin].mean())
    return float(error / len(scores))


def score_quality(detections, dataset_dicts, *, dataset_name=None, score_thresh=0.5):
    """The summary's measures of thresholded scores: ``precision@0.5``, ``recall@0.5``,
    ``f1@0.5``, ``detections_per_image@0.5`` (for the default `score_thresh`) and
    ``d_ece``, all at IoU 0.5."""
    scores, matched, num_gt = match_detections(detections, dataset_dicts, dataset_name=dataset_name)
    stats = threshold_statistics(
        scores, matched, num_gt, len(dataset_dicts), score_thresh=score_thresh
    )
    out = {f"{k}@{score_thresh:g}": v for k, v in stats.items()}
    out["d_ece"] = detection_ece(scores, matched)
    return out


def _logit(scores):
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def fit_platt(scores, matched, classes, num_classes, *, l2=1e-3):
    """Per-class Platt scaling of detection scores (Platt 1999; per class as in Küppers et
    al., CVPR-W 2020): s' = sigmoid(a_c * logit(s) + b_c), fitted by maximum likelihood to
    whether each detection matched, with a weak pull of (a_c, b_c) toward the identity
    (1, 0) so that a class whose detections all match (or none) stays finite.

    Args:
        scores, matched, classes: per detection (classes in [0, num_classes)).

    Returns:
        (num_classes, 2) float64 array of (a_c, b_c); (1, 0) for a class without detections.
    """
    from scipy.optimize import minimize
    from scipy.special import log_expit

    params = np.tile([1.0, 0.0], (num_classes, 1))
    x_all, y_all, c_all = _logit(scores), np.asarray(matched, float), np.asarray(classes)
    for c in range(num_classes):
        x, y = x_all[c_all == c], y_all[c_all == c]
        if len(x) == 0:
            continue

        def loss(ab, x=x, y=y):
            z = ab[0] * x + ab[1]
            nll = -(y * log_expit(z) + (1 - y) * log_expit(-z)).sum()
            return nll + l2 * len(x) * ((ab[0] - 1) ** 2 + ab[1] ** 2)

        params[c] = minimize(loss, params[c], method="BFGS").x
    return params


def apply_platt(scores, classes, params):
    """The calibrated scores sigmoid(a_c * logit(s) + b_c) of :func:`fit_platt`."""
    from scipy.special import expit

    params = np.asarray(params, dtype=np.float64)
    classes = np.asarray(classes)
    return expit(params[classes, 0] * _logit(scores) + params[classes, 1])
