"""Box voting on a hand-built case, the weights and the means written out."""

import torch

from ohem_d2.modeling.box_voting import vote_boxes


def test_kept_box_becomes_the_score_weighted_mean_of_its_class_neighbours():
    # The pool (x0, y0, x1, y1), score, class, and IoU with the kept box A:
    #   A [0, 0, 10, 10]   0.9  class 0   IoU 1                    -> neighbour, weight 0.9
    #   B [1, 1, 11, 11]   0.6  class 0   81 / (100 + 100 - 81)    -> 0.68, weight 0.6
    #   C [0, 0, 10, 20]   0.5  class 0   100 / 200 = 0.5 (>= 0.5) -> neighbour, weight 0.5
    #   D [20, 20, 30, 30] 0.8  class 0   0                        -> not a neighbour
    #   E [0, 0, 10, 10]   0.7  class 1   1, but another class     -> not a neighbour
    #   F [0, 0, 10, 12]   0.3  class 1   (E's neighbour: IoU 100 / 120 = 0.83)
    # A votes: (0.9 A + 0.6 B + 0.5 C) / (0.9 + 0.6 + 0.5 = 2.0)
    #   x0 = (0 + 0.6 + 0) / 2 = 0.3          y0 = 0.3
    #   x1 = (9 + 6.6 + 5) / 2 = 10.3         y1 = (9 + 6.6 + 10) / 2 = 12.8
    # D keeps itself: its only neighbour is D.
    # E votes: (0.7 E + 0.3 F) / 1.0 = [0, 0, 10, 0.7 * 10 + 0.3 * 12 = 10.6]
    pool = torch.tensor(
        [
            [0, 0, 10, 10],
            [1, 1, 11, 11],
            [0, 0, 10, 20],
            [20, 20, 30, 30],
            [0, 0, 10, 10],
            [0, 0, 10, 12],
        ],
        dtype=torch.float32,
    )
    scores = torch.tensor([0.9, 0.6, 0.5, 0.8, 0.7, 0.3])
    classes = torch.tensor([0, 0, 0, 0, 1, 1])
    kept = [0, 3, 4]  # A, D, E: what an NMS at 0.3 keeps here
    voted = vote_boxes(pool[kept], classes[kept], pool, scores, classes, iou_thresh=0.5)
    expected = torch.tensor([[0.3, 0.3, 10.3, 12.8], [20, 20, 30, 30], [0, 0, 10, 10.6]])
    torch.testing.assert_close(voted, expected)


def test_threshold_is_inclusive_and_a_stricter_one_drops_the_neighbour():
    # C has IoU exactly 0.5 with A: in at 0.5, out at 0.51 (then (0.9 A + 0.6 B) / 1.5).
    pool = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 20]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.6, 0.5])
    classes = torch.zeros(3, dtype=torch.long)
    voted = vote_boxes(pool[:1], classes[:1], pool, scores, classes, iou_thresh=0.51)
    # x0 = 0.6 / 1.5 = 0.4; x1 = (9 + 6.6) / 1.5 = 10.4
    torch.testing.assert_close(voted, torch.tensor([[0.4, 0.4, 10.4, 10.4]]))


def test_empty_inputs():
    boxes = torch.zeros(0, 4)
    labels = torch.zeros(0, dtype=torch.long)
    assert vote_boxes(boxes, labels, boxes, torch.zeros(0), labels, 0.5).shape == (0, 4)
