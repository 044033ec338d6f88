"""Proposal files: the safe .npz format, trusted pickles, and loading into dataset dicts."""

import pickle

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.data.build import load_proposals_into_dataset
from detectron2.data.detection_utils import transform_proposals
from detectron2.structures import BoxMode

from ohem_d2.data.proposal_io import (
    ProposalFileError,
    load_proposals_into_dataset_dicts,
    read_proposal_file,
    save_proposals_npz,
)


def _records(n=3, height=60, width=80):
    return [
        {"file_name": f"/img/{i}.jpg", "image_id": f"im{i}", "height": height, "width": width}
        for i in range(n)
    ]


def _random_proposals(rng, n=3, k=7, height=60, width=80):
    ids, boxes, scores = [], [], []
    for i in range(n):
        xy = rng.uniform(0, [width - 10, height - 10], size=(k, 2))
        wh = rng.uniform(2, 10, size=(k, 2))
        boxes.append(np.concatenate([xy, xy + wh], axis=1).astype(np.float32))
        scores.append(rng.normal(size=k).astype(np.float32))
        ids.append(f"im{i}")
    return ids, boxes, scores


def _write_raw_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _valid_arrays():
    return {
        "ids": np.array(["im0", "im1", "im2"]),
        "counts": np.array([1, 1, 1], dtype=np.int64),
        "boxes": np.array([[1, 2, 10, 12]] * 3, dtype=np.float32),
        "scores": np.zeros(3, dtype=np.float32),
        "bbox_mode": np.array(0),
        "format_version": np.array(1),
    }


def test_npz_round_trip_and_bytes_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    ids, boxes, scores = _random_proposals(rng)
    a = save_proposals_npz(str(tmp_path / "a.npz"), ids, boxes, scores)
    b = save_proposals_npz(str(tmp_path / "b.npz"), ids, boxes, scores)
    assert open(a, "rb").read() == open(b, "rb").read()
    with np.load(a, allow_pickle=False) as raw:
        assert raw["ids"].dtype.kind == "U" and raw["boxes"].dtype == np.float32
        assert raw["counts"].tolist() == [7, 7, 7] and int(raw["bbox_mode"]) == 0
    read = read_proposal_file(a)
    assert read.ids == ids and read.bbox_mode == BoxMode.XYXY_ABS
    for got, want in zip(read.boxes, boxes):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(read.scores, scores):
        np.testing.assert_array_equal(got, want)


def test_loader_sorts_stably_by_descending_score_and_converts_xywh(tmp_path):
    boxes = np.array([[0, 0, 5, 5], [1, 1, 5, 5], [2, 2, 5, 5], [3, 3, 5, 5]], np.float32)
    scores = np.array([0.5, 2.0, 0.5, 1.0], np.float32)
    path = save_proposals_npz(
        str(tmp_path / "p.npz"), ["im0"], [boxes], [scores], bbox_mode=BoxMode.XYWH_ABS
    )
    records = _records(1)
    (out,) = load_proposals_into_dataset_dicts(records, path)
    assert "proposal_boxes" not in records[0], "inputs must not be modified"
    # Order 1, 3, then the tie 0, 2 in file order; XYWH -> XYXY.
    expected = np.array([[1, 1, 6, 6], [3, 3, 8, 8], [0, 0, 5, 5], [2, 2, 7, 7]], np.float32)
    np.testing.assert_array_equal(out["proposal_boxes"], expected)
    np.testing.assert_array_equal(out["proposal_objectness_logits"], [2.0, 1.0, 0.5, 0.5])
    assert out["proposal_boxes"].dtype == np.float32
    assert out["proposal_objectness_logits"].dtype == np.float32
    assert out["proposal_bbox_mode"] == BoxMode.XYXY_ABS


def test_loader_output_feeds_detectron2_transform_proposals(tmp_path):
    rng = np.random.default_rng(1)
    ids, boxes, scores = _random_proposals(rng, n=1, k=20)
    path = save_proposals_npz(str(tmp_path / "p.npz"), ids, boxes, scores)
    (record,) = load_proposals_into_dataset_dicts(_records(1), path)
    transforms = T.TransformList([T.ResizeTransform(60, 80, 120, 160), T.HFlipTransform(160)])
    transform_proposals(record, (120, 160), transforms, proposal_topk=5)
    proposals = record["proposals"]
    assert len(proposals) == 5 and proposals.image_size == (120, 160)
    order = np.argsort(-scores[0], kind="stable")[:5]
    b = boxes[0][order] * 2
    expected = np.stack([160 - b[:, 2], b[:, 1], 160 - b[:, 0], b[:, 3]], axis=1)
    torch.testing.assert_close(proposals.proposal_boxes.tensor, torch.from_numpy(expected))
    torch.testing.assert_close(proposals.objectness_logits, torch.from_numpy(scores[0][order]))


def test_trusted_pickle_matches_npz_and_detectron2_loader(tmp_path):
    rng = np.random.default_rng(2)
    ids, boxes, scores = _random_proposals(rng)
    npz = save_proposals_npz(str(tmp_path / "p.npz"), ids, boxes, scores)
    pkl = tmp_path / "p.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"ids": ids, "boxes": boxes, "objectness_logits": scores}, f)
    from_npz = load_proposals_into_dataset_dicts(_records(), npz)
    from_pkl = load_proposals_into_dataset_dicts(_records(), str(pkl), trusted=True)
    reference = load_proposals_into_dataset(_records(), str(pkl))  # Detectron2's own
    for a, b, ref in zip(from_npz, from_pkl, reference):
        for key in ("proposal_boxes", "proposal_objectness_logits"):
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], ref[key])
        assert a["proposal_bbox_mode"] == b["proposal_bbox_mode"] == ref["proposal_bbox_mode"]


class _Exploit:
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_refused_unless_trusted_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ids": [_Exploit()]}, f)
    with pytest.raises(ProposalFileError) as e:
        load_proposals_into_dataset_dicts(_records(), str(path))
    message = str(e.value)
    assert str(path) in message and "DATASETS.PROPOSAL_FILES_TRUSTED" in message
    assert ".npz" in message and "arbitrary code" in message
    assert not marker.exists()
    # The same file does run code once trusted: this is what the refusal prevents.
    with pytest.raises(ProposalFileError):
        read_proposal_file(str(path), trusted=True)
    assert marker.exists()


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.npz")
    with pytest.raises(ProposalFileError, match="nope.npz.*does not exist"):
        load_proposals_into_dataset_dicts(_records(), path)


def test_images_missing_from_file_are_named_and_counted(tmp_path):
    path = save_proposals_npz(
        str(tmp_path / "other.npz"), ["im0"], [np.ones((1, 4)) * [0, 0, 5, 5]], [[0.0]]
    )
    with pytest.raises(ProposalFileError) as e:
        load_proposals_into_dataset_dicts(_records(8), path)
    message = str(e.value)
    assert "other.npz" in message and "7 of the 8 images" in message
    assert "'im1', 'im2', 'im3', 'im4', 'im5', ..." in message and "another dataset" in message


def test_image_with_zero_proposals(tmp_path):
    boxes = [np.array([[0, 0, 5, 5]]), np.zeros((0, 4)), np.array([[0, 0, 5, 5]])]
    path = save_proposals_npz(str(tmp_path / "p.npz"), ["im0", "im1", "im2"], boxes, [[0], [], [0]])
    with pytest.raises(ProposalFileError, match=r"p\.npz.*zero proposals.*'im1' \(/img/1\.jpg\)"):
        load_proposals_into_dataset_dicts(_records(), path)


@pytest.mark.parametrize(
    "key, change, expected",
    [
        ("scores", None, r"lacks the key\(s\) \['scores'\]"),
        ("boxes", np.zeros((3, 3), np.float32), r"key 'boxes' must be an \(M, 4\) float"),
        ("ids", np.array([0, 1, 2]), r"key 'ids' must be a 1-d array of unicode strings"),
        ("counts", np.array([1, 1, 2]), r"key 'counts' sums to 4"),
        ("counts", np.array([1.0, 1.0, 1.0]), r"key 'counts' must be"),
        ("scores", np.zeros(2, np.float32), r"key 'scores' must be \(3,\) floats"),
        ("bbox_mode", np.array(2), r"key 'bbox_mode' is XYXY_REL"),
        ("format_version", np.array(7), r"key 'format_version' is 7"),
    ],
)
def test_malformed_npz_names_the_key(tmp_path, key, change, expected):
    arrays = _valid_arrays()
    if change is None:
        del arrays[key]
    else:
        arrays[key] = change
    path = _write_raw_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ProposalFileError, match=r"bad\.npz.*" + expected):
        load_proposals_into_dataset_dicts(_records(), path)


def test_object_array_npz_is_not_unpickled(tmp_path):
    arrays = _valid_arrays()
    arrays["ids"] = np.array(["im0", "im1", "im2"], dtype=object)
    path = _write_raw_npz(tmp_path / "obj.npz", **arrays)
    with pytest.raises(ProposalFileError, match=r"obj\.npz.*cannot be read safely"):
        read_proposal_file(path)


@pytest.mark.parametrize(
    "bad_box, expected",
    [
        ([1, np.nan, 5, 5], "NaN or infinite box coordinates for image 'im1'"),
        ([1, 1, np.inf, 5], "NaN or infinite box coordinates for image 'im1'"),
        ([6, 1, 5, 5], r"1 box\(es\) with x2 < x1 or y2 < y1 for image 'im1'"),
        ([1, 6, 5, 5], r"1 box\(es\) with x2 < x1 or y2 < y1 for image 'im1'"),
        ([1, 1, 200, 5], r"far outside image 'im1' \(/img/1\.jpg\) of size 80x60"),
        ([-30, 1, 5, 5], r"far outside image 'im1'"),
    ],
)
def test_bad_boxes_name_the_image(tmp_path, bad_box, expected):
    good = np.array([[0, 0, 5, 5]], np.float32)
    bad = np.array([[0, 0, 5, 5], bad_box], np.float32)
    path = save_proposals_npz(
        str(tmp_path / "p.npz"), ["im0", "im1", "im2"], [good, bad, good], [[0], [0, 1], [0]]
    )
    with pytest.raises(ProposalFileError, match=r"p\.npz.*" + expected):
        load_proposals_into_dataset_dicts(_records(), path)


def test_boxes_slightly_outside_are_clipped(tmp_path):
    boxes = np.array([[-2, -1, 81, 62], [10, 10, 20, 20]], np.float32)
    path = save_proposals_npz(str(tmp_path / "p.npz"), ["im0"], [boxes], [[1.0, 0.0]])
    (out,) = load_proposals_into_dataset_dicts(_records(1), path)
    np.testing.assert_array_equal(out["proposal_boxes"], [[0, 0, 80, 60], [10, 10, 20, 20]])
    # Without a known image size there is nothing to clip to.
    (out,) = load_proposals_into_dataset_dicts([{"image_id": "im0"}], path)
    np.testing.assert_array_equal(out["proposal_boxes"], boxes)


def test_duplicate_ids_refused(tmp_path):
    box = np.array([[0, 0, 5, 5]], np.float32)
    path = save_proposals_npz(str(tmp_path / "p.npz"), ["im0", "im0"], [box, box], [[0], [0]])
    with pytest.raises(ProposalFileError, match=r"more than once, e\.g\. 'im0'"):
        load_proposals_into_dataset_dicts(_records(1), path)


def test_integer_image_ids_match_their_string_form(tmp_path):
    box = np.array([[0, 0, 5, 5]], np.float32)
    path = save_proposals_npz(str(tmp_path / "p.npz"), [7, 9], [box, box], [[0], [0]])
    records = [{"image_id": 9, "height": 10, "width": 10}]
    (out,) = load_proposals_into_dataset_dicts(records, path)
    assert out["image_id"] == 9 and len(out["proposal_boxes"]) == 1
