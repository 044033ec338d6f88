"""The toy dataset ohem_toy: deterministic, idempotent, and readable by Detectron2."""

import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ohem_d2.data.proposal_io import load_proposals_into_dataset_dicts
from ohem_d2.data.toy import (
    TOY_CLASS_NAMES,
    TOY_DATASET_NAMES,
    register_toy_dataset,
    toy_proposal_file,
)
from ohem_d2.proposals.toy import generate_toy_dataset

# Image indices 3 and 9 are the "small objects" and "low contrast" hard cases.
TINY = {"num_trainval": 10, "num_test": 3, "seed": 5}


def _files(root):
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy") / "ohem_toy")
    return generate_toy_dataset(root, workers=2, progress=False, **TINY)


@pytest.fixture
def registered(toy_root):
    """Register the toy dataset's names for ``toy_root``, and unregister them afterwards."""
    names = register_toy_dataset(toy_root)
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_same_seed_same_bytes_and_generation_is_idempotent(toy_root, tmp_path):
    files = _files(toy_root)
    assert sum(name.startswith("JPEGImages") for name in files) == 13
    for split in ("trainval", "test"):
        assert os.path.relpath(toy_proposal_file(toy_root, split), toy_root) in files

    other = generate_toy_dataset(str(tmp_path / "again"), workers=1, progress=False, **TINY)
    assert _files(other) == files

    mtimes = {name: os.stat(os.path.join(toy_root, name)).st_mtime_ns for name in files}
    generate_toy_dataset(toy_root, workers=1, progress=False, **TINY)
    assert {n: os.stat(os.path.join(toy_root, n)).st_mtime_ns for n in files} == mtimes


def test_other_parameters_regenerate(tmp_path):
    root = str(tmp_path / "toy")
    generate_toy_dataset(root, num_trainval=2, num_test=2, proposals=False, progress=False)
    first = _files(root)
    generate_toy_dataset(root, num_trainval=2, num_test=2, seed=1, proposals=False, progress=False)
    second = _files(root)
    assert first.keys() == second.keys()
    assert first["JPEGImages/000001.jpg"] != second["JPEGImages/000001.jpg"]


def test_loads_through_detectron2_with_classes_and_boxes_inside_images(toy_root, registered):
    assert set(registered) == set(TOY_DATASET_NAMES)
    for name, split in TOY_DATASET_NAMES.items():
        metadata = MetadataCatalog.get(name)
        assert metadata.thing_classes == list(TOY_CLASS_NAMES)
        assert metadata.year == 2007 and metadata.split == split
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == TINY["num_" + split]
        for record in dicts:
            with Image.open(record["file_name"]) as image:
                assert image.size == (record["width"], record["height"])
                assert image.mode == "RGB"
            assert 160 <= record["width"] <= 224 and 160 <= record["height"] <= 224
            assert record["annotations"], record["file_name"]
            for annotation in record["annotations"]:
                x1, y1, x2, y2 = annotation["bbox"]
                assert 0 <= x1 < x2 <= record["width"] and 0 <= y1 < y2 <= record["height"]
                assert 0 <= annotation["category_id"] < len(TOY_CLASS_NAMES)
        with_proposals = load_proposals_into_dataset_dicts(
            dicts, toy_proposal_file(toy_root, split)
        )
        assert all(len(r["proposal_boxes"]) >= 10 for r in with_proposals)
    # Every class occurs; the small-object hard case (image index 3) has small boxes.
    trainval = DatasetCatalog.get("ohem_toy_trainval")
    classes = {a["category_id"] for r in trainval for a in r["annotations"]}
    assert classes == set(range(len(TOY_CLASS_NAMES)))
    small = trainval[3]["annotations"]
    assert max(min(a["bbox"][2] - a["bbox"][0], a["bbox"][3] - a["bbox"][1]) for a in small) < 24


def test_voc_files_are_well_formed(toy_root):
    tree = ET.parse(os.path.join(toy_root, "Annotations", "000001.xml"))
    image = np.asarray(Image.open(os.path.join(toy_root, "JPEGImages", "000001.jpg")))
    assert int(tree.find("size/width").text) == image.shape[1]
    for obj in tree.findall("object"):
        assert obj.find("name").text in TOY_CLASS_NAMES
        assert obj.find("difficult").text in ("0", "1")
        box = obj.find("bndbox")
        x1, y1, x2, y2 = (int(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        assert 1 <= x1 <= x2 <= image.shape[1] and 1 <= y1 <= y2 <= image.shape[0]
    for split in ("trainval", "test"):
        with open(os.path.join(toy_root, "ImageSets", "Main", f"{split}.txt")) as f:
            assert len(f.read().split()) == TINY["num_" + split] > 1


def _iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_boxes_match_the_pixels_selective_search_sees(toy_root, registered):
    """Independent check of the annotations: selective search, which sees only the pixels,
    finds most annotated objects (IoU >= 0.5), as it does on real images."""
    best = []
    for name, split in TOY_DATASET_NAMES.items():
        dicts = load_proposals_into_dataset_dicts(
            DatasetCatalog.get(name), toy_proposal_file(toy_root, split)
        )
        for record in dicts:
            gt = np.array([a["bbox"] for a in record["annotations"]], dtype=np.float64)
            best.extend(_iou(gt, record["proposal_boxes"].astype(np.float64)).max(axis=1))
    assert np.mean(np.array(best) >= 0.5) >= 0.8


def test_registration_conflict_and_foreign_directory_are_refused(toy_root, registered, tmp_path):
    assert register_toy_dataset(toy_root) == registered  # idempotent
    with pytest.raises(ValueError, match="already registered with dirname"):
        register_toy_dataset(str(tmp_path / "elsewhere"))
    foreign = tmp_path / "VOC2007"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(RuntimeError, match="not made by the ohem_toy generator"):
        generate_toy_dataset(str(foreign), num_trainval=2, num_test=2, progress=False)
    assert (foreign / "precious.txt").read_text() == "user data"


def test_one_image_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2 images"):
        generate_toy_dataset(str(tmp_path / "t"), num_trainval=1, num_test=2)
