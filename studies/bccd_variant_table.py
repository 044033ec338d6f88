"""Issue 13's table: FRCN, paper OHEM and OHEM variants on BCCD over seeds 0, 1 and 2.

    python benchmarks/bccd_variant_table.py \\
        suspect=output/var_suspect_s{seed} trim=output/var_trim_s{seed} \\
        easy=output/var_easy_s{seed} nodrop=output/var_nodrop_s{seed}

Each NAME=PATTERN names one variant and the --output-dir of its run per seed ({seed} is
replaced by 0, 1, 2), made by `python -m ohem_d2.demo --methods ohem --seed S --ohem-opts ...`.
The FRCN and paper OHEM rows are read from the 3-seed table at LR 0.02 in
benchmarks/bccd_seeds.md (same demo code, same seeds, the rate the variants ran at). Prints
Markdown: every run, the means, each variant minus paper
OHEM, the verdict of issue 13's rule (better than paper OHEM on the 3-seed mean AND on at
least 2 of 3 seeds, in both all-point mAP50 and COCO AP), and what each variant's miner
mined at the end of training (metrics.json, Detectron2's 20-iteration smoothing).
"""

import json
import os
import re
import statistics
import sys

from bccd_seed_table import COLUMNS, _fmt

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = (0, 1, 2)
VERDICT_COLUMNS = ("mAP50 all-pt", "COCO AP")
MINED = [
    ("hard bg share", "ohem/hard_set/background"),
    ("hard bg IoU 0", "ohem/hard_bg_iou/0"),
    ("(0,0.1)", "ohem/hard_bg_iou/(0,0.1)"),
    ("[0.1,0.3)", "ohem/hard_bg_iou/[0.1,0.3)"),
    ("[0.3,0.5)", "ohem/hard_bg_iou/[0.3,0.5)"),
    ("suspect share of hard bg", "ohem/hard_bg_suspect"),
    ("suspects per image", "ohem/num_suspect_candidates"),
]


BASELINE = os.path.join(HERE, "bccd_seeds.md")


# The variants ran at the demo's former rate, 0.02: their baseline is that section's table.
BASELINE_SECTION = "## LR 0.02"


def baseline_rows(path=BASELINE):
    """{(method, seed): {column: value}} from the LR 0.02 table of bccd_seeds.md."""
    names = [n for n, _ in COLUMNS]
    rows = {}
    with open(path) as f:
        inside = False
        for line in f:
            if line.startswith("#"):  # the section's first table ends at the next heading
                if inside:
                    break
                inside = line.startswith(BASELINE_SECTION)
            if not inside:
                continue
            m = re.match(r"\| (\d) \| (frcn|ohem) \| (.*) \|$", line.strip())
            if m:
                values = [float(v) for v in m.group(3).split(" | ")]
                rows[(m.group(2), int(m.group(1)))] = dict(zip(names, values))
    return rows


def variant_rows(name, pattern):
    rows, mined = {}, {}
    for seed in SEEDS:
        folder = pattern.format(seed=seed)
        if not os.path.isfile(os.path.join(folder, "summary.json")):
            continue  # not run (yet): the tables say which seeds each mean covers
        with open(os.path.join(folder, "summary.json")) as f:
            (summary,) = [s for s in json.load(f) if s["method"] == "ohem"]
        assert summary["seed"] == seed, (folder, summary["seed"])
        rows[(name, seed)] = {n: get(summary) for n, get in COLUMNS}
        with open(os.path.join(folder, "ohem", "metrics.json")) as f:
            last = [json.loads(line) for line in f if "ohem/hard_set/background" in line][-1]
        mined[(name, seed)] = {label: last[key] for label, key in MINED}
        mined[(name, seed)]["opts"] = " ".join(summary["ohem_opts"])
    return rows, mined


def main(specs):
    rows = baseline_rows()
    methods = ["frcn", "ohem"]
    mined = {}
    for spec in specs:
        name, pattern = spec.split("=", 1)
        more, more_mined = variant_rows(name, pattern)
        rows.update(more)
        mined.update(more_mined)
        methods.append(name)
    names = [n for n, _ in COLUMNS]
    header = "| seed | method | " + " | ".join(names) + " |"
    rule = "|---" * (len(names) + 2) + "|"
    lines = [header, rule]

    def seeds_of(method):
        return [s for s in SEEDS if (method, s) in rows]

    for seed in SEEDS:
        for method in methods:
            if (method, seed) not in rows:
                continue
            cells = [_fmt(rows[(method, seed)][n], n) for n in names]
            lines.append(f"| {seed} | {method} | " + " | ".join(cells) + " |")
    for method in methods:
        seeds = seeds_of(method)
        mean = [_fmt(statistics.mean(rows[(method, s)][n] for s in seeds), n) for n in names]
        label = "mean" if len(seeds) == len(SEEDS) else f"mean of seeds {seeds}"
        lines.append(f"| {label} | {method} | " + " | ".join(mean) + " |")
    for method in methods[2:]:
        for seed in (*seeds_of(method), "mean"):
            seeds = seeds_of(method) if seed == "mean" else (seed,)
            diff = [
                _fmt(statistics.mean(rows[(method, s)][n] - rows[("ohem", s)][n] for s in seeds), n)
                for n in names
            ]
            lines.append(f"| {seed} | {method} - ohem | " + " | ".join(diff) + " |")
    print("\n".join(lines))

    print("\nIssue 13's rule (better than paper OHEM on the mean and on >= 2 of 3 seeds, in both")
    print("all-point mAP50 and COCO AP):\n")
    for method in methods[2:]:
        seeds = seeds_of(method)
        if len(seeds) < len(SEEDS):
            print(f"- {method}: only seeds {seeds} ran; no verdict")
            continue
        passed = []
        for column in VERDICT_COLUMNS:
            diffs = [rows[(method, s)][column] - rows[("ohem", s)][column] for s in SEEDS]
            wins = sum(d > 0 for d in diffs)
            passed.append(statistics.mean(diffs) > 0 and wins >= 2)
            print(f"- {method}, {column}: mean {statistics.mean(diffs):+.1f}, better on {wins}/3")
        print(f"- {method}: {'RECOMMENDED' if all(passed) else 'not recommended'}")
        vs_frcn = [
            rows[(method, s)]["mAP50 all-pt"] - rows[("frcn", s)]["mAP50 all-pt"] for s in SEEDS
        ]
        print(f"  (against FRCN, mAP50 all-pt: {', '.join(f'{d:+.1f}' for d in vs_frcn)})")

    print("\nWhat each variant mined at the end of training (mean over its seeds):\n")
    print("| variant | options | " + " | ".join(label for label, _ in MINED) + " |")
    print("|---" * (len(MINED) + 2) + "|")
    for method in methods[2:]:
        seeds = seeds_of(method)
        cells = [
            f"{statistics.mean(mined[(method, s)][label] for s in seeds):.3f}" for label, _ in MINED
        ]
        opts = mined[(method, seeds[0])]["opts"]
        print(f"| {method} | `{opts}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
