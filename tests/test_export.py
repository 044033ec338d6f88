"""`python -m ohem_d2.export`: the exported model detects what the eager model detects.

Each model has random weights, saved to a file that the command loads (MODEL.WEIGHTS); the
exported artefact is loaded back and run next to the eager model. The Fast R-CNN model is
also run on an image of another size with another number of proposals (duplicates and
too-small boxes among them) than the sample it was traced on: a trace that froze a size or a
count would fail there.
"""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, Instances
from helpers import DEVICE, FAST, REPO, ZOO_SMALL, random_image_and_proposals, toy_model
from PIL import Image

from ohem_d2.data.proposal_io import save_proposals_npz
from ohem_d2.export import main

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

# Scores from 0 so that random weights detect; few proposals kept, some dropped as too small.
FRCN_OPTS = [
    *FAST,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    "TEST.DETECTIONS_PER_IMAGE", 20,
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST", 10,
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE", 12,
]  # fmt: skip
R50_CONFIG = "faster_rcnn_R_50_FPN_ohem.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(image path, proposal file) of a 64 x 96 RGB image with 12 proposals."""
    root = tmp_path_factory.mktemp("sample")
    image, boxes = random_image_and_proposals(64, 96, 12)
    path = str(root / "sample.png")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    proposals = save_proposals_npz(
        str(root / "proposals.npz"), ["sample"], [boxes.numpy()], [-np.arange(12.0)]
    )
    return path, proposals


def _weights(model, path):
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _export(tmp_path, config, opts, *args):
    out = str(tmp_path / "exported")
    argv = ["--config-file", os.path.join(REPO, "configs", config), "--output", out, *args]
    assert main([*argv, *map(str, opts)]) == 0
    return out


def _resized(image_path, cfg):
    """The image as the command's sample: read in INPUT.FORMAT, resized to MIN_SIZE_TEST."""
    from detectron2.data import transforms as T

    original = read_image(image_path, format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    transform = aug.get_transform(original)
    resized = transform.apply_image(original)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)), transform


def _assert_same_detections(outputs, expected):
    """outputs: the exported model's (pred_boxes, pred_classes, scores, image_size)."""
    assert len(expected) > 0
    boxes, classes, scores, size = outputs
    torch.testing.assert_close(boxes, expected.pred_boxes.tensor)
    torch.testing.assert_close(scores, expected.scores)
    assert torch.equal(classes, expected.pred_classes)
    assert tuple(size.tolist()) == tuple(expected.image_size)


def _frcn_eager(model, image, boxes):
    proposals = Instances(tuple(image.shape[-2:]))
    proposals.proposal_boxes = Boxes(boxes)
    proposals.objectness_logits = -torch.arange(len(boxes), dtype=torch.float32)
    with torch.no_grad():
        inputs = [{"image": image, "proposals": proposals}]
        return model.inference(inputs, do_postprocess=False)[0]


def test_fast_rcnn_traced_model_takes_image_and_proposals(tmp_path, sample):
    model, cfg = toy_model("toy/ohem.yaml", *FRCN_OPTS)
    image_path, proposal_file = sample
    opts = [
        *FRCN_OPTS,
        "MODEL.DEVICE",
        DEVICE,
        "MODEL.WEIGHTS",
        _weights(model, tmp_path / "w.pth"),
    ]
    out = _export(
        tmp_path,
        "toy/ohem.yaml",
        opts,
        "--sample-image",
        image_path,
        "--sample-proposals",
        proposal_file,
    )
    assert {"model.ts", "model_ts_code.txt"} <= set(os.listdir(out))
    exported = torch.jit.load(os.path.join(out, "model.ts"))

    # The sample: its proposals scaled with the image, as the test mapper scales them.
    image, transform = _resized(image_path, cfg)
    _, boxes = random_image_and_proposals(64, 96, 12)
    boxes = torch.as_tensor(transform.apply_box(boxes.numpy()), dtype=torch.float32)
    # Another size, 30 proposals among which duplicates and boxes below MIN_SIZE.
    other, more = random_image_and_proposals(150, 110, 24, seed=1)
    more = torch.cat([more, more[:4], torch.tensor([[5.0, 5.0, 10.0, 40.0]] * 2)])
    for x, proposals in ((image, boxes), (other.float(), more)):
        x, proposals = x.to(DEVICE), proposals.to(DEVICE)
        with torch.no_grad():
            outputs = exported(x, proposals)
        _assert_same_detections(outputs, _frcn_eager(model, x, proposals))


def test_fast_rcnn_sample_from_the_test_dataset_and_onnx(tmp_path, small_toy_registered):
    from helpers import toy_overrides

    opts = [*FRCN_OPTS, *toy_overrides(small_toy_registered), "MODEL.DEVICE", DEVICE]
    out = _export(tmp_path, "toy/frcn.yaml", opts, "--format", "onnx")
    graph = onnx.load(os.path.join(out, "model.onnx"))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input][:2] == ["image", "proposal_boxes"]
    assert any(node.op_type == "MaxRoiPool" for node in graph.graph.node)


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """The R50-FPN OHEM config made small, a model of it with random weights, and the
    command's overrides for those weights."""
    model, cfg = toy_model(R50_CONFIG, *ZOO_SMALL)
    assert type(model.roi_heads).__name__ == "OHEMROIHeads"
    path = _weights(model, tmp_path_factory.mktemp("r50") / "w.pth")
    return model, cfg, [*ZOO_SMALL, "MODEL.WEIGHTS", path]


@pytest.mark.parametrize("method", ["tracing", "scripting"])
def test_r50_fpn_ohem_exported_model_equals_eager(tmp_path, sample, r50, method):
    model, cfg, opts = r50
    image_path, _ = sample
    out = _export(
        tmp_path, R50_CONFIG, opts, "--export-method", method, "--sample-image", image_path
    )
    exported = torch.jit.load(os.path.join(out, "model.ts"))
    image = _resized(image_path, cfg)[0].to(DEVICE)
    with torch.no_grad():
        expected = model.inference([{"image": image}], do_postprocess=False)[0]
        if method == "tracing":
            outputs = exported(image)
        else:
            (fields,) = exported(({"image": image},))
            # Scripting returns Instances fields as tensors (Boxes as their tensor).
            outputs = (fields["pred_boxes"], fields["pred_classes"], fields["scores"])
            outputs = (*outputs, torch.tensor(expected.image_size))
    _assert_same_detections(outputs, expected)


def test_help_names_the_proposal_input():
    result = subprocess.run(
        [sys.executable, "-m", "ohem_d2.export", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--export-method" in result.stdout and "proposal_boxes" in result.stdout


def test_caffe2_is_refused_naming_what_works(tmp_path, capsys):
    argv = ["--format", "caffe2", "--config-file", "x.yaml", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "Caffe2 export is not available" in capsys.readouterr().err


def test_scripting_a_fast_rcnn_model_is_refused_naming_tracing(tmp_path, capsys):
    opts = [*FRCN_OPTS, "MODEL.DEVICE", DEVICE]
    config = os.path.join(REPO, "configs", "toy/frcn.yaml")
    argv = ["--export-method", "scripting", "--config-file", config, "--output", str(tmp_path)]
    assert main([*argv, *map(str, opts)]) == 1
    assert "use --export-method tracing" in capsys.readouterr().err
