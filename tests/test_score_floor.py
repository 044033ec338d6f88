"""The score-floor study's rule and its platelet-rank count, on hand-built cases."""

import torch

from studies.score_floor import above_lowest_true, decide

SEEDS = range(5)


def _runs(maps, platelets):
    return {
        s: {"voc_AP50_allpoint": m, "per_class_AP50_allpoint": {"Platelets": p}}
        for s, m, p in zip(SEEDS, maps, platelets)
    }


def test_ineligible_paper_loses_and_a_tie_goes_to_the_fewer_changes():
    table = {
        "frcn": _runs([65] * 5, [40] * 5),
        # seed 4's platelets 5 < 0.8 x 40 = 32: not eligible, whatever its mean
        "paper": _runs([75] * 5, [45, 45, 45, 45, 5]),
        "paper+prior": _runs([70] * 5, [32] * 5),  # 32 >= 32: eligible, mean 70
        "fg25": _runs([70.9] * 5, [40] * 5),  # eligible, 70.9 - 70 < 1.0: a tie
    }
    winner, _ = decide(table, ("paper", "paper+prior", "fg25"))
    assert winner == "paper+prior"
    table["fg25"] = _runs([71.1] * 5, [40] * 5)  # 1.1 ahead: no longer a tie
    assert decide(table, ("paper", "paper+prior", "fg25"))[0] == "fg25"


def test_eligible_paper_stays_unless_the_gain_is_outside_the_noise():
    table = {
        "frcn": _runs([65] * 5, [40] * 5),
        "paper": _runs([70, 70, 70, 70, 70], [40] * 5),
        # mean gain (+6 +6 +6 -3 -3) / 5 = +2.4, but positive on 3 seeds of 5 only
        "fg25": _runs([76, 76, 76, 67, 67], [40] * 5),
    }
    assert decide(table, ("paper", "fg25"))[0] == "paper"
    # positive on 4 of 5 and +1.2 on the mean: replaces the paper
    table["fg25"] = _runs([71.5, 71.5, 71.5, 71.5, 70], [40] * 5)
    assert decide(table, ("paper", "fg25"))[0] == "fg25"


def test_without_an_eligible_candidate_the_most_eligible_seeds_win():
    table = {
        "frcn": _runs([65] * 5, [40] * 5),
        "paper": _runs([80] * 5, [0, 0, 0, 40, 40]),  # 2 eligible seeds
        "fg25": _runs([60] * 5, [0, 40, 40, 40, 40]),  # 4
    }
    winner, reasons = decide(table, ("paper", "fg25"))
    assert winner == "fg25" and "no candidate is eligible" in reasons[-1]


def test_detections_above_the_lowest_true_platelet():
    platelet, rbc = 2, 0
    scores = torch.tensor([0.9, 0.8, 0.6, 0.4, 0.3])
    classes = torch.tensor([rbc, platelet, rbc, platelet, platelet])
    boxes = torch.tensor(
        [
            [0, 0, 10, 10],
            [20, 20, 30, 30],  # on platelet A (IoU 1)
            [50, 50, 60, 60],
            [71, 70, 81, 80],  # on platelet B (IoU 90 / 110 = 0.82)
            [200, 200, 210, 210],  # on nothing
        ],
        dtype=torch.float32,
    )
    gt = [[20, 20, 30, 30], [70, 70, 80, 80], [300, 300, 310, 310]]  # C is never found
    # B's best detection scores 0.4: three detections (0.9, 0.8, 0.6) score above it.
    assert above_lowest_true((scores, classes, boxes), gt, platelet) == 3
    assert above_lowest_true((scores, classes, boxes), gt[2:], platelet) is None
    assert above_lowest_true((scores, classes, boxes), [], platelet) is None
