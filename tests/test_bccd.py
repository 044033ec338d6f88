"""BCCD as shipped: registration, the annotation faults dropped and named (files untouched),
and the shipped proposals reproduced by the project's own generator."""

import hashlib
import logging
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ohem_d2.data.bccd import (
    BCCD_CLASS_NAMES,
    bccd_proposal_file,
    clean_annotations,
    default_bccd_root,
    register_bccd,
)
from ohem_d2.data.proposal_io import read_proposal_file
from ohem_d2.proposals.bccd import BCCD_MIN_SIZE
from ohem_d2.proposals.search import selective_search_boxes

ROOT = default_bccd_root()


def _digest(folder):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def bccd():
    register_bccd()
    yield {name: DatasetCatalog.get(name) for name in ("bccd_trainval", "bccd_test")}


def _ann(category, box):
    return {"category_id": category, "bbox": list(map(float, box)), "bbox_mode": BoxMode.XYXY_ABS}


def test_cleaning_rule_on_hand_built_boxes():
    # Detectron2's loader shifts xmin/ymin by -1: XML (5, 5, 5, 9) arrives as (4, 4, 5, 9).
    record = {
        "image_id": "im",
        "annotations": [
            _ann(0, (10, 10, 60, 60)),  # kept
            _ann(0, (12, 12, 62, 62)),  # IoU 0.855 with the first, same class: duplicate
            _ann(1, (12, 12, 62, 62)),  # same place, other class: kept
            _ann(0, (30, 30, 80, 80)),  # IoU 900 / 4100 = 0.22: kept
            _ann(0, (4, 4, 5, 9)),  # 1 px wide: degenerate
            _ann(2, (4, 4, 9, 5)),  # 1 px high: degenerate
        ],
    }
    # IoU of the duplicate: intersection 48 x 48 = 2304, union 2 * 2500 - 2304 = 2696.
    assert 2304 / 2696 == pytest.approx(0.8546, abs=1e-4)
    cleaning = clean_annotations([record])
    assert [a["bbox"] for a in record["annotations"]] == [
        [10, 10, 60, 60],
        [12, 12, 62, 62],
        [30, 30, 80, 80],
    ]
    assert [a["category_id"] for a in record["annotations"]] == [0, 1, 0]
    assert [(i, c) for i, c, _ in cleaning.degenerate] == [("im", 0), ("im", 2)]
    assert [(i, c, b) for i, c, b in cleaning.duplicate] == [("im", 0, [12, 12, 62, 62])]


def test_registered_splits_are_cleaned_counted_and_named(caplog):
    annotations = os.path.join(ROOT, "Annotations")
    before = _digest(annotations)
    for name in ("bccd_trainval", "bccd_test"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    register_bccd()
    with caplog.at_level(logging.INFO, logger="ohem_d2.data.bccd"):
        trainval, test = DatasetCatalog.get("bccd_trainval"), DatasetCatalog.get("bccd_test")
    assert _digest(annotations) == before  # the files are left untouched
    assert (len(trainval), len(test)) == (292, 72)
    assert not {r["image_id"] for r in trainval} & {r["image_id"] for r in test}
    # 4888 boxes in the XML files: 2 degenerate and 7 duplicates in trainval, 1 in test.
    assert sum(len(r["annotations"]) for r in trainval) == 3943 - 9
    assert sum(len(r["annotations"]) for r in test) == 945 - 1
    log = caplog.text
    assert "bccd_trainval: dropped 2 degenerate box(es)" in log
    assert "BloodImage_00338 RBC" in log and "BloodImage_00343 RBC" in log
    assert "dropped 7 duplicate box(es)" in log
    assert "bccd_test: dropped 1 duplicate box(es)" in log and "BloodImage_00284" in log
    meta = MetadataCatalog.get("bccd_test")
    assert tuple(meta.thing_classes) == BCCD_CLASS_NAMES and meta.annotations_cleaned
    for record in trainval + test:
        for ann in record["annotations"]:
            x0, y0, x1, y1 = ann["bbox"]
            assert x1 - x0 > 1 and y1 - y0 > 1
            assert 0 <= x0 and x1 <= record["width"] and 0 <= y0 and y1 <= record["height"]


def test_registering_another_root_is_refused(bccd, tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_bccd(str(tmp_path))


def test_missing_dataset_folder_says_where_it_should_be(tmp_path):
    from ohem_d2.data.bccd import load_bccd_instances

    with pytest.raises(FileNotFoundError, match="datasets/bccd"):
        load_bccd_instances(str(tmp_path), "test", "bccd_test")


def test_shipped_proposals_cover_every_image_and_the_generator_reproduces_them(bccd):
    for split, name in (("trainval", "bccd_trainval"), ("test", "bccd_test")):
        proposals = read_proposal_file(bccd_proposal_file(None, split))
        assert proposals.ids == [r["image_id"] for r in bccd[name]]
        assert min(len(b) for b in proposals.boxes) > 100
    shipped = read_proposal_file(bccd_proposal_file(None, "test"))
    for k in (0, 35, 71):
        path = os.path.join(ROOT, "JPEGImages", f"{shipped.ids[k]}.jpg")
        boxes = selective_search_boxes(cv2.imread(path), mode="fast", min_size=BCCD_MIN_SIZE)
        np.testing.assert_array_equal(boxes, shipped.boxes[k])


def test_held_out_split_is_the_datasets_own_partition_of_trainval(bccd):
    # BCCD's ImageSets/Main/{train,val}.txt: 205 + 87 images, together exactly trainval.
    train, val = DatasetCatalog.get("bccd_train"), DatasetCatalog.get("bccd_val")
    ids = {
        name: [r["image_id"] for r in records]
        for name, records in (("train", train), ("val", val), ("trainval", bccd["bccd_trainval"]))
    }
    assert (len(ids["train"]), len(ids["val"])) == (205, 87)
    assert not set(ids["train"]) & set(ids["val"])
    assert set(ids["train"]) | set(ids["val"]) == set(ids["trainval"])
    assert not set(ids["val"]) & {r["image_id"] for r in bccd["bccd_test"]}
    with open(os.path.join(ROOT, "ImageSets", "Main", "val.txt")) as f:
        assert ids["val"] == f.read().split()
    # Same cleaning as trainval, image by image (its 9 dropped boxes fall in one or the other).
    by_id = {r["image_id"]: r["annotations"] for r in bccd["bccd_trainval"]}
    for record in train + val:
        assert record["annotations"] == by_id[record["image_id"]]
    # Both read their proposals from trainval's shipped file, which holds every one of them.
    assert bccd_proposal_file(None, "val") == bccd_proposal_file(None, "trainval")
    shipped = set(read_proposal_file(bccd_proposal_file(None, "train")).ids)
    assert set(ids["train"]) | set(ids["val"]) <= shipped
    with pytest.raises(ValueError, match="split must be one of"):
        bccd_proposal_file(None, "validation")
