"""Selective search: boxes of one image, resumable and deterministic files, corrupt images."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ohem_d2.data.proposal_io import read_proposal_file
from ohem_d2.proposals.compute import compute_proposal_file
from ohem_d2.proposals.search import selective_search_boxes
from ohem_d2.proposals.selective_search import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scene(seed, height=96, width=128):
    """A noisy background with a few flat rectangles and disks (RGB uint8)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(120, 25, (height, width, 3))
    ys, xs = np.mgrid[0:height, 0:width]
    for _ in range(4):
        x, y = rng.integers(0, width - 24), rng.integers(0, height - 24)
        w, h = rng.integers(14, 40, size=2)
        colour = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            image[y : y + h, x : x + w] = colour
        else:
            image[(xs - x) ** 2 + (ys - y) ** 2 < (w // 2) ** 2] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ss_images")
    images = []
    for i in range(6):
        path = directory / f"img{i}.png"
        Image.fromarray(_scene(i)).save(path)
        images.append((f"img{i}", str(path)))
    return images


def test_boxes_of_one_image_are_filtered_unique_and_repeatable():
    image, other = _scene(0)[..., ::-1].copy(), _scene(1)[..., ::-1].copy()
    boxes = selective_search_boxes(image, min_size=8)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) > 10
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sides.min() >= 8
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    # OpenCV ranks with C's rand(): the order must not depend on what ran before.
    selective_search_boxes(other, min_size=8)
    np.testing.assert_array_equal(selective_search_boxes(image, min_size=8), boxes)
    assert len(selective_search_boxes(image, min_size=8, max_boxes=5)) == 5
    np.testing.assert_array_equal(selective_search_boxes(image, min_size=8, max_boxes=5), boxes[:5])


def test_interrupted_and_resumed_run_gives_the_same_file(tmp_path, image_files):
    whole = str(tmp_path / "whole.npz")
    run = compute_proposal_file(image_files, whole, min_size=8, workers=1, progress=False)
    assert run.complete and run.computed == 6 and run.reused == 0 and not run.skipped
    proposals = read_proposal_file(whole)
    assert proposals.ids == [i for i, _ in image_files]
    for scores in proposals.scores:
        np.testing.assert_array_equal(scores, -np.arange(len(scores), dtype=np.float32))

    out = str(tmp_path / "resumed.npz")
    partial = out + ".partial"
    run = compute_proposal_file(
        image_files, out, min_size=8, workers=1, stop_after=2, progress=False
    )
    assert not run.complete and run.computed == 2 and not os.path.exists(out)
    assert os.path.isdir(partial)

    # Ctrl-C in the middle of the next run: what finished is flushed, then it propagates.
    seen = []

    def interrupt(image_id):
        seen.append(image_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_proposal_file(
            image_files, out, min_size=8, workers=1, progress=False, on_image_done=interrupt
        )
    assert not os.path.exists(out)

    run = compute_proposal_file(image_files, out, min_size=8, workers=2, progress=False)
    assert run.complete and run.reused == 4 and run.computed == 2
    assert not os.path.exists(partial)
    assert open(out, "rb").read() == open(whole, "rb").read()


def test_resume_with_other_settings_is_refused(tmp_path, image_files):
    out = str(tmp_path / "p.npz")
    compute_proposal_file(image_files, out, min_size=8, workers=1, stop_after=1, progress=False)
    with pytest.raises(RuntimeError, match=r"p\.npz\.partial.*min_size differ"):
        compute_proposal_file(image_files, out, min_size=4, workers=1, progress=False)
    run = compute_proposal_file(
        image_files[:2], out, min_size=4, workers=1, progress=False, discard_stale_partial=True
    )
    assert run.complete and run.reused == 0


def test_corrupt_image_is_skipped_and_counted(tmp_path, image_files):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 10)
    images = [image_files[0], ("broken", str(corrupt)), image_files[1]]
    out = str(tmp_path / "p.npz")
    run = compute_proposal_file(images, out, min_size=8, workers=2, progress=False)
    assert run.complete and run.computed == 2
    assert [(i, p) for i, p, _ in run.skipped] == [("broken", str(corrupt))]
    assert "unreadable" in run.skipped[0][2]
    assert read_proposal_file(out).ids == ["img0", "img1"]


def test_cli_on_the_toy_dataset_reproduces_its_proposal_file(tmp_path, capsys):
    from ohem_d2.data.toy import toy_proposal_file
    from ohem_d2.proposals.toy import generate_toy_dataset

    root = generate_toy_dataset(
        str(tmp_path / "toy"), num_trainval=2, num_test=3, workers=1, progress=False
    )
    out = str(tmp_path / "ss_ohem_toy_test.npz")
    command = [
        sys.executable,
        "-m",
        "ohem_d2.proposals.selective_search",
        "--dataset",
        "ohem_toy_test",
        "--toy-root",
        root,
        "--out",
        out,
        "--min-size",
        "8",
        "--workers",
        "2",
        "--no-progress",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "0 unreadable image(s) skipped" in result.stdout
    expected = toy_proposal_file(root, "test")
    assert open(out, "rb").read() == open(expected, "rb").read()
    # A second run refuses to overwrite silently (checked before any dataset is loaded).
    assert main(command[3:]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_worker_pool_does_not_hang_after_opencv_ran_in_the_parent(image_files, tmp_path):
    # A parent that has already used OpenCV's and torch's thread pools (as the test suite,
    # or a user's notebook, does) must still get its images computed by worker processes.
    code = (
        "import sys, cv2, numpy as np\n"
        "from ohem_d2.proposals import compute_proposal_file, selective_search_boxes\n"
        "import torch\n"
        "torch.randn(512, 512) @ torch.randn(512, 512)\n"
        "cv2.setNumThreads(2)\n"
        "selective_search_boxes(cv2.imread(sys.argv[2]), min_size=8)\n"
        "cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))\n"
        "images = [(f'img{i}', p) for i, p in enumerate(sys.argv[2:])]\n"
        "run = compute_proposal_file(images, sys.argv[1], min_size=8, workers=2, progress=False)\n"
        "assert run.complete and run.computed == len(images)\n"
    )
    out = str(tmp_path / "p.npz")
    paths = [p for _, p in image_files[:4]]
    result = subprocess.run(
        [sys.executable, "-c", code, out, *paths],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_proposal_file(out).ids) == 4


def test_cli_on_ones_own_coco_dataset(tmp_path, capsys):
    """--register-coco, as train_net.py takes it: proposals for a dataset of one's own, keyed
    by its COCO image ids, the same boxes as for the image files themselves."""
    import json

    from detectron2.data import DatasetCatalog, MetadataCatalog

    images_dir = tmp_path / "images"
    images_dir.mkdir()
    images, files = [], []
    for image_id, seed in ((7, 0), (9, 1)):
        Image.fromarray(_scene(seed, height=64, width=80)).save(images_dir / f"im{seed}.jpg")
        images.append({"id": image_id, "file_name": f"im{seed}.jpg", "height": 64, "width": 80})
        files.append((str(image_id), str(images_dir / f"im{seed}.jpg")))
    annotation = {"id": 1, "image_id": 7, "category_id": 1, "bbox": [4, 4, 20, 20]}
    annotation.update(area=400, iscrowd=0)
    coco = {"images": images, "annotations": [annotation], "categories": [{"id": 1, "name": "a"}]}
    json_file = tmp_path / "mine.json"
    json_file.write_text(json.dumps(coco))

    out = str(tmp_path / "ss_mine.npz")
    command = ["--dataset", "ss_mine", "--out", out, "--min-size", "8", "--workers", "1"]
    command += ["--no-progress"]
    register = ["--register-coco", "ss_mine", str(json_file), str(images_dir)]
    try:
        # Without the option the name is unknown, and the error says how to register it.
        assert main(command) == 1
        assert "--register-coco NAME JSON IMAGE_ROOT" in capsys.readouterr().err
        assert main([*register, *command]) == 0
        assert "wrote" in capsys.readouterr().out
        expected = str(tmp_path / "expected.npz")
        compute_proposal_file(files, expected, min_size=8, workers=1, progress=False)
        assert read_proposal_file(out).ids == ["7", "9"]
        assert open(out, "rb").read() == open(expected, "rb").read()
        # A name taken by another dataset is refused as train_net.py refuses it.
        taken = ["--register-coco", "coco_2017_val", str(json_file), str(images_dir)]
        assert main([*taken, *command, "--overwrite"]) == 1
        assert "already registered" in capsys.readouterr().err
    finally:
        if "ss_mine" in DatasetCatalog.list():
            DatasetCatalog.remove("ss_mine")
            MetadataCatalog.remove("ss_mine")
