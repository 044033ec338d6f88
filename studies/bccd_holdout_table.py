"""The learning-rate choice of benchmarks/bccd_holdout.md: each method's runs on bccd_val.

    python benchmarks/bccd_holdout_table.py 'output/val_lr{lr}_s{seed}' \\
        --lrs 0.02 0.01 0.005 --seeds 0 1

PATTERN names the --output-dir of each `python -m ohem_d2.demo --holdout --seed SEED
--opts SOLVER.BASE_LR LR` run. Prints Markdown: every run that finished, the mean per method
and rate over the seeds that ran, and the rate the rule picks for each method (highest mean
all-point mAP50 over all the seeds, COCO AP breaking a tie; no pick while a run is missing).
"""

import argparse
import itertools
import json
import os
import statistics

from bccd_seed_table import COLUMNS, _fmt

METHODS = ("frcn", "ohem")


def load(pattern, lrs, seeds):
    """{(method, lr, seed): {column: value}} of the runs that finished."""
    rows = {}
    for lr in lrs:
        for seed, method in itertools.product(seeds, METHODS):
            # Each method's own summary, written as soon as its run ends.
            path = os.path.join(pattern.format(lr=lr, seed=seed), method, "summary.json")
            if os.path.isfile(path):
                with open(path) as f:
                    s = json.load(f)
                assert s["seed"] == seed and s["test_datasets"] == ["bccd_val"], path
                assert s["opts"] == ["SOLVER.BASE_LR", lr], (path, s["opts"])
                rows[(s["method"], lr, seed)] = {n: get(s) for n, get in COLUMNS}
    return rows


def pick(rows, method, lrs, seeds):
    """The rule's rate for `method`, or None while one of its runs is missing."""
    if any((method, lr, s) not in rows for lr in lrs for s in seeds):
        return None

    def key(lr):
        return tuple(
            statistics.mean(rows[(method, lr, s)][c] for s in seeds)
            for c in ("mAP50 all-pt", "COCO AP")
        )

    return max(lrs, key=key)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("pattern")
    parser.add_argument("--lrs", nargs="+", default=["0.02", "0.01", "0.005"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args(argv)
    rows = load(args.pattern, args.lrs, args.seeds)
    names = [n for n, _ in COLUMNS]
    lines = ["| seed | method | LR | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for seed in args.seeds:
        for method in METHODS:
            for lr in args.lrs:
                if (method, lr, seed) in rows:
                    cells = [_fmt(rows[(method, lr, seed)][n], n) for n in names]
                    lines.append(f"| {seed} | {method} | {lr} | " + " | ".join(cells) + " |")
    for method in METHODS:
        for lr in args.lrs:
            seeds = [s for s in args.seeds if (method, lr, s) in rows]
            if seeds:
                mean = [
                    _fmt(statistics.mean(rows[(method, lr, s)][n] for s in seeds), n) for n in names
                ]
                label = "mean" if len(seeds) == len(args.seeds) else f"mean of seeds {seeds}"
                lines.append(f"| {label} | {method} | {lr} | " + " | ".join(mean) + " |")
    print("\n".join(lines) + "\n")
    for method in METHODS:
        chosen = pick(rows, method, args.lrs, args.seeds)
        print(f"- {method}: " + (f"BASE_LR {chosen}" if chosen else "not all runs finished"))


if __name__ == "__main__":
    main()
