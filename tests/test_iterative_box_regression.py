"""B: iterative box regression and box voting, against a re-computation by hand, on every
head built on FastRCNNOutputLayers, and off by default (inference unchanged)."""

import pytest
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from helpers import (
    B_ON,
    FAST,
    ZOO,
    random_image_and_proposals,
    spread,
    toy_model,
    toy_overrides,
    zoo_model,
)

from ohem_d2.engine import Trainer
from ohem_d2.modeling.iterative_box_regression import (
    BoxRefinementSettings,
    IterativeBoxRegressionWithVoting,
    candidate_detections,
)


def fast_rcnn_input(seed=0):
    image, boxes = random_image_and_proposals(seed=seed)
    h, w = image.shape[1:]
    proposals = Instances((h, w), proposal_boxes=Boxes(boxes), objectness_logits=torch.zeros(12))
    return {"image": image, "height": h, "width": w, "proposals": proposals}


def build(kind, *opts):
    """(model, cfg, inputs): a project config on precomputed proposals, or a zoo RPN model."""
    if kind in ZOO:
        model, cfg = zoo_model(kind, *opts)
        image, _ = random_image_and_proposals(height=64, width=80)
        return model, cfg, [{"image": image, "height": 64, "width": 80}]
    model, cfg = toy_model(kind, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.2, *opts)
    return model, cfg, [fast_rcnn_input()]


def refined(model, cfg, inputs):
    wrapper = IterativeBoxRegressionWithVoting(model, BoxRefinementSettings.from_config(cfg))
    with torch.no_grad():
        return [x["instances"] for x in wrapper(inputs)]


def assert_same_instances(a, b):
    assert a.image_size == b.image_size
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)


HEADS = ["toy/frcn.yaml", "toy/ohem.yaml", "toy/ohem_res5.yaml", "mask_fpn", "mask_c4"]


@pytest.mark.parametrize("kind", HEADS)
def test_options_off_is_detectron2s_inference_bit_for_bit(kind):
    """One pass and no voting through the B code path: the model's own detections exactly."""
    model, cfg, inputs = build(kind)
    assert not BoxRefinementSettings.from_config(cfg).enabled  # the defaults are off
    with torch.no_grad():
        (plain,) = [x["instances"] for x in model(inputs)]
    (ours,) = refined(model, cfg, inputs)
    assert_same_instances(plain, ours)


@pytest.mark.parametrize("kind", HEADS)
def test_b_on_every_head(kind):
    model, cfg, inputs = build(kind, *B_ON)
    with torch.no_grad():
        (plain,) = [x["instances"] for x in model(inputs)]
    (b,) = refined(model, cfg, inputs)
    assert 0 < len(b) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert torch.all(b.scores[:-1] >= b.scores[1:])
    assert b.image_size == (inputs[0]["height"], inputs[0]["width"])
    # Regression and voting moved the boxes
    assert not torch.equal(b.pred_boxes.tensor[:1], plain.pred_boxes.tensor[:1])
    if cfg.MODEL.MASK_ON:  # masks on the final boxes (forward_with_given_boxes)
        assert b.pred_masks.shape == (len(b), 64, 80)  # pasted into the image


def test_cascade_is_refused_saying_why():
    model, cfg = zoo_model("cascade", *B_ON)
    with pytest.raises(ValueError, match="already score and regress"):
        IterativeBoxRegressionWithVoting(model, BoxRefinementSettings.from_config(cfg))


def test_two_passes_are_the_box_transform_applied_twice_by_hand():
    """R1 U R2 equals: the proposals' class boxes and probabilities, then each R1 box scored
    again and regressed for its own class, with a fresh Box2BoxTransform and softmax."""
    model, cfg, inputs = build("toy/frcn.yaml", *B_ON)
    thresh = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
    heads = model.roi_heads
    # Random weights' tiny deltas move boxes less than RoI pooling at stride 16 can see.
    spread(model)
    transform = Box2BoxTransform(weights=cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS)
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        feature_list = [features[f] for f in heads.in_features]
        height, width = images.image_sizes[0]

        def score_and_regress(boxes):
            pooled = heads.box_pooler(feature_list, [Boxes(boxes)])
            logits, deltas = heads.box_predictor(heads.box_head(pooled))
            regressed = transform.apply_deltas(deltas, boxes).view(len(boxes), -1, 4)
            regressed[..., 0::2] = regressed[..., 0::2].clamp(0, width)
            regressed[..., 1::2] = regressed[..., 1::2].clamp(0, height)
            return logits.softmax(dim=1), regressed

        proposal_boxes = inputs[0]["proposals"].proposal_boxes.tensor.to(model.device)
        probs1, boxes1 = score_and_regress(proposal_boxes)
        rows, classes1 = (probs1[:, :-1] > thresh).nonzero(as_tuple=True)
        r1_boxes, r1_scores = boxes1[rows, classes1], probs1[rows, classes1]
        probs2, boxes2 = score_and_regress(r1_boxes)
        index = torch.arange(len(r1_boxes), device=model.device)
        r2_scores, r2_boxes = probs2[index, classes1], boxes2[index, classes1]
        r2 = r2_scores > thresh
        expected_boxes = torch.cat([r1_boxes, r2_boxes[r2]])
        expected_scores = torch.cat([r1_scores, r2_scores[r2]])
        expected_classes = torch.cat([classes1, classes1[r2]])

        settings = BoxRefinementSettings.from_config(cfg)
        _, _, (candidates,) = candidate_detections(model, inputs, settings)
    assert len(r1_boxes) > 0 and r2.any() and not r2.all()  # the case is not degenerate
    assert len(candidates) == len(expected_scores)

    def rows(scores, classes, boxes):
        """(N, 6) rows (class, score, box) sorted lexicographically: the same multiset of
        detections gives the same rows, whatever order each side made them in."""
        table = torch.cat([classes[:, None].float(), scores[:, None], boxes], dim=1)
        for column in reversed(range(table.shape[1])):
            table = table[table[:, column].argsort(stable=True)]
        return table

    got = rows(candidates.scores, candidates.pred_classes, candidates.pred_boxes.tensor)
    torch.testing.assert_close(got, rows(expected_scores, expected_classes, expected_boxes))


def test_mrcnn_next_pass_selection_caps_the_second_pass():
    """NEXT_PASS_TOPK_PER_CLASS 1 sends at most one box per class to the second pass."""
    model, cfg, inputs = build("toy/frcn.yaml", *B_ON)
    settings = BoxRefinementSettings.from_config(cfg)
    one_pass = BoxRefinementSettings(**{**vars(settings), "num_iterations": 1})
    capped = BoxRefinementSettings(
        **{**vars(settings), "next_pass_topk_per_class": 1, "next_pass_nms_thresh": 0.95}
    )
    with torch.no_grad():
        r1 = candidate_detections(model, inputs, one_pass)[2][0]
        both = candidate_detections(model, inputs, capped)[2][0]
        uncapped = candidate_detections(model, inputs, settings)[2][0]
    second = both[len(r1) :]
    assert 0 < len(second) <= cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert len(second.pred_classes.unique()) == len(second)
    assert len(uncapped) > len(both)


class RecordingEvaluator(DatasetEvaluator):
    def reset(self):
        self.outputs = []

    def process(self, inputs, outputs):
        self.outputs += [(x["image_id"], o["instances"].to("cpu")) for x, o in zip(inputs, outputs)]

    def evaluate(self):
        return {}


def test_trainer_test_uses_b_only_when_asked(small_toy_registered):
    """Trainer.test (train_net.py --eval-only, and evaluation during training) passes the
    model unchanged with the options off, and makes B's detections with them on."""
    overrides = [*FAST, *toy_overrides(small_toy_registered), "DATALOADER.NUM_WORKERS", 0]
    model, cfg = toy_model("toy/frcn.yaml", *overrides)

    def run(cfg, model):
        evaluator = RecordingEvaluator()
        Trainer.test(cfg, model, [evaluator])
        return evaluator.outputs

    off = run(cfg, model)
    direct = run(cfg.clone(), lambda inputs: model(inputs))  # no B: exactly the model's
    cfg_b = cfg.clone()
    cfg_b.merge_from_list(B_ON)
    on = run(cfg_b, model)
    wrapped = run(
        cfg, IterativeBoxRegressionWithVoting(model, BoxRefinementSettings.from_config(cfg_b))
    )
    assert len(off) == len(on) == 12
    for (id_a, a), (id_b, b) in zip(off, direct):
        assert id_a == id_b
        assert_same_instances(a, b)
    for (_, a), (_, b) in zip(on, wrapped):
        assert_same_instances(a, b)
    assert any(
        not torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) for (_, a), (_, b) in zip(off, on)
    )


def _voted_by_hand(candidates, nms_thresh, iou_thresh, cap):
    """Box voting recomputed without the project's code: NMS (torchvision), then each kept box
    the score-weighted mean of ALL candidates (before NMS) of its class with IoU >= iou_thresh
    with it, the IoU written out. Returns the kept boxes, their voted boxes and, per kept
    box, how many of its voters NMS had suppressed."""
    from torchvision.ops import batched_nms

    boxes, scores, classes = (
        candidates.pred_boxes.tensor.double(),
        candidates.scores.double(),
        candidates.pred_classes,
    )
    keep = batched_nms(boxes.float(), scores.float(), classes, nms_thresh)[:cap]
    kept, voted, suppressed_voters = boxes[keep], [], []
    for k in keep.tolist():
        x0, y0, x1, y1 = boxes[k].tolist()
        num, den, suppressed = torch.zeros(4, dtype=torch.float64), 0.0, 0
        for j in range(len(boxes)):
            if classes[j] != classes[k]:
                continue
            a0, b0, a1, b1 = boxes[j].tolist()
            inter = max(0.0, min(x1, a1) - max(x0, a0)) * max(0.0, min(y1, b1) - max(y0, b0))
            union = (x1 - x0) * (y1 - y0) + (a1 - a0) * (b1 - b0) - inter
            # A zero-area box overlaps nothing (torchvision's IoU: 0 / 0, NaN).
            if union > 0 and inter / union >= iou_thresh:
                num += scores[j] * boxes[j]
                den += scores[j].item()
                suppressed += j not in keep.tolist()
        voted.append(num / den if den > 0 else boxes[k])
        suppressed_voters.append(suppressed)
    return kept, torch.stack(voted), suppressed_voters


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("iterative", [False, True], ids=["voting", "B"])
def test_voting_is_the_score_weighted_mean_over_all_candidates(kind, iterative, monkeypatch):
    """On every head (VGG Standard, OHEM, OHEM C4, Detectron2's FPN and C4): each detection
    is the score-weighted mean of the boxes of its class with IoU >= 0.5 with it among ALL
    the candidates before NMS (R1, or R1 U R2), recomputed by hand from the candidates the
    wrapper made (captured). Voting among the NMS survivors only would leave boxes unmoved."""
    import ohem_d2.modeling.iterative_box_regression as ibr

    opts = B_ON if iterative else B_ON[2:]
    model, cfg, inputs = build(kind, *opts)
    if "proposals" in inputs[0]:
        # Each proposal twice, the copy a few pixels off: overlapping candidates of a class.
        proposals = inputs[0]["proposals"]
        boxes = proposals.proposal_boxes.tensor
        shifted = Boxes(torch.cat([boxes, boxes + torch.tensor([3.0, 2.0, 4.0, 1.0])]))
        inputs[0]["proposals"] = Instances(
            proposals.image_size,
            proposal_boxes=shifted,
            objectness_logits=torch.zeros(len(shifted)),
        )
    else:
        # The RPN's proposals: spread scores and deltas so that classes and passes differ.
        spread(model)
    settings = BoxRefinementSettings.from_config(cfg)
    assert settings.voting and settings.nms_thresh == 0.3 and settings.voting_iou_thresh == 0.5
    captured = []

    def capture(*args, **kwargs):
        result = candidate_detections(*args, **kwargs)
        captured.append(result[2][0].to("cpu"))
        return result

    monkeypatch.setattr(ibr, "candidate_detections", capture)
    with torch.no_grad():
        (out,) = IterativeBoxRegressionWithVoting(model, settings).inference(
            inputs, do_postprocess=False
        )
    (candidates,) = captured
    kept, expected, suppressed_voters = _voted_by_hand(
        candidates, settings.nms_thresh, settings.voting_iou_thresh, settings.detections_per_image
    )
    assert len(out) == len(expected) > 0
    torch.testing.assert_close(out.pred_boxes.tensor.cpu().double(), expected, rtol=0, atol=1e-3)
    # Not degenerate: boxes NMS suppressed voted, and moved a detection by more than the
    # tolerance.
    assert max(suppressed_voters) > 0
    assert (expected - kept).abs().max() > 0.05, (expected - kept).abs().max()
