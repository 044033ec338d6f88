"""M: multi-scale testing against the union of single-scale detections before NMS, with
precomputed proposals and RPN models, M + B, multi-scale training's proposals, and
train_net.py --eval-only with the M + B config."""

import copy
import itertools
import os
import re

import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode, Instances
from helpers import (
    B_ON,
    DEVICE,
    FAST,
    random_image_and_proposals,
    run_train_net,
    spread,
    toy_model,
    toy_overrides,
    zoo_model,
)
from PIL import Image
from torchvision.ops import batched_nms

from ohem_d2.engine.loaders import (
    build_train_loader_with_proposals,
    dataset_dicts_with_proposals,
    multiscale_test_mapper,
)
from ohem_d2.modeling.iterative_box_regression import (
    BoxRefinementSettings,
    IterativeBoxRegressionWithVoting,
)
from ohem_d2.modeling.multiscale import MultiScaleRCNN

SCALES = (48, 64, 96)
MAX_SIZE = 160
M_ON = [
    "TEST.AUG.ENABLED", True,
    "TEST.AUG.MIN_SIZES", str(SCALES),
    "TEST.AUG.MAX_SIZE", MAX_SIZE,
    "TEST.AUG.FLIP", False,
]  # fmt: skip


@pytest.fixture
def raw_input(tmp_path):
    """A dataset dict as the proposal loader reads it: an image file and its proposal
    file's boxes (60 x 90 px, 12 proposals)."""
    image, boxes = random_image_and_proposals(height=60, width=90)
    path = str(tmp_path / "image.png")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return {
        "file_name": path,
        "image_id": "image",
        "height": 60,
        "width": 90,
        "proposal_boxes": boxes.numpy(),
        "proposal_objectness_logits": np.zeros(len(boxes), dtype=np.float32),
        "proposal_bbox_mode": BoxMode.XYXY_ABS,
    }


def single_scale(model, cfg, raw, scale, wrapper=None):
    """The model's detections with the image (and proposals) resized to ``scale`` by
    Detectron2's single-scale test mapper, postprocessed into the original image."""
    mapper = DatasetMapper(
        is_train=False,
        augmentations=[T.ResizeShortestEdge(scale, MAX_SIZE)],
        image_format=cfg.INPUT.FORMAT,
        precomputed_proposal_topk=10**9,
    )
    with torch.no_grad():
        return (wrapper or model)([mapper(copy.deepcopy(raw))])[0]["instances"]


def multi_scale(model, cfg, raw):
    with torch.no_grad():
        mapped = multiscale_test_mapper(cfg)(copy.deepcopy(raw))
        return MultiScaleRCNN(cfg, model)([mapped])[0]["instances"]


def test_multiscale_is_the_union_of_single_scale_detections_before_nms(raw_input, monkeypatch):
    model, cfg = toy_model("toy/frcn.yaml", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.2, *M_ON)
    spread(model)
    ours = multi_scale(model, cfg, raw_input)

    # Reference: each scale on its own through Detectron2's mapper and inference, its NMS and
    # cap turned off (so every box above the threshold), boxes mapped back by Detectron2's
    # postprocessing; then one per-class NMS over the union and the cap.
    predictor = model.roi_heads.box_predictor
    monkeypatch.setattr(predictor, "test_nms_thresh", 1.0)
    monkeypatch.setattr(predictor, "test_topk_per_image", -1)
    per_scale = [single_scale(model, cfg, raw_input, s) for s in SCALES]
    union = Instances.cat(per_scale)
    keep = batched_nms(
        union.pred_boxes.tensor,
        union.scores,
        union.pred_classes,
        cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
    )[: cfg.TEST.DETECTIONS_PER_IMAGE]
    expected = union[keep]

    assert all(len(x) for x in per_scale)
    # Not the same as one scale's detections, nor as merging each scale's NMS'd ones
    scale_of = torch.cat(
        [torch.full((len(x),), i, device=keep.device) for i, x in enumerate(per_scale)]
    )
    assert len(scale_of[keep].unique()) > 1
    assert ours.image_size == (60, 90)
    torch.testing.assert_close(ours.scores, expected.scores, rtol=0, atol=0)
    assert torch.equal(ours.pred_classes, expected.pred_classes)
    torch.testing.assert_close(ours.pred_boxes.tensor, expected.pred_boxes.tensor)


def test_multiscale_with_b_at_one_scale_is_b_at_that_scale(raw_input):
    """Box voting is a weighted mean, and IoU does not change when the axes are scaled: B on
    the pooled detections of one scale, in the original image, is B at that scale."""
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.2, *M_ON, "TEST.AUG.MIN_SIZES", "(64,)"]
    model, cfg = toy_model("toy/frcn.yaml", *opts, *B_ON)
    spread(model)
    ours = multi_scale(model, cfg, raw_input)
    b = IterativeBoxRegressionWithVoting(model, BoxRefinementSettings.from_config(cfg))
    expected = single_scale(model, cfg, raw_input, 64, wrapper=b)
    plain = single_scale(model, cfg, raw_input, 64)
    assert len(ours) == len(expected) > 0
    torch.testing.assert_close(ours.scores, expected.scores)
    assert torch.equal(ours.pred_classes, expected.pred_classes)
    torch.testing.assert_close(ours.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert not torch.equal(ours.pred_boxes.tensor[:1], plain.pred_boxes.tensor[:1])


@pytest.mark.parametrize("b", [False, True], ids=["M", "M+B"])
def test_multiscale_on_a_detectron2_rpn_model_with_masks(b):
    model, cfg = zoo_model("mask_fpn", *map(str, M_ON), *(B_ON if b else []))
    image, _ = random_image_and_proposals(height=60, width=90)
    with torch.no_grad():
        (out,) = MultiScaleRCNN(cfg, model)([{"image": image, "height": 60, "width": 90}])
    instances = out["instances"]
    assert 0 < len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert instances.pred_masks.shape == (len(instances), 60, 90)


def test_inputs_whose_proposals_were_resized_already_are_refused(raw_input):
    model, cfg = toy_model("toy/frcn.yaml", *M_ON)
    mapped = DatasetMapper(
        is_train=False, augmentations=[], image_format="RGB", precomputed_proposal_topk=10
    )(copy.deepcopy(raw_input))
    with pytest.raises(ValueError, match="proposal file's boxes"):
        MultiScaleRCNN(cfg, model)([mapped])


def test_multiscale_training_resizes_the_proposals_with_each_image(small_toy_registered):
    """INPUT.MIN_SIZE_TRAIN with "choice" sampling: each training image gets one of the
    scales, and its proposals are the file's boxes times the image's own scale factors."""
    scales = (96, 128, 160)
    _, cfg = toy_model(
        "toy/frcn.yaml",
        *toy_overrides(small_toy_registered),
        "INPUT.MIN_SIZE_TRAIN", str(scales),
        "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice",
        "INPUT.MAX_SIZE_TRAIN", 1000,
        "INPUT.RANDOM_FLIP", "none",
        "DATALOADER.NUM_WORKERS", 0,
    )  # fmt: skip
    raw = {
        d["image_id"]: d
        for d in dataset_dicts_with_proposals(
            cfg.DATASETS.TRAIN, cfg.DATASETS.PROPOSAL_FILES_TRAIN, filter_empty=False, trusted=False
        )
    }
    seen = set()
    for batch in itertools.islice(build_train_loader_with_proposals(cfg), 6):
        for x in batch:
            height, width = x["image"].shape[1:]
            seen.add(min(height, width))
            file_boxes = torch.as_tensor(raw[x["image_id"]]["proposal_boxes"], dtype=torch.float32)
            scale = torch.tensor([width / x["width"], height / x["height"]]).repeat(2)
            expected = file_boxes * scale
            expected[:, 0::2] = expected[:, 0::2].clamp(0, width)
            expected[:, 1::2] = expected[:, 1::2].clamp(0, height)
            expected = expected[
                (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
            ]
            torch.testing.assert_close(x["proposals"].proposal_boxes.tensor, expected)
    assert seen <= set(scales) and len(seen) > 1, seen


def _copypaste_after(output, marker, task):
    """Metrics of `task` printed by print_csv_format after the line containing `marker`."""
    start = output.index(marker)
    m = re.search(
        rf"copypaste: Task: {task}\n.*copypaste: (.*)\n.*copypaste: (.*)\n", output[start:]
    )
    assert m, f"no {task} results after {marker!r} in output:\n{output[-3000:]}"
    return dict(zip(m.group(1).split(","), map(float, m.group(2).split(","))))


def test_eval_only_with_the_m_plus_b_config(small_toy_root, tmp_path):
    """train_net.py --eval-only with the VGG16 OHEM M + B config, the model shrunk to the
    toy configs' size and the scales to the toy images: the single-scale B test, then the
    multi-scale M + B test, each with VOC and COCO metrics."""
    shrink = [
        "MODEL.DEVICE", DEVICE,
        "MODEL.WEIGHTS", "",
        "MODEL.VGG.WIDTH_MULT", 0.25,
        "MODEL.VGG.FC_DIMS", "[256, 256]",
        "MODEL.ROI_HEADS.NUM_CLASSES", 4,
        "DATASETS.TRAIN", "('ohem_toy_trainval',)",
        "DATASETS.TEST", "('ohem_toy_test',)",
        "DATALOADER.NUM_WORKERS", 0,
        "TEST.AUG.MIN_SIZES", "(96, 128)",
        "TEST.AUG.MAX_SIZE", 200,
        "OUTPUT_DIR", tmp_path,
    ]  # fmt: skip
    result = run_train_net(
        [
            "--config-file",
            "configs/bells_and_whistles/frcn_vgg16_ohem_MB.yaml",
            "--eval-only",
            *toy_overrides(small_toy_root),
            *FAST,
            *shrink,
        ],
        os.path.dirname(small_toy_root),
    )
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    for marker in ("Evaluation results for ohem_toy_test in", "ohem_toy_test (multi-scale)"):
        voc = _copypaste_after(out, marker, "voc_bbox")
        coco = _copypaste_after(out, marker, "bbox")
        assert {"AP", "AP50", "AP75"} <= set(voc)
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(coco)
    assert "Multi-scale testing at scales [96, 128]" in out
    assert (tmp_path / "inference_TTA" / "inference" / "ohem_toy_test").is_dir()
