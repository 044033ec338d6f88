"""The demo end to end, for a few iterations on the small toy dataset."""

import json
import os
import subprocess
import sys

import cv2
import pytest
from helpers import DEVICE, REPO, table_rows

from ohem_d2.demo import RECOMMENDED_OHEM_OPTS


def test_demo_writes_table_loss_curves_and_hard_example_pictures(small_toy_root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(small_toy_root))
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ohem_d2.demo",
            "--dataset",
            "toy",
            "--iters",
            "4",
            "--output-dir",
            str(out),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    # one table, both methods, every column
    summaries = json.loads((out / "summary.json").read_text())
    # FRCN, paper OHEM and the recommended OHEM: the same trained model evaluated twice
    assert [(s["method"], s.get("recommended", False)) for s in summaries] == [
        ("frcn", False),
        ("ohem", False),
        ("ohem", True),
    ]
    paper, recommended = summaries[1:]
    assert recommended["inference_opts"] == list(RECOMMENDED_OHEM_OPTS)
    for key in ("init_weights_sha256", "s_per_iter", "final_roi_loss", "ohem_opts"):
        assert recommended[key] == paper[key]
    paper_dets = json.loads((out / "ohem" / "detections.json").read_text())
    rec_dets = json.loads((out / "ohem_recommended" / "detections.json").read_text())
    assert [d["file_name"] for d in paper_dets] == [d["file_name"] for d in rec_dets]
    assert paper_dets != rec_dets  # the correction changes the scores
    for s in summaries:
        assert s["iterations"] == 4 and s["s_per_iter"] > 0 and s["peak_rss_mb"] > 100
        assert 0 <= s["voc_AP50_11point"] <= 100 and 0 <= s["coco_AP"] <= 100
        # the cap's statistics, recomputed from the detections the evaluator wrote
        folder = "ohem_recommended" if s.get("recommended") else s["method"]
        found = out / folder / "inference" / s["test_datasets"][0]
        detections = json.loads((found / "coco_instances_results.json").read_text())
        num_images = len({d["image_id"] for d in detections})
        assert s["mean_detections_per_image"] <= len(detections) / num_images <= 100
        if detections:
            assert s["median_lowest_kept_score"] >= min(d["score"] for d in detections)
    table = (out / "summary.md").read_text()
    assert table_rows(table)[0][1:] == ["FRCN (heuristic sampling)", "OHEM", "OHEM (recommended)"]
    assert "VOC07 11-point" in table
    assert table.strip() in result.stdout
    # Fig. 3 data: both curves over the same iterations, losses finite and positive
    curves = json.loads((out / "roi_loss.json").read_text())
    assert set(curves) == {"frcn", "ohem"}
    assert curves["frcn"]["iteration"] == curves["ohem"]["iteration"] == [1, 2, 3, 4]
    assert all(v > 0 for c in curves.values() for v in c["mean_roi_loss"])
    assert cv2.imread(str(out / "roi_loss.png")) is not None
    # hard-example pictures at an early, a middle and a late iteration, with their data
    for it in (1, 2, 4):
        png = out / "ohem" / f"hard_examples_iter{it:05d}.png"
        assert cv2.imread(str(png)) is not None
        record = json.loads(png.with_suffix(".json").read_text())
        for image in record["images"]:
            assert 0 < len(image["hard_boxes"]) <= 64
            assert len(image["hard_is_fg"]) == len(image["hard_boxes"])
            assert image["gt_boxes"]


def test_bccd_demo_compares_both_methods_from_the_same_start(tmp_path):
    """The default demo (BCCD, shipped proposals) for 2 iterations: every column of the table,
    identical initial weights, the detections picture and the fg/bg split of the probe."""
    out = tmp_path / "bccd"
    result = subprocess.run(
        [sys.executable, "-m", "ohem_d2.demo", "--iters", "2", "--output-dir", str(out)],
        cwd=REPO,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    frcn, ohem, recommended = json.loads((out / "summary.json").read_text())
    assert (frcn["method"], ohem["method"], recommended["method"]) == ("frcn", "ohem", "ohem")
    assert recommended["recommended"] and "recommended" not in ohem
    assert frcn["init_weights_sha256"] == ohem["init_weights_sha256"]
    for s in (frcn, ohem, recommended):
        assert s["dataset"] == "bccd" and s["device"] == "cpu" and s["seed"] == 0
        assert set(s["per_class_AP50_allpoint"]) == {"RBC", "WBC", "Platelets"}
        assert s["voc_AP50_allpoint"] == pytest.approx(
            sum(s["per_class_AP50_allpoint"].values()) / 3
        )
        for key in ("voc_AP50_11point", "coco_AP", "coco_AP50", "coco_AP75"):
            assert 0 <= s[key] <= 100
        loss = s["final_roi_loss"]
        assert loss["fg_part"] + loss["bg_part"] == loss["mean_roi_loss"]
        assert 0 < loss["fg_fraction"] < 0.5  # most RoIs are background
    table = (out / "summary.md").read_text()
    for row in ("mAP50, all-point", "VOC07 11-point", "AP50 Platelets", "COCO AP75", "device"):
        assert row in table
    assert "bccd_test" in result.stdout
    # Three test images; FRCN, paper OHEM and the recommended OHEM side by side, at the
    # images' 640 x 480 (+ borders).
    picture = cv2.imread(str(out / "detections.png"))
    assert picture.shape[:2] == (3 * 484, 3 * 644)
    assert cv2.imread(str(out / "ohem" / "hard_examples_iter00002.png")) is not None


def test_holdout_trains_on_bccd_train_and_evaluates_on_bccd_val():
    from ohem_d2.data.bccd import bccd_proposal_file
    from ohem_d2.demo import build_demo_cfg, main

    cfg = build_demo_cfg(
        "bccd", "ohem", "out", 450, 1, "cpu", opts=["SOLVER.BASE_LR", "0.02"], holdout=True
    )
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (("bccd_train",), ("bccd_val",))
    trainval = bccd_proposal_file(None, "trainval")
    assert cfg.DATASETS.PROPOSAL_FILES_TRAIN == cfg.DATASETS.PROPOSAL_FILES_TEST == (trainval,)
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SEED == 1  # --opts override the method's rate
    default = build_demo_cfg("bccd", "frcn", "out", 450, 0, "cpu")
    assert (default.DATASETS.TRAIN, default.DATASETS.TEST) == (("bccd_trainval",), ("bccd_test",))
    # The rates studies/bccd_learning_rate.md chose, one per method.
    assert default.SOLVER.BASE_LR == 0.01
    assert build_demo_cfg("bccd", "ohem", "out", 450, 0, "cpu").SOLVER.BASE_LR == 0.005
    with pytest.raises(ValueError, match="--holdout needs --dataset bccd"):
        build_demo_cfg("toy", "frcn", "out", 10, 0, "cpu", holdout=True)
    for argv in (["--dataset", "toy", "--holdout"], ["--opts", "SOLVER.BASE_LR"]):
        with pytest.raises(SystemExit):
            main(argv)


def test_hard_example_pictures_leave_the_trained_model_and_its_random_draws_untouched():
    """The OHEM pictures mine in train mode mid-training. The BN running statistics they move
    and the dropout draws they take must be put back, or the evaluated model and the rest of
    the run would differ from a run without pictures."""
    from types import SimpleNamespace

    import torch

    from ohem_d2.data.bccd import register_bccd
    from ohem_d2.demo import build_demo_cfg, probe_inputs
    from ohem_d2.demo.hooks import HardExampleSnapshot
    from ohem_d2.engine import Trainer

    # Only BCCD: the toy set's fixtures register it for their own folders later in the run.
    register_bccd()
    cfg = build_demo_cfg("bccd", "ohem", "unused", 2, 0, DEVICE)
    model = Trainer.build_model(cfg)
    model.train()
    inputs = probe_inputs(cfg, 2)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms, "the demo's backbone has BN layers"
    before = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()

    hook = HardExampleSnapshot(inputs, [1], "unused")
    hook.trainer = SimpleNamespace(model=model, iter=0)
    hard, targets, _ = hook.mine()

    assert len(hard) == 2 and all(0 < len(h) <= 64 for h in hard)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())
    # Control: the same forward without the hook does move the statistics and the RNG.
    with torch.no_grad():
        model.backbone(model.preprocess_image(inputs).tensor)
        torch.nn.functional.dropout(torch.ones(4), 0.5, training=True)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert not torch.equal(rng, torch.get_rng_state())


def test_roi_loss_probe_sees_the_scores_as_trained_under_prior_correction():
    """Fig. 3's all-RoI loss is the training loss: a model with PRIOR_CORRECTION on (an
    inference-time shift) must give the probe the same losses as the same weights without."""
    from types import SimpleNamespace

    import torch

    from ohem_d2.data.bccd import register_bccd
    from ohem_d2.demo import build_demo_cfg, probe_inputs
    from ohem_d2.demo.hooks import RoILossProbe
    from ohem_d2.engine import Trainer

    register_bccd()
    opts = ["MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION", "True"]
    corrected = Trainer.build_model(build_demo_cfg("bccd", "ohem", "unused", 2, 0, DEVICE, opts))
    plain = Trainer.build_model(build_demo_cfg("bccd", "ohem", "unused", 2, 0, DEVICE))
    plain.load_state_dict(corrected.state_dict(), strict=False)
    corrected.roi_heads.ohem_class_counts_all.copy_(torch.tensor([90, 17, 4, 889]))
    corrected.roi_heads.ohem_class_counts_hard.copy_(torch.tensor([44, 7, 4, 45]))
    inputs = probe_inputs(build_demo_cfg("bccd", "ohem", "unused", 2, 0, DEVICE), 1)
    losses = []
    for model in (corrected, plain):
        probe = RoILossProbe(inputs, 1, "unused")
        probe.trainer = SimpleNamespace(model=model)
        losses.append(probe.roi_losses()[0])
    torch.testing.assert_close(losses[0], losses[1])
    # Control: the correction does change the scores it is applied to. The same model on the
    # same image, evaluated as recommended (corrected) and as the paper's OHEM (uncorrected):
    # the class logits differ by the shift, and so do the detections' scores.
    shift = corrected.roi_heads.class_prior_shift()
    assert shift.abs().min() > 0.1
    logits = []
    corrected.roi_heads.box_predictor.register_forward_hook(
        lambda module, args, outputs: logits.append(outputs[0].detach())
    )
    corrected.eval()
    with torch.no_grad():
        (recommended,) = corrected(inputs)
        with corrected.roi_heads.uncorrected():
            (paper,) = corrected(inputs)
    torch.testing.assert_close(logits[0] - logits[1], shift.expand_as(logits[0]).to(logits[0]))
    recommended, paper = recommended["instances"], paper["instances"]
    assert len(recommended) and len(paper)
    assert len(recommended) != len(paper) or not torch.allclose(recommended.scores, paper.scores)
