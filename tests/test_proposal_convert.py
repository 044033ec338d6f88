"""Converters of Fast R-CNN .mat files and Detectron pickles into the safe .npz format."""

import pickle

import numpy as np
import pytest
import scipy.io
from detectron2.structures import BoxMode

from ohem_d2.data.catalog import registered_dataset_dicts
from ohem_d2.data.proposal_io import (
    ProposalFileError,
    clean_boxes,
    load_proposals_into_dataset_dicts,
    read_proposal_file,
)
from ohem_d2.proposals.convert import convert_detectron_pickle, convert_fast_rcnn_mat, main


@pytest.fixture
def toy_test_dicts(small_toy_registered):
    return registered_dataset_dicts("ohem_toy_test")


def _random_mat_boxes(rng, height, width, k=5):
    """(k, 4) 1-based inclusive y1 x1 y2 x2 boxes inside an image, as in Fast R-CNN files."""
    x1 = rng.integers(1, width // 2, k)
    y1 = rng.integers(1, height // 2, k)
    x2 = rng.integers(width // 2 + 1, width + 1, k)
    y2 = rng.integers(height // 2 + 1, height + 1, k)
    return np.stack([y1, x1, y2, x2], axis=1).astype(np.uint16)


def _write_mat(path, boxes_per_image, image_ids=None):
    cells = np.empty((1, len(boxes_per_image)), dtype=object)
    for i, boxes in enumerate(boxes_per_image):
        cells[0, i] = boxes
    variables = {"boxes": cells}
    if image_ids is not None:
        images = np.empty((len(image_ids), 1), dtype=object)
        images[:, 0] = list(image_ids)
        variables["images"] = images
    scipy.io.savemat(str(path), variables)
    return str(path)


def _by_id(npz_path):
    proposals = read_proposal_file(npz_path)
    assert proposals.bbox_mode == BoxMode.XYXY_ABS
    return {i: (b, s) for i, b, s in zip(proposals.ids, proposals.boxes, proposals.scores)}


def test_mat_round_trip_equals_hand_conversion(tmp_path, toy_test_dicts):
    rng = np.random.default_rng(0)
    ids = [str(r["image_id"]) for r in toy_test_dicts]
    raw = {r["image_id"]: _random_mat_boxes(rng, r["height"], r["width"]) for r in toy_test_dicts}
    # The file's order differs from the dataset's: boxes follow their ids.
    mat = _write_mat(tmp_path / "ss.mat", [raw[i] for i in reversed(ids)], list(reversed(ids)))
    stats = convert_fast_rcnn_mat(mat, toy_test_dicts, str(tmp_path / "ss.npz"))

    converted = _by_id(tmp_path / "ss.npz")
    assert list(converted) == ids  # written in the dataset's order
    for image_id in ids:
        y1, x1, y2, x2 = raw[image_id].astype(np.float32).T
        expected = np.stack([x1 - 1, y1 - 1, x2, y2], axis=1)  # Detectron2's VOC convention
        boxes, scores = converted[image_id]
        np.testing.assert_array_equal(boxes, expected)
        np.testing.assert_array_equal(scores, -np.arange(len(expected), dtype=np.float32))
    assert (stats.images, stats.boxes_in, stats.boxes_out) == (len(ids), 5 * len(ids), 5 * len(ids))
    assert (stats.clipped, stats.dropped) == (0, 0)
    # The result loads for its dataset with the project's checked loader.
    loaded = load_proposals_into_dataset_dicts(toy_test_dicts, str(tmp_path / "ss.npz"))
    assert all(len(r["proposal_boxes"]) == 5 for r in loaded)


def test_mat_without_images_follows_the_dataset_order(tmp_path, toy_test_dicts):
    rng = np.random.default_rng(1)
    raw = [_random_mat_boxes(rng, r["height"], r["width"], k=3) for r in toy_test_dicts]
    mat = _write_mat(tmp_path / "ss.mat", raw)
    convert_fast_rcnn_mat(mat, toy_test_dicts, str(tmp_path / "ss.npz"))
    converted = _by_id(tmp_path / "ss.npz")
    for record, boxes in zip(toy_test_dicts, raw):
        np.testing.assert_array_equal(converted[record["image_id"]][0][:, 0], boxes[:, 1] - 1.0)


def test_mat_clipping_and_dropping_counts(tmp_path, toy_test_dicts, capsys):
    rng = np.random.default_rng(2)
    first = toy_test_dicts[0]
    h, w = first["height"], first["width"]
    special = np.array(
        [
            [1, 1, h, w],  # the whole image: kept as is
            [2, 3, h + 1, w + 2],  # 1-2 px outside: clipped
            [5, 5, 4, 20],  # y2 < y1 in the file: empty, dropped
            [1, w + 1, 10, w + 3],  # right of the image: empty after clipping, dropped
            [np.nan, 1, 10, 10],  # NaN: dropped
        ],
        dtype=np.float64,
    )
    raw = [special] + [
        _random_mat_boxes(rng, r["height"], r["width"]).astype(np.float64)
        for r in toy_test_dicts[1:]
    ]
    ids = [str(r["image_id"]) for r in toy_test_dicts]
    mat = _write_mat(tmp_path / "ss.mat", raw, ids)
    out = str(tmp_path / "ss.npz")
    assert (
        main(
            ["--from", "fast-rcnn-mat", "--in", mat, "--dataset", "ohem_toy_test"] + ["--out", out]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "clipped 1 box(es)" in printed
        and "dropped 3 (2 empty after clipping, 1 NaN/inf)" in printed
    )

    boxes, scores = _by_id(out)[str(first["image_id"])]
    np.testing.assert_array_equal(boxes, [[0, 0, w, h], [2, 1, w, h]])
    np.testing.assert_array_equal(scores, [0, -1])  # the file's rank of the kept boxes
    # The same counts are returned by the API.
    stats = convert_fast_rcnn_mat(mat, toy_test_dicts, out)
    assert (stats.clipped, stats.dropped_empty, stats.dropped_nonfinite) == (1, 2, 1)
    assert stats.boxes_in - stats.boxes_out == 3


def test_boxes_far_outside_are_refused_unless_asked(tmp_path, toy_test_dicts):
    h, w = toy_test_dicts[0]["height"], toy_test_dicts[0]["width"]
    with pytest.raises(ProposalFileError, match=r"far outside the image of size"):
        clean_boxes(np.array([[0, 0, w + 50, h]]), h, w, where="x")
    kept, keep, counts = clean_boxes(np.array([[0, 0, w + 50, h]]), h, w, clip_far_outside=True)
    np.testing.assert_array_equal(kept, [[0, 0, w, h]])
    assert counts["far_outside"] == 1 and counts["clipped"] == 1


def test_mat_with_another_image_count_is_refused(tmp_path, toy_test_dicts):
    rng = np.random.default_rng(3)
    n = len(toy_test_dicts)
    raw = [_random_mat_boxes(rng, r["height"], r["width"]) for r in toy_test_dicts[:-1]]
    mat = _write_mat(tmp_path / "short.mat", raw)
    with pytest.raises(ProposalFileError, match=rf"boxes for {n - 1} images .* has {n} images"):
        convert_fast_rcnn_mat(mat, toy_test_dicts, str(tmp_path / "out.npz"))
    ids = [str(r["image_id"]) for r in toy_test_dicts[:-1]]
    mat = _write_mat(tmp_path / "short_ids.mat", raw, ids)
    with pytest.raises(ProposalFileError, match=rf"for {n - 1} images but the dataset has {n}"):
        convert_fast_rcnn_mat(mat, toy_test_dicts, str(tmp_path / "out.npz"))
    assert not (tmp_path / "out.npz").exists()


def test_mat_of_another_image_set_is_refused(tmp_path, toy_test_dicts, small_toy_registered):
    rng = np.random.default_rng(4)
    trainval = registered_dataset_dicts("ohem_toy_trainval")
    other = trainval[: len(toy_test_dicts)]
    raw = [_random_mat_boxes(rng, r["height"], r["width"]) for r in other]
    mat = _write_mat(tmp_path / "trainval.mat", raw, [str(r["image_id"]) for r in other])
    with pytest.raises(ProposalFileError, match=r"not in the dataset.*'000001', '000002'"):
        convert_fast_rcnn_mat(mat, toy_test_dicts, str(tmp_path / "out.npz"))


def _detectron2_pickle(path, dicts, rng):
    ids, boxes, logits = [], [], []
    for r in dicts:
        xy = rng.uniform(0, [r["width"] - 30, r["height"] - 30], size=(4, 2))
        wh = rng.uniform(5, 25, size=(4, 2))
        boxes.append(np.concatenate([xy, wh], axis=1).astype(np.float32))  # XYWH_ABS
        logits.append(rng.normal(size=4).astype(np.float32))
        ids.append(r["image_id"])
    data = {"ids": ids, "boxes": boxes, "objectness_logits": logits, "bbox_mode": 1}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)
    return data


def test_pickle_needs_trusted_and_converts(tmp_path, toy_test_dicts, capsys):
    rng = np.random.default_rng(5)
    pkl = str(tmp_path / "props.pkl")
    data = _detectron2_pickle(pkl, toy_test_dicts, rng)
    out = str(tmp_path / "props.npz")
    with pytest.raises(ProposalFileError, match="arbitrary code"):
        convert_detectron_pickle(pkl, toy_test_dicts, out)
    args = ["--from", "detectron-pkl", "--in", pkl, "--dataset", "ohem_toy_test", "--out", out]
    assert main(args) == 2
    assert "--trusted" in capsys.readouterr().err
    assert not (tmp_path / "props.npz").exists()

    assert main(args + ["--trusted"]) == 0
    converted = _by_id(out)
    for image_id, xywh, logits in zip(data["ids"], data["boxes"], data["objectness_logits"]):
        x, y, bw, bh = xywh.T
        boxes, scores = converted[image_id]
        np.testing.assert_allclose(boxes, np.stack([x, y, x + bw, y + bh], axis=1), rtol=1e-6)
        np.testing.assert_array_equal(scores, logits)


def test_detectron1_pickle_with_scores(tmp_path, toy_test_dicts):
    # One box 1 px right of the image (clipped), one of zero width (dropped), per image.
    boxes = [np.array([[1.0, 2.0, r["width"] + 1.0, 30.0], [4, 4, 4, 9]]) for r in toy_test_dicts]
    data = {
        "ids": [r["image_id"] for r in toy_test_dicts],
        "boxes": boxes,
        "scores": [np.array([0.9, 0.5])] * len(toy_test_dicts),
        "cfg": "unused",
    }
    pkl = tmp_path / "d1.pkl"
    pkl.write_bytes(pickle.dumps(data, protocol=2))
    out = str(tmp_path / "d1.npz")
    stats = convert_detectron_pickle(str(pkl), toy_test_dicts, out, trusted=True)
    assert (stats.clipped, stats.dropped_empty) == (len(toy_test_dicts), len(toy_test_dicts))
    converted = _by_id(out)
    for record in toy_test_dicts:
        boxes, scores = converted[record["image_id"]]
        np.testing.assert_array_equal(boxes, [[1, 2, record["width"], 30]])
        np.testing.assert_allclose(scores, [0.9])


def test_mat_ids_given_as_file_names(tmp_path, toy_test_dicts):
    rng = np.random.default_rng(6)
    raw = [_random_mat_boxes(rng, r["height"], r["width"], k=2) for r in toy_test_dicts]
    names = [f"JPEGImages/{r['image_id']}.jpg" for r in toy_test_dicts]
    mat = _write_mat(tmp_path / "ss.mat", raw, names)
    stats = convert_fast_rcnn_mat(mat, toy_test_dicts, str(tmp_path / "ss.npz"))
    assert stats.images == len(toy_test_dicts)
    assert list(_by_id(tmp_path / "ss.npz")) == [str(r["image_id"]) for r in toy_test_dicts]
