"""VOCDetectionEvaluator: Detectron2's VOC numbers, per-class AP50 in both VOC metrics (checked
by hand), and scoring against cleaned annotations when the dataset says so."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from ohem_d2.engine.evaluation import VOCDetectionEvaluator, detection_cap_statistics

CLASSES = ["cell", "other"]
# One image, class "cell": GT boxes A and B (VOC 1-based inclusive coordinates); an
# "other" box that nothing detects; and, in the XML only, a near-copy of A (a duplicate).
GT_XML = {
    "cell": [(11, 11, 50, 50), (61, 61, 100, 100)],
    "other": [(111, 11, 150, 50)],
}
DUPLICATE_OF_A = (12, 12, 51, 51)


def _xml(objects):
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b in objects
    )
    return f"<annotation><size><width>200</width><height>120</height></size>{body}</annotation>"


@pytest.fixture
def tiny_voc(tmp_path):
    """A one-image VOC-layout dataset whose XML holds a duplicate box; the registered dicts
    (what the project's BCCD loader would give) do not."""
    os.makedirs(tmp_path / "Annotations")
    os.makedirs(tmp_path / "ImageSets" / "Main")
    objects = [(n, b) for n, boxes in GT_XML.items() for b in boxes] + [("cell", DUPLICATE_OF_A)]
    (tmp_path / "Annotations" / "img0.xml").write_text(_xml(objects))
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("img0\n")
    record = {
        "file_name": str(tmp_path / "img0.jpg"),
        "image_id": "img0",
        "height": 120,
        "width": 200,
        "annotations": [
            {
                "category_id": CLASSES.index(n),
                "bbox": [b[0] - 1.0, b[1] - 1.0, float(b[2]), float(b[3])],
                "bbox_mode": BoxMode.XYXY_ABS,
            }
            for n, boxes in GT_XML.items()
            for b in boxes
        ],
    }
    names = []
    for name, cleaned in (("tiny_voc_raw", False), ("tiny_voc_cleaned", True)):
        DatasetCatalog.register(
            name, lambda r=record: [dict(r, annotations=list(r["annotations"]))]
        )
        MetadataCatalog.get(name).set(
            thing_classes=CLASSES,
            dirname=str(tmp_path),
            year=2007,
            split="test",
            annotations_cleaned=cleaned,
        )
        names.append(name)
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _detections():
    # "cell": 0.9 on A (TP), 0.8 on empty space (FP), 0.7 on B (TP); XYXY_ABS, 0-based.
    boxes = [[10, 10, 50, 50], [150, 70, 190, 110], [60, 60, 100, 100]]
    inst = Instances((120, 200))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor([0.9, 0.8, 0.7])
    inst.pred_classes = torch.tensor([0, 0, 0])
    return [{"image_id": "img0"}], [{"instances": inst}]


def _evaluate(evaluator):
    evaluator.reset()
    evaluator.process(*_detections())
    return evaluator.evaluate()["bbox"]


def test_per_class_ap50_in_both_metrics_matches_a_hand_computation(tiny_voc):
    result = _evaluate(VOCDetectionEvaluator("tiny_voc_cleaned"))
    # Ranked: TP, FP, TP over 2 GT -> recall (.5, .5, 1), precision (1, .5, 2/3).
    # All-point: .5 * 1 + .5 * 2/3. 11-point: recall 0-.5 (6 points) at precision 1, recall
    # .6-1 (5 points) at 2/3.
    assert result["AP50_allpoint-cell"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))
    assert result["AP50_11point-cell"] == pytest.approx(100 * (6 + 5 * 2 / 3) / 11)
    assert result["AP50_allpoint-other"] == 0 and result["AP50_11point-other"] == 0
    assert result["mAP50_allpoint"] == pytest.approx(np.mean([100 * (0.5 + 1 / 3), 0]))
    # VOC2007 datasets report Detectron2's AP50 in the 11-point metric.
    assert result["AP50"] == pytest.approx(result["mAP50_11point"])


def test_raw_dataset_gives_detectron2s_numbers_and_cleaned_one_drops_the_duplicate(tiny_voc):
    ours = _evaluate(VOCDetectionEvaluator("tiny_voc_raw"))
    theirs = _evaluate(PascalVOCDetectionEvaluator("tiny_voc_raw"))
    for key in ("AP", "AP50", "AP75"):
        assert ours[key] == pytest.approx(theirs[key])
    # Raw XML: the duplicate is a third "cell" GT that nothing matches -> recall 2/3 at most.
    assert ours["AP50_allpoint-cell"] == pytest.approx(100 * (1 / 3 + 1 / 3 * 2 / 3))
    cleaned = _evaluate(VOCDetectionEvaluator("tiny_voc_cleaned"))
    assert cleaned["AP50_allpoint-cell"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))


def test_detection_cap_statistics_by_hand(tmp_path):
    # Image 1 keeps 3 detections (lowest 0.2), image 2 keeps 1 (0.7), image 3 none:
    # 4 detections over 3 images; the bar is the median of (0.2, 0.7) = 0.45.
    scores = {1: [0.9, 0.2, 0.5], 2: [0.7]}
    records = [
        {"image_id": i, "category_id": 1, "bbox": [0, 0, 5, 5], "score": s}
        for i, image_scores in scores.items()
        for s in image_scores
    ]
    path = tmp_path / "coco_instances_results.json"
    path.write_text(json.dumps(records))
    stats = detection_cap_statistics(str(path), num_images=3)
    assert stats["mean_detections_per_image"] == pytest.approx(4 / 3)
    assert stats["median_lowest_kept_score"] == pytest.approx(0.45)
    path.write_text("[]")
    assert detection_cap_statistics(str(path), num_images=3) == {
        "mean_detections_per_image": 0.0,
        "median_lowest_kept_score": None,
    }
