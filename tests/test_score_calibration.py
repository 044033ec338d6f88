"""MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION: the head maps its detections' scores by the
saved per-class Platt scaling (checked against the study's numpy map on the same model's
plain detections), and `python -m ohem_d2.calibrate_scores` fits and saves it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import DEVICE, FAST, REPO, on_device, spread, toy_model, toy_overrides
from test_iterative_box_regression import fast_rcnn_input

from ohem_d2.engine.calibration import apply_platt, fit_platt, matched_flags

CALIBRATED = ["MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION", True]
PARAMS = [[2.0, -1.0], [0.5, 0.3], [1.0, 0.0], [3.0, 1.5]]  # (a_c, b_c), 4 toy classes


def _models():
    plain, _ = toy_model("toy/ohem.yaml", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05)
    calibrated, _ = toy_model(
        "toy/ohem.yaml", *CALIBRATED, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05
    )
    spread(plain)
    state = plain.state_dict()
    state["roi_heads.ohem_score_calibration"] = torch.tensor(PARAMS)
    calibrated.load_state_dict(state)
    return plain, calibrated


def test_inference_maps_each_score_by_its_class():
    plain, calibrated = _models()
    inputs = [on_device(fast_rcnn_input(seed)) for seed in range(3)]
    with torch.no_grad():
        before = [r["instances"].to("cpu") for r in plain(inputs)]
        after = [r["instances"].to("cpu") for r in calibrated(inputs)]
    dropped = 0
    for b, a in zip(before, after):
        expected = apply_platt(b.scores.numpy(), b.pred_classes.numpy(), PARAMS)
        keep = expected >= 0.05
        dropped += int((~keep).sum())
        assert len(a) == int(keep.sum())
        np.testing.assert_allclose(a.scores.numpy(), expected[keep], rtol=1e-5, atol=1e-6)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor[torch.from_numpy(keep)])
    assert dropped > 0 and sum(len(b) for b in before) > dropped  # both cases happen
    # The scores as trained inside scores_as_trained (the paper's OHEM).
    from ohem_d2.modeling.ohem import scores_as_trained

    with torch.no_grad(), scores_as_trained(calibrated):
        raw = calibrated(inputs[:1])[0]["instances"].to("cpu")
    torch.testing.assert_close(raw.scores, before[0].scores)


def test_identity_map_changes_nothing_and_b_is_refused():
    plain, _ = toy_model("toy/ohem.yaml")
    calibrated, cfg = toy_model("toy/ohem.yaml", *CALIBRATED)
    spread(plain)
    calibrated.load_state_dict(plain.state_dict(), strict=False)  # the buffer stays identity
    inputs = [on_device(fast_rcnn_input(0))]
    with torch.no_grad():
        a, b = plain(inputs)[0]["instances"], calibrated(inputs)[0]["instances"]
    torch.testing.assert_close(a.scores, b.scores)
    from ohem_d2.modeling.iterative_box_regression import check_refinable

    with pytest.raises(ValueError, match="SCORE_CALIBRATION"):
        check_refinable(calibrated)
    with pytest.raises(RuntimeError, match="SCORE_CALIBRATION"):
        torch.jit.script(calibrated.roi_heads)


def test_calibrate_scores_command_fits_on_the_dataset(small_toy_registered, tmp_path):
    """The command's saved map equals fit_platt on the model's own detections of the
    dataset, computed here by Detectron2's COCOEvaluator."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    from ohem_d2.engine import Trainer

    root = small_toy_registered
    opts = [*toy_overrides(root), *FAST, "MODEL.DEVICE", DEVICE]
    model, cfg = toy_model("toy/ohem.yaml", *opts)
    spread(model)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    weights = str(tmp_path / "model.pth")
    out = str(tmp_path / "calibrated.pth")
    command = [sys.executable, "-m", "ohem_d2.calibrate_scores", "--config-file",
               "configs/toy/ohem.yaml", "--dataset", "ohem_toy_test", "--output", out,
               *map(str, opts), "MODEL.WEIGHTS", weights]  # fmt: skip
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(root), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Written" in result.stdout
    saved = torch.load(out, map_location="cpu", weights_only=False)["model"]
    fitted = saved["roi_heads.ohem_score_calibration"]

    cfg.defrost()
    cfg.DATASETS.TEST = ("ohem_toy_test",)
    evaluator = COCOEvaluator("ohem_toy_test", tasks=("bbox",), output_dir=str(tmp_path / "ev"))
    inference_on_dataset(model, Trainer.build_test_loader(cfg, "ohem_toy_test"), evaluator)
    with open(os.path.join(tmp_path, "ev", "coco_instances_results.json")) as f:
        detections = json.load(f)
    matched, _ = matched_flags(detections, DatasetCatalog.get("ohem_toy_test"))
    expected = fit_platt(
        [d["score"] for d in detections], matched, [d["category_id"] for d in detections], 4
    )
    torch.testing.assert_close(
        fitted, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-4
    )
    assert not torch.equal(fitted, torch.tensor([[1.0, 0.0]] * 4))
