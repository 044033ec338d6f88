"""The demo's FRCN vs OHEM table over several seeds, from their summary.json files.

    python benchmarks/bccd_seed_table.py output/demo_seed0 output/demo_seed1 output/demo_seed2

Each folder is the --output-dir of one `python -m ohem_d2.demo --seed S` run (or
FRCN_DIR:OHEM_DIR, the two --output-dirs of one seed's `--methods frcn` and `--methods ohem`;
where two folders hold the same method, the later one's summary counts).
Prints a Markdown table: per seed and method the all-point and 11-point mAP50, per-class AP50, COCO
AP / AP50 / AP75, the final all-RoI loss (fg + bg) and s/iter; then the mean and the spread
(max - min) over the seeds, and OHEM - FRCN per seed.
"""

import json
import os
import statistics
import sys

COLUMNS = [
    ("mAP50 all-pt", lambda s: s["voc_AP50_allpoint"]),
    ("mAP50 11-pt", lambda s: s["voc_AP50_11point"]),
    ("RBC", lambda s: s["per_class_AP50_allpoint"]["RBC"]),
    ("WBC", lambda s: s["per_class_AP50_allpoint"]["WBC"]),
    ("Platelets", lambda s: s["per_class_AP50_allpoint"]["Platelets"]),
    ("COCO AP", lambda s: s["coco_AP"]),
    ("COCO AP50", lambda s: s["coco_AP50"]),
    ("COCO AP75", lambda s: s["coco_AP75"]),
    ("all-RoI loss", lambda s: s["final_roi_loss"]["mean_roi_loss"]),
    ("fg part", lambda s: s["final_roi_loss"]["fg_part"]),
    ("bg part", lambda s: s["final_roi_loss"]["bg_part"]),
    ("s/iter", lambda s: s["s_per_iter"]),
]


def _fmt(value, name):
    return (
        f"{value:.3f}"
        if name in ("all-RoI loss", "fg part", "bg part", "s/iter")
        else f"{value:.1f}"
    )


def load_runs(spec):
    """{method: (folder, summary)} of one DIR, or FRCN_DIR:OHEM_DIR when the two methods of a
    seed ran separately (`--methods frcn` / `--methods ohem`): <folder>/<method>/summary.json."""
    run = {}
    for folder in spec.split(":"):
        for method in ("frcn", "ohem"):
            path = os.path.join(folder, method, "summary.json")
            if os.path.isfile(path):
                with open(path) as f:
                    run[method] = (folder, json.load(f))
    return run


def main(dirs):
    runs = []
    for d in dirs:
        run = {method: summary for method, (_, summary) in load_runs(d).items()}
        assert set(run) == {"frcn", "ohem"}, f"{d}: both methods' summaries are needed"
        assert run["frcn"]["seed"] == run["ohem"]["seed"], d
        runs.append(run)
    head = "| seed | method | " + " | ".join(n for n, _ in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 2) + "|"]
    for run in runs:
        for method in ("frcn", "ohem"):
            s = run[method]
            cells = [_fmt(get(s), n) for n, get in COLUMNS]
            lines.append(f"| {s['seed']} | {method} | " + " | ".join(cells) + " |")
    for method in ("frcn", "ohem"):
        values = [[get(r[method]) for r in runs] for _, get in COLUMNS]
        mean = [_fmt(statistics.mean(v), n) for v, (n, _) in zip(values, COLUMNS)]
        spread = [_fmt(max(v) - min(v), n) for v, (n, _) in zip(values, COLUMNS)]
        lines.append(f"| mean | {method} | " + " | ".join(mean) + " |")
        lines.append(f"| spread (max-min) | {method} | " + " | ".join(spread) + " |")
    for run in runs:
        diff = [_fmt(get(run["ohem"]) - get(run["frcn"]), n) for n, get in COLUMNS]
        lines.append(f"| {run['ohem']['seed']} | OHEM - FRCN | " + " | ".join(diff) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
