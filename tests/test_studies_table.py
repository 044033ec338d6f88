"""studies/table.py: the BCCD studies' tables read from hand-written summary.json files."""

import json

import pytest
from helpers import row_cells, table_rows

from studies.table import (
    MINED,
    format_runs,
    load_grid,
    load_run,
    load_seeds,
    main,
    pick_rate,
    variant_verdict,
)


def summary(method, seed, m, coco, **more):
    per_class = {"RBC": m - 1, "WBC": m + 1, "Platelets": m - 2}
    return {
        "method": method,
        "seed": seed,
        "voc_AP50_allpoint": m,
        "coco_AP": coco,
        "per_class_AP50_allpoint": per_class,
        "mean_detections_per_image": 100.0,
        "median_lowest_kept_score": 0.1,
        "test_datasets": ["bccd_val"],
        **more,
    }


def write_run(folder, summaries):
    """A demo --output-dir: its summary.json and each evaluation's own folder."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summaries))
    for s in summaries:
        name = "ohem_recommended" if s.get("recommended") else s["method"]
        (folder / name).mkdir()
        (folder / name / "summary.json").write_text(json.dumps(s))


def test_mean_and_spread_are_the_hand_computed_ones():
    table = {"frcn": {0: summary("frcn", 0, 60.0, 30.0), 1: summary("frcn", 1, 64.0, 33.0)}}
    lines = format_runs(table).splitlines()
    # mAP50: mean (60 + 64) / 2 = 62.0, spread 4.0; COCO AP 31.5 and 3.0
    assert row_cells(lines[-1])[:4] == ["**frcn**", "mean (spread)", "62.0 (4.0)", "31.5 (3.0)"]
    assert row_cells(lines[2])[:7] == ["frcn", "0", "60.0", "30.0", "59.0", "61.0", "58.0"]


def test_a_column_a_run_did_not_record_is_a_dash():
    s = summary("frcn", 0, 60.0, 30.0)
    del s["median_lowest_kept_score"]
    lines = format_runs({"frcn": {0: s}}).splitlines()
    assert row_cells(lines[2])[-2:] == ["100.0", "-"] and row_cells(lines[3])[-1] == "-"


def test_separate_method_runs_of_one_seed_read_as_one(tmp_path):
    frcn, ohem = tmp_path / "frcn_s0", tmp_path / "ohem_s0"
    for folder, method in ((frcn, "frcn"), (ohem, "ohem")):
        (folder / method).mkdir(parents=True)
        (folder / method / "summary.json").write_text(json.dumps(summary(method, 0, 60, 30)))
    assert [s["method"] for s in load_run(f"{frcn}:{ohem}")] == ["frcn", "ohem"]
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        load_run(str(tmp_path / "nothing"))


def test_the_seeds_table_names_frcn_paper_and_recommended(tmp_path, capsys):
    for seed in (0, 1):
        runs = [summary("frcn", seed, 60, 30), summary("ohem", seed, 62 + seed, 31)]
        runs.append(summary("ohem", seed, 65, 33, recommended=True))
        write_run(tmp_path / f"s{seed}", runs)
    table = load_seeds([tmp_path / "s0", tmp_path / "s1"])
    assert {k: sorted(v) for k, v in table.items()} == {
        "frcn": [0, 1],
        "paper": [0, 1],
        "recommended": [0, 1],
    }
    main(["seeds", str(tmp_path / "s0"), str(tmp_path / "s1")])
    rows = table_rows(capsys.readouterr().out)
    assert ["paper", "1", "+3.0", "+1.0"] in rows and ["recommended", "0", "+5.0", "+3.0"] in rows
    with pytest.raises(ValueError, match="second frcn run of seed 0"):
        load_seeds([tmp_path / "s0", tmp_path / "s0"])


def test_the_grid_rule_picks_the_best_mean_and_breaks_a_tie_on_coco(tmp_path):
    values = {  # (lr, seed): (frcn mAP50, COCO AP), ohem is FRCN + 1 at 0.005 only
        ("0.01", 0): (60, 30),
        ("0.01", 1): (64, 30),
        ("0.005", 0): (63, 31),
        ("0.005", 1): (61, 31),
    }
    for (lr, seed), (m, coco) in values.items():
        opts = ["SOLVER.BASE_LR", lr]
        runs = [summary("frcn", seed, m, coco, opts=opts)]
        runs.append(summary("ohem", seed, m + (lr == "0.005"), coco, opts=opts))
        write_run(tmp_path / f"lr{lr}_s{seed}", runs)
    rows = load_grid(str(tmp_path / "lr{lr}_s{seed}"), ["0.01", "0.005"], [0, 1])
    # FRCN: both means are 62.0; COCO AP 31 > 30 picks 0.005. OHEM: 63.0 > 62.0.
    assert pick_rate(rows, "frcn", ["0.01", "0.005"], [0, 1]) == "0.005"
    assert pick_rate(rows, "ohem", ["0.01", "0.005"], [0, 1]) == "0.005"
    assert pick_rate(rows, "ohem", ["0.01", "0.005", "0.02"], [0, 1]) is None  # not run


def test_a_grid_run_of_another_rate_is_refused(tmp_path):
    write_run(tmp_path / "lr0.01_s0", [summary("frcn", 0, 60, 30, opts=["SOLVER.BASE_LR", "0.02"])])
    with pytest.raises(ValueError, match="trained with"):
        load_grid(str(tmp_path / "lr{lr}_s{seed}"), ["0.01"], [0])


def test_a_variant_must_win_the_mean_and_most_seeds_in_both_metrics():
    paper = {s: summary("ohem", s, 60, 30) for s in (0, 1, 2)}
    # mAP50 +3, -1, +1 (mean +1, 2 of 3) and COCO AP +1, +1, -3 (mean -0.33, 2 of 3)
    variant = {
        0: summary("ohem", 0, 63, 31),
        1: summary("ohem", 1, 59, 31),
        2: summary("ohem", 2, 61, 27),
    }
    passed, results = variant_verdict({"paper": paper, "v": variant}, "v")
    assert passed is False
    assert [(c, round(m, 2), w) for c, m, w in results] == [
        ("voc_AP50_allpoint", 1.0, 2),
        ("coco_AP", -0.33, 2),
    ]
    variant[2] = summary("ohem", 2, 61, 31)
    assert variant_verdict({"paper": paper, "v": variant}, "v")[0] is True
    del variant[2]
    assert variant_verdict({"paper": paper, "v": variant}, "v") == (None, [])


def test_the_grid_command_prints_every_run_the_means_and_the_rates(tmp_path, capsys):
    for lr, seed in ((lr, seed) for lr in ("0.01", "0.005") for seed in (0, 1)):
        opts = ["SOLVER.BASE_LR", lr]
        m = {"0.01": 60, "0.005": 62}[lr] + seed
        write_run(tmp_path / f"lr{lr}_s{seed}", [summary("frcn", seed, m, 30, opts=opts)])
    main(["grid", str(tmp_path / "lr{lr}_s{seed}"), "--lrs", "0.01", "0.005"])
    out = capsys.readouterr().out.splitlines()
    first = ["0", "frcn", "0.01", "60.0", "-", "59.0", "61.0", "58.0", "30.0"]
    assert row_cells(out[2])[:9] == first
    assert any(r[:4] == ["mean", "frcn", "0.005", "62.5"] for r in table_rows("\n".join(out)))
    assert "- frcn: BASE_LR 0.005" in out and "- ohem: not all runs finished" in out


def test_the_variants_command_reads_the_baseline_runs_and_the_miner(tmp_path, capsys):
    for seed in (0, 1, 2):
        write_run(
            tmp_path / f"base_s{seed}",
            [summary("frcn", seed, 60, 30), summary("ohem", seed, 62, 31)],
        )
        write_run(tmp_path / f"v_s{seed}", [summary("ohem", seed, 63, 32, ohem_opts=["X", "1"])])
        record = {key: 0.5 for _, key in MINED}
        lines = [json.dumps({"iteration": 1}), json.dumps(record)]
        (tmp_path / f"v_s{seed}" / "ohem" / "metrics.json").write_text("\n".join(lines))
    base, variant = str(tmp_path / "base_s{seed}"), "v=" + str(tmp_path / "v_s{seed}")
    main(["variants", "--baseline", base, variant])
    out = capsys.readouterr().out.splitlines()
    assert any(r[:3] == ["mean", "v - ohem", "1.0"] for r in table_rows("\n".join(out)))
    assert "- v: RECOMMENDED" in out
    assert row_cells(out[-1])[:3] == ["v", "`X 1`", "0.500"]


def test_the_cap_diagnostic_takes_frcn_from_the_first_folder_and_ohem_from_the_second(tmp_path):
    from studies.detection_cap import trained_runs

    for lr in ("0.01", "0.005"):
        runs = [summary("frcn", 0, 60, 30), summary("ohem", 0, 62, 31)]
        runs.append(summary("ohem", 0, 65, 33, recommended=True))
        write_run(tmp_path / lr, runs)
        for method in ("frcn", "ohem"):
            (tmp_path / lr / method / "model_final.pth").write_bytes(b"")
    a, b = str(tmp_path / "0.01"), str(tmp_path / "0.005")
    assert [(f, s["method"]) for f, s in trained_runs(f"{a}:{b}")] == [(a, "frcn"), (b, "ohem")]
    assert [(f, s["method"]) for f, s in trained_runs(a)] == [(a, "frcn"), (a, "ohem")]


def test_a_folder_read_by_its_method_folders_after_separate_method_runs(tmp_path):
    """`--methods frcn` then `--methods ohem` into one folder: the folder's own summary.json
    lists only OHEM, the method folders hold both."""
    write_run(tmp_path / "run", [summary("frcn", 0, 60, 30)])
    write_run(tmp_path / "later", [summary("ohem", 0, 62, 31)])
    (tmp_path / "later" / "ohem").rename(tmp_path / "run" / "ohem")
    (tmp_path / "later" / "summary.json").replace(tmp_path / "run" / "summary.json")
    assert sorted(s["method"] for s in load_run(tmp_path / "run")) == ["frcn", "ohem"]


def test_frcn_dir_and_ohem_dir_take_each_method_from_its_own_folder(tmp_path):
    for lr, m in (("0.01", 60), ("0.005", 62)):
        write_run(tmp_path / lr, [summary("frcn", 0, m, 30), summary("ohem", 0, m + 5, 31)])
    runs = load_run(f"{tmp_path / '0.01'}:{tmp_path / '0.005'}")
    assert {s["method"]: s["voc_AP50_allpoint"] for s in runs} == {"frcn": 60, "ohem": 67}


def test_a_variant_not_run_yet_has_no_row_and_no_verdict(tmp_path, capsys):
    for seed in (0, 1, 2):
        write_run(
            tmp_path / f"base_s{seed}",
            [summary("frcn", seed, 60, 30), summary("ohem", seed, 62, 31)],
        )
    main(
        ["variants", "--baseline", str(tmp_path / "base_s{seed}"), "v=" + str(tmp_path / "v{seed}")]
    )
    out = capsys.readouterr().out.splitlines()
    assert "- v: only seeds [] ran; no verdict" in out
    assert not any(r[0] == "v" or "v - ohem" in r for r in table_rows("\n".join(out)))
