"""ohem_d2.visualize: detections of a tiny toy model drawn into PNGs."""

import os
import shutil

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from helpers import DEVICE, REPO
from PIL import Image

from ohem_d2.data.proposal_io import read_proposal_file
from ohem_d2.data.toy import toy_proposal_file
from ohem_d2.visualize import build_visualize_cfg, main

CONFIG = os.path.join(REPO, "configs", "toy", "frcn.yaml")


@pytest.fixture(scope="module")
def toy_weights(tmp_path_factory):
    """A randomly initialised toy model saved with DetectionCheckpointer."""
    torch.manual_seed(0)
    model = build_model(build_visualize_cfg(CONFIG, []))
    save_dir = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(model, save_dir=str(save_dir)).save("toy")
    return str(save_dir / "toy.pth")


def _test_image(root, k=0):
    image_id = read_proposal_file(toy_proposal_file(root, "test")).ids[k]
    return image_id, os.path.join(root, "JPEGImages", f"{image_id}.jpg")


def _run(inputs, out_dir, weights, *extra):
    args = ["--config-file", CONFIG, "--input", *inputs, "--output", str(out_dir)]
    return main(
        [*args, "--confidence", "0", *extra, "MODEL.WEIGHTS", weights, "MODEL.DEVICE", DEVICE]
    )


def test_selective_search_on_the_fly(tmp_path, small_toy_registered, toy_weights, capsys):
    image_id, image = _test_image(small_toy_registered)
    assert _run([image], tmp_path, toy_weights, "--ss-min-size", "8") == 0
    png = tmp_path / f"{image_id}.png"
    with Image.open(png) as drawn, Image.open(image) as original:
        assert drawn.format == "PNG" and drawn.size == original.size
    out = capsys.readouterr().out
    assert "wrote 1 of 1 image(s)" in out and "0 skipped" in out


def test_proposals_from_npz(tmp_path, small_toy_registered, toy_weights, capsys):
    npz = toy_proposal_file(small_toy_registered, "test")
    image_id, image = _test_image(small_toy_registered, k=1)
    count = len(read_proposal_file(npz).boxes[1])
    assert _run([image], tmp_path, toy_weights, "--proposals", npz) == 0
    assert (tmp_path / f"{image_id}.png").is_file()
    assert f"{count} proposals" in capsys.readouterr().out


def test_corrupt_and_unknown_images_are_skipped(
    tmp_path, small_toy_registered, toy_weights, capsys
):
    npz = toy_proposal_file(small_toy_registered, "test")
    image_id, image = _test_image(small_toy_registered)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(open(image, "rb").read()[:200])  # a truncated JPEG
    unknown = tmp_path / "not_in_file.jpg"  # readable, but its id is not in the npz
    shutil.copy(image, unknown)
    out_dir = tmp_path / "out"
    assert _run([str(corrupt), image, str(unknown)], out_dir, toy_weights, "--proposals", npz) == 0
    captured = capsys.readouterr()
    assert f"skipped {corrupt}: unreadable or corrupt image" in captured.err
    assert f"skipped {unknown}:" in captured.err and "'not_in_file'" in captured.err
    assert "wrote 1 of 3 image(s)" in captured.out and "2 skipped" in captured.out
    assert sorted(os.listdir(out_dir)) == [f"{image_id}.png"]
    # Nothing drawn at all: a failure.
    assert _run([str(corrupt)], out_dir, toy_weights, "--proposals", npz) == 1


def test_weights_that_do_not_fit_the_config_are_refused(
    tmp_path, small_toy_registered, toy_weights
):
    _, image = _test_image(small_toy_registered)
    args = ["--config-file", CONFIG, "--input", image, "--output", str(tmp_path)]
    assert main([*args, "MODEL.WEIGHTS", toy_weights, "MODEL.ROI_HEADS.NUM_CLASSES", "2"]) == 1
    assert main([*args, "MODEL.WEIGHTS", str(tmp_path / "missing.pth")]) == 1
    assert os.listdir(tmp_path) == []
