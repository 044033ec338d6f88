"""The BCCD studies' tables, from the demo runs' summary.json files (never from Markdown).

    # FRCN, paper OHEM and recommended OHEM over seeds: one demo --output-dir per seed
    python -m studies.table seeds output/test_s0 output/test_s1 output/test_s2
    # a learning-rate grid on bccd_val and the rate the rule picks for each method
    python -m studies.table grid 'output/val2_lr{lr}_s{seed}' --lrs 0.02 0.01 0.005 --seeds 0 1
    # OHEM variants against the paper's OHEM of the same seeds, with the rule's verdict
    python -m studies.table variants --baseline 'output/demo_seed{seed}' \\
        suspect=output/var_suspect_s{seed} trim=output/var_trim_s{seed}

A run is a demo --output-dir (``<dir>/summary.json``, the list of its methods' summaries, and
``<dir>/<method>/summary.json``), or FRCN_DIR:OHEM_DIR when a seed's two methods ran
separately. Each page in studies/ gives the exact command of each of its tables.
"""

import argparse
import itertools
import json
import operator
import os
import statistics
import sys

from tabulate import tabulate

PLATELETS = "Platelets"


def _class_ap(name):
    return lambda s: s["per_class_AP50_allpoint"][name]


# column: (its value in a summary, digits)
COLUMN = {
    "mAP50 all-pt": (lambda s: s["voc_AP50_allpoint"], 1),
    "mAP50 11-pt": (lambda s: s["voc_AP50_11point"], 1),
    "RBC": (_class_ap("RBC"), 1),
    "WBC": (_class_ap("WBC"), 1),
    PLATELETS: (_class_ap(PLATELETS), 1),
    "COCO AP": (lambda s: s["coco_AP"], 1),
    "COCO AP50": (lambda s: s["coco_AP50"], 1),
    "COCO AP75": (lambda s: s["coco_AP75"], 1),
    "all-RoI loss": (lambda s: s["final_roi_loss"]["mean_roi_loss"], 3),
    "fg part": (lambda s: s["final_roi_loss"]["fg_part"], 3),
    "bg part": (lambda s: s["final_roi_loss"]["bg_part"], 3),
    "s/iter": (lambda s: s["s_per_iter"], 3),
    "dets/image": (lambda s: s["mean_detections_per_image"], 1),
    "cap's bar": (lambda s: s["median_lowest_kept_score"], 3),
}


def _columns(*names):
    """[(column, value of a summary, digits)]"""
    return [(n, *COLUMN[n]) for n in names]


# The runs' table: every column but the seeds table's last two.
COLUMNS = _columns(*[n for n in COLUMN if n not in ("dets/image", "cap's bar")])
# The seeds table: what separates the methods on dense images (studies/bccd_score_floor.md).
SEED_COLUMNS = _columns(
    "mAP50 all-pt", "COCO AP", "RBC", "WBC", PLATELETS, "dets/image", "cap's bar"
)
METHODS = ("frcn", "ohem")
# COLUMNS read from a flat {column: value} (differences of two runs are computed on these).
NUMBER_COLUMNS = [(n, operator.itemgetter(n), d) for n, _, d in COLUMNS]


def _cell(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def _value(get, summary):
    try:
        return get(summary)
    except (KeyError, TypeError):  # a column the run did not record (an older summary)
        return None


def format_runs(table, columns=SEED_COLUMNS, key="candidate"):
    """Markdown: one row per name and seed, then each name's mean and spread (max - min).

    `table`: {name: {seed: summary}}."""
    rows = []
    for name, runs in table.items():
        if not runs:
            continue
        for seed, s in sorted(runs.items()):
            rows.append([name, seed] + [_cell(_value(get, s), d) for _, get, d in columns])
        stats = []
        for _, get, d in columns:
            v = [_value(get, s) for s in runs.values()]
            if any(x is None for x in v):
                stats.append("-")
            else:
                stats.append(f"{_cell(statistics.mean(v), d)} ({_cell(max(v) - min(v), d)})")
        rows.append([f"**{name}**", "mean (spread)"] + stats)
    return markdown(rows, [key, "seed"] + [n for n, _, _ in columns])


def format_differences(table, reference="frcn"):
    """Markdown: per seed, each name's mAP50 and COCO AP minus the reference's."""
    rows = []
    for name, runs in table.items():
        if name == reference:
            continue
        for seed, m in sorted(runs.items()):
            if seed not in table[reference]:
                continue  # no reference run of that seed: nothing to compare with
            ref = table[reference][seed]
            d_map = m["voc_AP50_allpoint"] - ref["voc_AP50_allpoint"]
            d_coco = m["coco_AP"] - ref["coco_AP"]
            rows.append([name, seed, f"{d_map:+.1f}", f"{d_coco:+.1f}"])
    return markdown(rows, ["against " + reference, "seed", "mAP50 all-pt", "COCO AP"])


def _read_folder(folder):
    """{(method, recommended): summary} of one demo --output-dir, from each evaluation's own
    summary.json: the latest of that method in the folder (the folder's own summary.json
    lists only the last command's methods). Each summary gets the folder as "run_dir"."""
    from ohem_d2.demo.report import read_summaries

    return {
        (s["method"], bool(s.get("recommended"))): {**s, "run_dir": folder}
        for s in read_summaries(folder)
    }


def load_run(spec):
    """[summary] of one demo run: DIR, or FRCN_DIR:OHEM_DIR when a seed's two methods ran
    into two folders (FRCN's evaluations are read from the first, OHEM's from the second)."""
    folders = str(spec).split(":")
    if len(folders) == 1:
        found = _read_folder(folders[0])
    elif len(folders) == 2:
        frcn, ohem = map(_read_folder, folders)
        found = {k: v for k, v in frcn.items() if k[0] == "frcn"}
        found.update({k: v for k, v in ohem.items() if k[0] == "ohem"})
    else:
        raise ValueError(f"{spec}: give DIR or FRCN_DIR:OHEM_DIR")
    if not found:
        raise FileNotFoundError(f"{spec}: no summary.json in its method folders")
    return list(found.values())


def label(summary):
    """frcn, paper or recommended: the seeds table's name of one evaluation."""
    if summary["method"] == "frcn":
        return "frcn"
    return "recommended" if summary.get("recommended") else "paper"


def load_seeds(specs):
    """{"frcn" | "paper" | "recommended": {seed: summary}} of demo runs, one per seed."""
    table = {"frcn": {}, "paper": {}, "recommended": {}}
    for spec in specs:
        for summary in load_run(spec):
            name = label(summary)
            if summary["seed"] in table[name]:
                raise ValueError(f"{spec}: a second {name} run of seed {summary['seed']}")
            table[name][summary["seed"]] = summary
    return {k: v for k, v in table.items() if v}


def load_grid(pattern, lrs, seeds, split="bccd_val"):
    """{(method, lr, seed): summary} of a learning-rate grid's runs that finished."""
    rows = {}
    for lr, seed in itertools.product(lrs, seeds):
        folder = pattern.format(lr=lr, seed=seed)
        for s in _read_folder(folder).values():  # none while the run has not finished
            if s.get("recommended"):
                continue
            if s["seed"] != seed or s["test_datasets"] != [split]:
                raise ValueError(f"{pattern} lr={lr} seed={seed}: a run of another seed or split")
            if s["opts"][-2:] != ["SOLVER.BASE_LR", lr]:
                raise ValueError(f"{pattern} lr={lr} seed={seed}: trained with {s['opts']}")
            rows[(s["method"], lr, seed)] = s
    return rows


def pick_rate(rows, method, lrs, seeds):
    """The grid's rule: the rate of the highest mean all-point mAP50 over every seed, COCO AP
    breaking a tie; None while one of the method's runs is missing."""
    if any((method, lr, s) not in rows for lr in lrs for s in seeds):
        return None

    def key(lr):
        return tuple(
            statistics.mean(rows[(method, lr, s)][k] for s in seeds)
            for k in ("voc_AP50_allpoint", "coco_AP")
        )

    return max(lrs, key=key)


def variant_verdict(table, name, reference="paper"):
    """The unlabelled-objects rule: better than paper OHEM on the mean AND on at least 2 of 3
    seeds, in both all-point mAP50 and COCO AP. Returns (recommended, [(column, mean, wins)])
    or (None, []) while a seed is missing."""
    seeds = sorted(table[reference])
    if sorted(table[name]) != seeds:
        return None, []
    results = []
    for column in ("voc_AP50_allpoint", "coco_AP"):
        diffs = [table[name][s][column] - table[reference][s][column] for s in seeds]
        results.append((column, statistics.mean(diffs), sum(d > 0 for d in diffs)))
    passed = all(mean > 0 and 2 * wins > len(seeds) for _, mean, wins in results)
    return passed, results


# What a variant's miner mined at the end of training (metrics.json, Detectron2's smoothing).
MINED = [
    ("hard bg share", "ohem/hard_set/background"),
    ("hard bg IoU 0", "ohem/hard_bg_iou/0"),
    ("(0,0.1)", "ohem/hard_bg_iou/(0,0.1)"),
    ("[0.1,0.3)", "ohem/hard_bg_iou/[0.1,0.3)"),
    ("[0.3,0.5)", "ohem/hard_bg_iou/[0.3,0.5)"),
    ("suspect share of hard bg", "ohem/hard_bg_suspect"),
    ("suspects per image", "ohem/num_suspect_candidates"),
]


def last_mined(ohem_dir):
    """{label: value} of the last metrics.json record that has the miner's statistics."""
    with open(os.path.join(ohem_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f if MINED[0][1] in line]
    return {name: records[-1][key] for name, key in MINED}


def _seeds(args):
    table = load_seeds(args.runs)
    print(format_runs(table) + "\n\n" + format_differences(table))


def markdown(rows, headers):
    """A Markdown (GitHub) table of `rows` of cells, each printed as it is."""
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def _row(cells, values):
    return [*cells, *values]


def _cells(summary_or_values, columns=COLUMNS):
    return [_cell(_value(get, summary_or_values), d) for _, get, d in columns]


def _numbers(summary):
    """{column: value} of the COLUMNS the run recorded."""
    values = {n: _value(get, summary) for n, get, _ in COLUMNS}
    return {n: v for n, v in values.items() if v is not None}


def _difference(summary, reference):
    """{column: summary's value - reference's} of the columns both recorded."""
    a, b = _numbers(summary), _numbers(reference)
    return {n: a[n] - b[n] for n in a.keys() & b.keys()}


def _mean(summaries, columns=COLUMNS):
    cells = []
    for _, get, d in columns:
        values = [_value(get, s) for s in summaries]
        cells.append("-" if None in values else _cell(statistics.mean(values), d))
    return cells


def _grid(args):
    rows = load_grid(args.pattern, args.lrs, args.seeds)
    names = [n for n, _, _ in COLUMNS]
    body = []
    for seed, method, lr in itertools.product(args.seeds, METHODS, args.lrs):
        if (method, lr, seed) in rows:
            body.append(_row((seed, method, lr), _cells(rows[(method, lr, seed)])))
    for method, lr in itertools.product(METHODS, args.lrs):
        seeds = [s for s in args.seeds if (method, lr, s) in rows]
        if seeds:
            label = "mean" if len(seeds) == len(args.seeds) else f"mean of seeds {seeds}"
            body.append(_row((label, method, lr), _mean([rows[(method, lr, s)] for s in seeds])))
    print(markdown(body, ["seed", "method", "LR"] + names) + "\n")
    for method in METHODS:
        chosen = pick_rate(rows, method, args.lrs, args.seeds)
        print(f"- {method}: " + (f"BASE_LR {chosen}" if chosen else "not all runs finished"))


def _variants(args):
    """FRCN ("frcn"), paper OHEM ("ohem") and each variant, then each variant minus paper OHEM,
    the rule's verdict and what each variant mined."""
    table = {"frcn": {}, "ohem": {}}
    for seed in args.seeds:
        for s in load_run(args.baseline.format(seed=seed)):
            if not s.get("recommended"):
                table[s["method"]][seed] = s
    mined = {}
    for spec in args.variants:
        name, pattern = spec.split("=", 1)
        table[name], mined[name] = {}, {}
        for seed in args.seeds:
            folder = pattern.format(seed=seed)
            if not os.path.isfile(os.path.join(folder, "ohem", "summary.json")):
                continue  # not run (yet): the verdict waits for every seed
            with open(os.path.join(folder, "ohem", "summary.json")) as f:
                table[name][seed] = json.load(f)
            mined[name][seed] = last_mined(os.path.join(folder, "ohem"))
    names = [n for n, _, _ in COLUMNS]
    body = []
    for seed in args.seeds:
        body += [_row((seed, m), _cells(runs[seed])) for m, runs in table.items() if seed in runs]
    for method, runs in table.items():
        if not runs:
            continue  # not run yet
        seeds = sorted(runs)
        label = "mean" if len(seeds) == len(args.seeds) else f"mean of seeds {seeds}"
        body.append(_row((label, method), _mean(runs.values())))
    for name in mined:
        seeds = sorted(table[name])
        if not seeds:
            continue
        for seed in (*seeds, "mean"):
            chosen = seeds if seed == "mean" else (seed,)
            diffs = _mean(
                [_difference(table[name][s], table["ohem"][s]) for s in chosen], NUMBER_COLUMNS
            )
            body.append(_row((seed, f"{name} - ohem"), diffs))
    print(markdown(body, ["seed", "method"] + names))
    print("\nThe rule (better than paper OHEM on the mean and on >= 2 of 3 seeds, in both")
    print("all-point mAP50 and COCO AP):\n")
    for name in mined:
        passed, results = variant_verdict(table, name, reference="ohem")
        if passed is None:
            print(f"- {name}: only seeds {sorted(table[name])} ran; no verdict")
            continue
        for column, mean, wins in results:
            column = {"voc_AP50_allpoint": "mAP50 all-pt", "coco_AP": "COCO AP"}[column]
            print(f"- {name}, {column}: mean {mean:+.1f}, better on {wins}/{len(args.seeds)}")
        print(f"- {name}: {'RECOMMENDED' if passed else 'not recommended'}")
    print("\nWhat each variant mined at the end of training (mean over its seeds):\n")
    rows = []
    for name, by_seed in mined.items():
        if by_seed:
            cells = [f"{statistics.mean(m[n] for m in by_seed.values()):.3f}" for n, _ in MINED]
            opts = " ".join(table[name][min(by_seed)]["ohem_opts"])
            rows.append([name, f"`{opts}`"] + cells)
    print(markdown(rows, ["variant", "options"] + [n for n, _ in MINED]))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m studies.table", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("seeds", help="FRCN, paper and recommended OHEM of demo runs")
    s.add_argument("runs", nargs="+", metavar="DEMO_OUTPUT_DIR")
    s.set_defaults(run=_seeds)
    g = sub.add_parser("grid", help="a learning-rate grid on bccd_val and the rule's rates")
    g.add_argument("pattern", help="the runs' --output-dir, with {lr} and {seed}")
    g.add_argument("--lrs", nargs="+", default=["0.02", "0.01", "0.005"])
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    g.set_defaults(run=_grid)
    v = sub.add_parser("variants", help="OHEM variants against paper OHEM, with the verdict")
    v.add_argument("--baseline", required=True, help="FRCN's and paper OHEM's runs, {seed}")
    v.add_argument("variants", nargs="+", metavar="NAME=PATTERN")
    v.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    v.set_defaults(run=_variants)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
