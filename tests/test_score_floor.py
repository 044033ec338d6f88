"""The score-floor study's rule and its platelet-rank count, on hand-built cases."""

import torch

from studies.score_floor import FLOOR_CANDIDATES, above_lowest_true, decide, decide_floor

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


def _floor_table(bars, platelets, maps, cocos):
    """FRCN, paper and the four corrections; per candidate (bar, platelets, mAP50, COCO AP)."""
    table = {"frcn": _runs([64] * 5, [30] * 5), "paper": _runs([68] * 5, [38] * 5)}
    for name in FLOOR_CANDIDATES:
        table[name] = _runs([maps[name]] * 5, [platelets[name]] * 5)
        for s in range(5):
            table[name][s]["median_lowest_kept_score"] = bars[name]
            table[name][s]["coco_AP"] = cocos[name]
    for s in range(5):
        table["paper"][s]["coco_AP"] = 34.0
    return table


def test_floor_rule_needs_the_floor_gone_and_the_platelets_kept():
    names = FLOOR_CANDIDATES  # prior, prior-fgbg, sampler, sampler-fgbg
    bars = dict(zip(names, [0.05, 0.05, 0.16, 0.10]))
    platelets = dict(zip(names, [0.0, 24.0, 40.0, 36.0]))  # 0.8 x 30 = 24: kept
    maps = dict(zip(names, [60.0, 69.0, 70.0, 68.5]))
    cocos = dict(zip(names, [33.0, 33.5, 34.0, 34.5]))
    choice, reasons = decide_floor(_floor_table(bars, platelets, maps, cocos))
    # prior: platelets lost; sampler: floor left (0.16 > 0.15). prior-fgbg (69.0) and
    # sampler-fgbg (68.5) tie within 1.0: the higher COCO AP wins.
    assert choice == "paper+sampler-fgbg", reasons
    # The same, 1.5 below paper OHEM's mAP50: not recommended.
    maps = {n: m - 2.0 for n, m in maps.items()}
    assert decide_floor(_floor_table(bars, platelets, maps, cocos))[0] is None


def test_floor_rule_without_an_eligible_candidate_recommends_nothing():
    names = FLOOR_CANDIDATES
    bars = dict.fromkeys(names, 0.3)
    table = _floor_table(
        bars, dict.fromkeys(names, 40.0), dict.fromkeys(names, 70.0), dict.fromkeys(names, 35.0)
    )
    assert decide_floor(table)[0] is None
