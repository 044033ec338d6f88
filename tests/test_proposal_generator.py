import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import DEVICE

import ohem_d2
from ohem_d2.modeling.proposal_generator import MissingProposalsError, SelectiveSearchProposals
from ohem_d2.proposal_rules import unique_boxes


def _proposals(boxes, size=(100, 120)):
    p = Instances(size)
    p.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    p.objectness_logits = -torch.arange(len(p.proposal_boxes), dtype=torch.float32)
    return p


def test_unique_boxes_keeps_first_occurrence_in_order():
    b = torch.tensor([[0, 0, 5, 5], [1, 1, 4, 4], [0, 0, 5, 5], [2, 2, 3, 3], [1, 1, 4, 4.0]])
    assert unique_boxes(b).tolist() == [0, 1, 3]
    assert unique_boxes(torch.zeros(0, 4)).tolist() == []


def test_min_size_dedup_and_topk():
    gen = SelectiveSearchProposals(min_size=4, pre_nms_topk_train=2, pre_nms_topk_test=3)
    boxes = [
        [0, 0, 10, 10],  # kept
        [0, 0, 10, 10],  # duplicate
        [5, 5, 8, 50],  # width 3 <= 4: dropped
        [20, 20, 40, 30],  # kept
        [30, 30, 60, 60],  # kept only at test time (top-3)
    ]
    gen.train()
    (out,) = gen([_proposals(boxes)])
    assert out.proposal_boxes.tensor.tolist() == [[0, 0, 10, 10], [20, 20, 40, 30]]
    assert out.objectness_logits.tolist() == [0.0, -3.0]
    gen.eval()
    (out,) = gen([_proposals(boxes)])
    assert len(out) == 3 and out.image_size == (100, 120)


def test_image_without_usable_proposal_is_named():
    gen = SelectiveSearchProposals(min_size=4, pre_nms_topk_train=10, pre_nms_topk_test=10)
    with pytest.raises(MissingProposalsError, match="img_7.jpg"):
        gen([_proposals([[0, 0, 10, 10]]), _proposals([[1, 1, 3, 3]])], ["img_6.jpg", "img_7.jpg"])
    with pytest.raises(MissingProposalsError, match="none.jpg"):
        gen([_proposals([])], ["none.jpg"])


def test_fast_rcnn_meta_arch_uses_generator_and_reports_missing_proposals():
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file("configs/frcn_vgg16.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", DEVICE, "MODEL.VGG.WIDTH_MULT", 0.125])
    cfg.merge_from_list(["MODEL.VGG.FC_DIMS", [32, 32], "MODEL.ROI_HEADS.NUM_CLASSES", 3])
    cfg.merge_from_list(["DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST", 2])
    model = build_model(cfg)
    torch.manual_seed(0)
    inst = Instances((96, 128))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10, 60, 70]]))
    inst.gt_classes = torch.tensor([1])
    props = _proposals([[12, 8, 58, 72], [70, 10, 120, 90], [0, 0, 30, 30]], (96, 128))
    x = {"image": torch.rand(3, 96, 128) * 255, "instances": inst, "proposals": props}
    with EventStorage():
        losses = model([x, dict(x)])
    assert set(losses) == {"loss_cls", "loss_box_reg"} and losses["loss_box_reg"] > 0

    model.eval()
    with torch.no_grad():
        (out,) = model([{**x, "height": 192, "width": 256}])
    # detections are rescaled to the original size given by height/width
    assert out["instances"].image_size == (192, 256)
    with torch.no_grad(), pytest.raises(KeyError, match="LOAD_PROPOSALS"):
        model([{"image": x["image"], "file_name": "lonely.jpg"}])
