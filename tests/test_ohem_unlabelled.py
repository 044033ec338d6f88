"""Beyond the paper: the options against unlabelled objects and the hard-set diagnostics,
each against a hand-built case whose arithmetic is written out."""

import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import DEVICE, on_device
from test_ohem_mining import reference_select
from test_ohem_roi_heads import HEADS, _batch, _build, _cfg, _train_step

from ohem_d2.modeling.ohem import HardExampleMiner, select_hard_examples
from ohem_d2.modeling.ohem.diagnostics import IOU_BIN_NAMES, iou_bin

# One 200 x 200 image, K = 2 classes (background label 2), one ground truth of class 0.
GT = [0.0, 0.0, 40.0, 40.0]
# (box, label, readonly probabilities of class 0, class 1, background). Per-RoI loss = the
# cross-entropy -log p(label) (no box loss: r0 is the ground truth itself, zero deltas).
ROIS = [
    ([0, 0, 40, 40], 0, (0.6, 0.2, 0.2)),  # r0 fg, IoU 1: loss -log .6 = 0.511
    ([100, 100, 140, 140], 2, (0.8, 0.1, 0.1)),  # r1 bg, IoU 0, p(obj) .8: SUSPECT, 2.303
    ([20, 0, 60, 40], 2, (0.7, 0.1, 0.2)),  # r2 bg, IoU 800/2400 = 1/3: not suspect, 1.609
    ([150, 150, 190, 190], 2, (0.3, 0.3, 0.4)),  # r3 bg, IoU 0, p(obj) .3: not suspect, 0.916
    ([150, 0, 190, 40], 2, (0.05, 0.05, 0.9)),  # r4 bg, IoU 0, p(obj) .05, 0.105
]


def _case():
    props = Instances((200, 200))
    props.proposal_boxes = Boxes(torch.tensor([b for b, _, _ in ROIS], dtype=torch.float32))
    props.gt_classes = torch.tensor([lab for _, lab, _ in ROIS])
    props.gt_boxes = Boxes(torch.tensor([GT] * len(ROIS)))
    # log-probabilities are logits whose softmax gives the probabilities back exactly.
    scores = torch.tensor([p for _, _, p in ROIS]).log()
    predictor = FastRCNNOutputLayers(
        ShapeSpec(channels=4), box2box_transform=Box2BoxTransform((10, 10, 5, 5)), num_classes=2
    )
    return on_device([props]), on_device((scores, torch.zeros(len(ROIS), 8))), predictor.to(DEVICE)


def _select(batch_size=2, **options):
    proposals, predictions, predictor = _case()
    miner = HardExampleMiner(
        batch_size_per_image=batch_size, nms_thresh=1.0, class_names=["RBC", "WBC"], **options
    )
    with EventStorage() as storage:
        hard = miner.select(proposals, predictions, predictor)
        scalars = {k: v[0] for k, v in storage.latest().items()}
    keep = [
        ROIS.index(next(r for r in ROIS if r[0] == b))
        for b in hard[0].proposal_boxes.tensor.tolist()
    ]
    return keep, hard[0], scalars


def test_hand_case_losses_are_the_cross_entropies():
    proposals, predictions, predictor = _case()
    miner = HardExampleMiner(batch_size_per_image=2)
    losses = miner.scorer.losses(predictor, predictions, proposals)[0]
    expected = [-math.log(p[lab]) for _, lab, p in ROIS]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)


def test_paper_selection_and_its_diagnostics():
    # Losses 2.303 (r1), 1.609 (r2), 0.916 (r3), 0.511 (r0), 0.105 (r4): the two hardest.
    keep, hard, scalars = _select()
    assert keep == [1, 2]
    assert hard.suspect_bg.tolist() == [True, False]
    # Hard set: two background RoIs, no foreground.
    assert scalars["ohem/hard_set/RBC"] == 0
    assert scalars["ohem/hard_set/WBC"] == 0
    assert scalars["ohem/hard_set/background"] == 1
    # r1 has IoU 0, r2 IoU 1/3: one each in "0" and "[0.3,0.5)".
    assert scalars["ohem/hard_bg_iou/0"] == 0.5
    assert scalars["ohem/hard_bg_iou/(0,0.1)"] == 0
    assert scalars["ohem/hard_bg_iou/[0.1,0.3)"] == 0
    assert scalars["ohem/hard_bg_iou/[0.3,0.5)"] == 0.5
    # r1 is the one suspect of 5 candidates; it is one of the 2 hard background RoIs.
    assert scalars["ohem/num_suspect_candidates"] == 1
    assert scalars["ohem/hard_bg_suspect"] == 0.5


def test_suspects_excluded_at_weight_zero():
    keep, hard, scalars = _select(suspect_bg_weight=0.0)
    assert keep == [2, 3]  # r1 removed: next are r2 (1.609) and r3 (0.916)
    assert scalars["ohem/hard_bg_suspect"] == 0
    assert scalars["ohem/num_suspect_candidates"] == 1  # still counted among the candidates


@pytest.mark.parametrize(
    "weight, expected",
    [
        (0.5, [2, 1]),  # r1 ranks by 2.303 * 0.5 = 1.151: after r2 (1.609), before r3 (0.916)
        (0.3, [2, 3]),  # 2.303 * 0.3 = 0.691 < 0.916: r1 falls out of the two hardest
    ],
)
def test_suspects_down_weighted(weight, expected):
    keep, _, _ = _select(suspect_bg_weight=weight)
    assert keep == expected


def test_suspect_needs_confidence_and_no_overlap():
    # With the score threshold above r1's 0.8, nothing is a suspect. With the IoU bound above
    # r2's 1/3, r2 (its most likely object class has p = 0.7 >= 0.5) becomes one too.
    _, _, scalars = _select(suspect_bg_score=0.85)
    assert scalars["ohem/num_suspect_candidates"] == 0
    keep, hard, scalars = _select(suspect_bg_max_iou=0.4, suspect_bg_weight=0.0)
    assert scalars["ohem/num_suspect_candidates"] == 2
    assert keep == [3, 0]  # r1, r2 excluded: r3 (0.916), r0 (0.511)


@pytest.mark.parametrize(
    "fraction, expected",
    [
        (0.25, [2, 3]),  # 4 bg candidates, floor(0.25 * 4) = 1 skipped: r1
        (0.5, [3, 0]),  # floor(0.5 * 4) = 2 skipped: r1, r2; then r3 and the fg r0
    ],
)
def test_trimmed_ranking(fraction, expected):
    keep, _, _ = _select(trim_bg_fraction=fraction)
    assert keep == expected


def test_trimming_happens_after_the_nms():
    # A (bg, loss 5) suppresses its near-duplicate A2 (IoU 100/110 = 0.91 > 0.7, loss 4).
    # Surviving background: A, C, D; floor(0.34 * 3) = 1 trimmed: A. A2 stays suppressed
    # (a trim before the NMS would let it take A's place).
    boxes = torch.tensor(
        [[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60], [80, 80, 90, 90], [20, 20, 30, 30.0]],
        device=DEVICE,
    )
    losses = torch.tensor([5.0, 4.0, 3.0, 1.0, 2.0], device=DEVICE)
    labels = torch.tensor([1, 1, 1, 1, 0], device=DEVICE)
    common = dict(batch_size=3, nms_thresh=0.7, nms_per_label=True, background_label=1)
    keep, num_after_nms = select_hard_examples(losses, boxes, labels, **common)
    assert keep.tolist() == [0, 2, 4] and num_after_nms == 4
    keep, num_after_nms = select_hard_examples(
        losses, boxes, labels, trim_bg_fraction=0.34, **common
    )
    assert keep.tolist() == [2, 4, 3] and num_after_nms == 4


def test_easy_background_share():
    # B = 4, floor(0.5 * 4) = 2 easy slots: the 2 hardest (r1, r2) by loss, then 2 drawn
    # uniformly from the other background candidates r3, r4... and here only those two.
    keep, _, _ = _select(batch_size=4, easy_bg_fraction=0.5)
    assert keep[:2] == [1, 2] and sorted(keep[2:]) == [3, 4]
    # B = 2, 1 easy slot: r1 by hardness, 1 of {r2, r3, r4} at random, each about 1/3.
    torch.manual_seed(0)
    counts = {2: 0, 3: 0, 4: 0}
    for _ in range(600):
        keep, _, _ = _select(batch_size=2, easy_bg_fraction=0.5)
        assert keep[0] == 1
        counts[keep[1]] += 1
    assert all(150 < c < 250 for c in counts.values()), counts


def test_easy_background_is_drawn_from_global_rng_and_excludes_trimmed():
    losses = torch.arange(10.0, 0.0, -1.0).to(DEVICE)  # RoI i has loss 10 - i: hardest first
    boxes = torch.stack(
        [
            torch.arange(10.0) * 20,
            torch.zeros(10),
            torch.arange(10.0) * 20 + 10,
            torch.full((10,), 10.0),
        ],
        dim=1,
    ).to(DEVICE)
    # RoI 0 fg, the rest bg (label 1)
    labels = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 1], device=DEVICE)
    common = dict(batch_size=4, nms_thresh=1.0, nms_per_label=True, background_label=1)
    # 9 bg, floor(0.25 * 9) = 2 trimmed (RoIs 1, 2); 2 hard: RoIs 0, 3; easy from 4..9.
    torch.manual_seed(5)
    keep, _ = select_hard_examples(
        losses, boxes, labels, trim_bg_fraction=0.25, num_easy_bg=2, **common
    )
    # Drawn with the default generator of the labels' device.
    torch.manual_seed(5)
    pool = torch.tensor([4, 5, 6, 7, 8, 9], device=DEVICE)
    expected_easy = pool[torch.randperm(6, device=DEVICE)[:2]]
    assert keep[:2].tolist() == [0, 3]
    assert keep[2:].tolist() == expected_easy.tolist()


def test_iou_bins():
    ious = torch.tensor([0.0, 0.05, 0.1, 0.29, 0.3, 0.49, 0.5, 0.7])
    assert [IOU_BIN_NAMES[i] for i in iou_bin(ious).tolist()] == [
        "0", "(0,0.1)", "[0.1,0.3)", "[0.1,0.3)", "[0.3,0.5)", "[0.3,0.5)", ">=0.5", ">=0.5",
    ]  # fmt: skip


def _random_batch(g, num_images=3, num_rois=40):
    """Labelled proposals (K = 2, labels in {-1, 0, 1, 2}), readonly predictions, predictor."""
    _, _, predictor = _case()
    proposals = []
    for i in range(num_images):
        xy = torch.rand(num_rois, 2, generator=g) * 150
        props = Instances((200, 200))
        props.proposal_boxes = Boxes(
            torch.cat([xy, xy + torch.rand(num_rois, 2, generator=g) * 50 + 2], 1)
        )
        props.gt_classes = torch.randint(-1, 3, (num_rois,), generator=g)
        if i < num_images - 1:
            jitter = torch.rand(num_rois, 4, generator=g) - 0.5
            props.gt_boxes = Boxes(props.proposal_boxes.tensor + jitter)
        else:  # an image without ground truth: no gt_boxes, only background and ignored
            props.gt_classes[props.gt_classes >= 0] = 2
        props.index = torch.arange(num_rois)
        proposals.append(props)
    scores = torch.randn(num_images * num_rois, 3, generator=g) * 2
    deltas = torch.randn(num_images * num_rois, 8, generator=g) * 0.1
    return on_device(proposals), on_device((scores, deltas)), predictor


def test_options_off_is_the_paper_selection_and_draws_no_random_numbers():
    # select() with the defaults against the paper's rule written one RoI at a time
    # (tests/test_ohem_mining.py: reference_select) on the same per-RoI losses.
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        proposals, predictions, predictor = _random_batch(g)
        miner = HardExampleMiner(batch_size_per_image=8)
        losses = miner.scorer.losses(predictor, predictions, proposals)
        rng = torch.get_rng_state()
        with EventStorage():
            hard = miner.select(proposals, predictions, predictor)
        assert torch.equal(torch.get_rng_state(), rng)
        for props, loss, h in zip(proposals, losses, hard):
            expected, _ = reference_select(
                loss.tolist(), props.proposal_boxes.tensor.tolist(), props.gt_classes.tolist(),
                batch_size=8, nms_thresh=0.7, nms_per_label=True,
            )  # fmt: skip
            assert h.index.tolist() == expected


def test_diagnostics_by_hand_on_an_image_without_ground_truth_and_a_hard_set_without_background():
    # Image 1: the hand case (hard set r1, r2: both background). Image 2: no ground truth, 2
    # RoIs, both background (IoU 0 by definition), both p(class 0) = 0.8: suspects.
    proposals, (scores, deltas), predictor = _case()
    empty = Instances((200, 200))
    empty.proposal_boxes = Boxes(torch.tensor([[0, 0, 50, 50], [100, 0, 150, 50.0]]))
    empty.gt_classes = torch.tensor([2, 2])
    empty = on_device(empty)
    probs, zeros = on_device((torch.tensor([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1]]), torch.zeros(2, 8)))
    predictions = (torch.cat([scores, probs.log()]), torch.cat([deltas, zeros]))
    miner = HardExampleMiner(batch_size_per_image=2, nms_thresh=1.0)
    with EventStorage() as storage:
        hard = miner.select([proposals[0], empty], predictions, predictor)
        scalars = {k: v[0] for k, v in storage.latest().items()}
    assert hard[1].suspect_bg.tolist() == [True, True]
    # 4 hard RoIs, all background; IoU 0: r1 and both of image 2 (3 of 4); r2 in [0.3, 0.5).
    assert scalars["ohem/hard_set/background"] == 1
    assert scalars["ohem/hard_bg_iou/0"] == 0.75
    assert scalars["ohem/hard_bg_iou/[0.3,0.5)"] == 0.25
    # Suspects: r1, and both RoIs of image 2 -> 3 of 4 hard background; 3 / 2 per image.
    assert scalars["ohem/hard_bg_suspect"] == 0.75
    assert scalars["ohem/num_suspect_candidates"] == 1.5
    # A hard set without background: r1 excluded (suspect), of the other background r2, r3,
    # r4, floor(0.99 * 3) = 2 trimmed (r2, r3); the hardest left is r0 (0.511, foreground).
    keep, _, scalars = _select(batch_size=1, trim_bg_fraction=0.99, suspect_bg_weight=0.0)
    assert keep == [0]
    assert scalars["ohem/hard_set/RBC"] == 1 and scalars["ohem/hard_set/background"] == 0
    assert all(scalars[f"ohem/hard_bg_iou/{name}"] == 0 for name in IOU_BIN_NAMES)
    assert scalars["ohem/hard_bg_suspect"] == 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("SUSPECT_BG_WEIGHT", 1.5, r"SUSPECT_BG_WEIGHT must be in \[0, 1\]"),
        ("SUSPECT_BG_SCORE", -0.1, r"SUSPECT_BG_SCORE must be in \[0, 1\]"),
        (
            "SUSPECT_BG_MAX_IOU",
            0.0,
            r"SUSPECT_BG_MAX_IOU must be in \(0, 1\]",
        ),
        ("TRIM_BG_FRACTION", 1.0, r"TRIM_BG_FRACTION must be in \[0, 1\)"),
        ("EASY_BG_FRACTION", 1.0, r"EASY_BG_FRACTION must be in \[0, 1\)"),
    ],
)
def test_out_of_range_options_name_their_key(key, value, message):
    cfg = _cfg("OHEMROIHeads")
    cfg.MODEL.ROI_HEADS.OHEM[key] = value
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.OHEM." + message):
        _build(cfg)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_excludes_suspects_and_logs_the_makeup(name):
    # Score threshold 0 and IoU bound 1: every background candidate is a suspect, so with
    # weight 0 the hard sets hold foreground only.
    cfg = _cfg(name)
    cfg.MODEL.ROI_HEADS.OHEM.SUSPECT_BG_WEIGHT = 0.0
    cfg.MODEL.ROI_HEADS.OHEM.SUSPECT_BG_SCORE = 0.0
    cfg.MODEL.ROI_HEADS.OHEM.SUSPECT_BG_MAX_IOU = 1.0
    head = _build(cfg)
    hard, _, scalars = _train_step(head, *_batch(name))
    assert all((h.gt_classes < 3).all() for h in hard)
    prefix = "stage0/" if "Cascade" in name else ""
    assert scalars[f"{prefix}ohem/hard_set/background"] == 0
    names = [f"class{k}" for k in range(3)]
    assert sum(scalars[f"{prefix}ohem/hard_set/{n}"] for n in names) == pytest.approx(1)
