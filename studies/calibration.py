"""The calibration study on BCCD (studies/bccd_calibration.md): keep each run's detections,
measure every candidate, and apply the page's rule.

    # keep a finished run: its summary and detections, into studies/bccd_calibration_runs/
    python -m studies.calibration collect NAME SEED output/cal_val_s0/frcn
    # paper+corr: evaluate a paper model with the current recommended correction, and keep it
    python -m studies.calibration collect-corr SEED output/cal_val_s0/ohem
    # the study's tables and decision, from the kept runs
    python -m studies.calibration table [--save studies/bccd_calibration_val.json]

A kept run (``NAME_sSEED.json.gz``) holds the run's summary and every detection its
evaluation kept (COCO format), so that the page's numbers, and the ``+cal`` rows computed
from them, can be traced to a file of the repository.
"""

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile

from tabulate import tabulate

from studies.table import PLATELETS

RUNS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bccd_calibration_runs")
# The trained models and what is applied to them at inference (the page's candidates).
MODELS = ("paper", "paper+corr", "rem", "is")
CANDIDATES = MODELS + tuple(f"{m}+cal" for m in MODELS)
REFERENCE = "frcn"
# The rule's numbers (the page's decision rule).
FLOOR_BAR = 0.10
F1_MARGIN = 0.0
ECE_MARGIN = 0.02
PLATELET_SHARE = 0.9
TIE = 1.0
PAPER_MARGIN = 1.0
# Detectron2's default MODEL.ROI_HEADS.SCORE_THRESH_TEST: the evaluation keeps no less.
SCORE_FLOOR = 0.05
CORRECTION_OPTS = {
    "PRIOR_CORRECTION": True,
    "PRIOR_CORRECTION_TARGET": "STOCK_SAMPLER",
    "PRIOR_CORRECTION_PER_CLASS": False,
}


def run_path(name, seed, runs_dir=RUNS_DIR):
    return os.path.join(runs_dir, f"{name}_s{seed}.json.gz")


def save_run(name, seed, summary, detections, runs_dir=RUNS_DIR):
    os.makedirs(runs_dir, exist_ok=True)
    with gzip.open(run_path(name, seed, runs_dir), "wt") as f:
        json.dump({"summary": summary, "detections": detections}, f)


def load_run(name, seed, runs_dir=RUNS_DIR):
    """(summary, detections) of a kept run, or None if it is not there."""
    path = run_path(name, seed, runs_dir)
    if not os.path.exists(path):
        return None
    with gzip.open(path, "rt") as f:
        run = json.load(f)
    return run["summary"], run["detections"]


def _results_file(method_dir, summary):
    test = summary["test_datasets"][0]
    return os.path.join(method_dir, "inference", test, "coco_instances_results.json")


def collect(name, seed, method_dir, runs_dir=RUNS_DIR):
    """Keep the finished demo run in `method_dir` (<output-dir>/<method>) as NAME, SEED."""
    with open(os.path.join(method_dir, "summary.json")) as f:
        summary = json.load(f)
    if summary["seed"] != seed:
        raise ValueError(f"{method_dir} is seed {summary['seed']}, not {seed}")
    with open(_results_file(method_dir, summary)) as f:
        detections = json.load(f)
    save_run(name, seed, summary, detections, runs_dir)


def collect_corr(seed, method_dir, runs_dir=RUNS_DIR):
    """Evaluate the paper model of `method_dir` (trained with the class counts) with the
    current recommended correction (CORRECTION_OPTS) and keep it as paper+corr."""
    from detectron2.evaluation.testing import flatten_results_dict

    from ohem_d2.demo import saved_run_cfg
    from ohem_d2.demo.run import _test_metrics
    from ohem_d2.engine import Trainer, register_project_datasets
    from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer

    register_project_datasets()
    with open(os.path.join(method_dir, "summary.json")) as f:
        summary = json.load(f)
    cfg = saved_run_cfg(method_dir, summary)
    for key, value in CORRECTION_OPTS.items():
        cfg.MODEL.ROI_HEADS.OHEM[key] = value
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="calibration_")
    cfg.freeze()
    model = Trainer.build_model(cfg)
    SafeDetectionCheckpointer(model).load(os.path.join(method_dir, "model_final.pth"))
    results = flatten_results_dict(Trainer.test(cfg, model.eval()))
    corrected = {**summary, **_test_metrics(cfg, results), "inference_opts": CORRECTION_OPTS}
    with open(_results_file(cfg.OUTPUT_DIR, summary)) as f:
        detections = json.load(f)
    save_run("paper+corr", seed, corrected, detections, runs_dir)


def _dataset(name):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ohem_d2.engine import register_project_datasets

    register_project_datasets()
    return DatasetCatalog.get(name), MetadataCatalog.get(name).thing_classes


def cross_fitted(detections, dataset_dicts, num_classes):
    """The detections with per-class Platt-scaled scores, each half of the images (even and
    odd positions in `dataset_dicts`) scored by the map fitted on the other half; those
    below SCORE_FLOOR after it are dropped."""
    from ohem_d2.engine.calibration import apply_platt, fit_platt, matched_flags

    halves = [{r["image_id"] for r in dataset_dicts[parity::2]} for parity in (0, 1)]
    matched, _ = matched_flags(detections, dataset_dicts)
    out = []
    for fit_half, apply_half in ((halves[1], halves[0]), (halves[0], halves[1])):
        fit = [i for i, d in enumerate(detections) if d["image_id"] in fit_half]
        params = fit_platt(
            [detections[i]["score"] for i in fit],
            matched[fit],
            [detections[i]["category_id"] for i in fit],
            num_classes,
        )
        apply = [d for d in detections if d["image_id"] in apply_half]
        scores = apply_platt([d["score"] for d in apply], [d["category_id"] for d in apply], params)
        out += [{**d, "score": float(s)} for d, s in zip(apply, scores) if s >= SCORE_FLOOR]
    return out


def evaluate_detections(dataset_name, detections):
    """The demo's accuracy metrics of a list of COCO-format detections, by the project's
    VOC and COCO evaluators (as the run's own evaluation computed them)."""
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import BoxMode

    from ohem_d2.engine.evaluation import VOCDetectionEvaluator

    voc = VOCDetectionEvaluator(dataset_name)
    voc.reset()
    for d in detections:
        x1, y1, x2, y2 = BoxMode.convert(d["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
        # Detectron2's VOC evaluator's own line format (1-based xmin, ymin).
        voc._predictions[d["category_id"]].append(
            f"{d['image_id']} {d['score']:.3f} {x1 + 1:.1f} {y1 + 1:.1f} {x2:.1f} {y2:.1f}"
        )
    voc_results = voc.evaluate()["bbox"]
    # A folder for the COCO json of the ground truth that the evaluator converts.
    coco_dir = tempfile.mkdtemp(prefix="calibration_coco_")
    coco = COCOEvaluator(dataset_name, tasks=("bbox",), distributed=False, output_dir=coco_dir)
    per_image = {}
    for d in detections:
        per_image.setdefault(d["image_id"], []).append(d)
    coco._predictions = [{"image_id": k, "instances": v} for k, v in per_image.items()]
    coco._results = {}
    coco._eval_predictions(coco._predictions)
    return {
        "voc_AP50_allpoint": voc_results["mAP50_allpoint"],
        "per_class_AP50_allpoint": {
            k.split("-", 1)[1]: v for k, v in voc_results.items() if k.startswith("AP50_allpoint-")
        },
        "coco_AP": coco._results["bbox"]["AP"],
    }


def measure(summary, detections, *, calibrate=False):
    """The page's measures of one evaluation: from its summary, or (`calibrate`) computed
    again from its cross-fitted Platt-scaled detections."""
    from ohem_d2.engine.calibration import score_quality
    from ohem_d2.engine.evaluation import cap_statistics

    name = summary["test_datasets"][0]
    dicts, classes = _dataset(name)
    if calibrate:
        detections = cross_fitted(detections, dicts, len(classes))
        accuracy = evaluate_detections(name, detections)
    else:
        accuracy = {
            k: summary[k] for k in ("voc_AP50_allpoint", "per_class_AP50_allpoint", "coco_AP")
        }
    return {
        **accuracy,
        **cap_statistics(detections, len(dicts)),
        **score_quality(detections, dicts, dataset_name=name),
    }


def measure_all(seeds, runs_dir=RUNS_DIR):
    """{name: {seed: measures}} of FRCN and every candidate whose kept runs are there."""
    table = {}
    for name in (REFERENCE, *CANDIDATES):
        base = name.removesuffix("+cal")
        for seed in seeds:
            run = load_run(base, seed, runs_dir)
            if run is not None:
                table.setdefault(name, {})[seed] = measure(*run, calibrate=name.endswith("+cal"))
    return table


COLUMNS = [
    ("mAP50 all-pt", lambda m: m["voc_AP50_allpoint"], 1),
    ("COCO AP", lambda m: m["coco_AP"], 1),
    ("Platelets", lambda m: m["per_class_AP50_allpoint"][PLATELETS], 1),
    ("cap's bar", lambda m: m["median_lowest_kept_score"], 3),
    ("P@0.5", lambda m: m["precision@0.5"], 2),
    ("R@0.5", lambda m: m["recall@0.5"], 2),
    ("F1@0.5", lambda m: m["f1@0.5"], 2),
    ("dets/image@0.5", lambda m: m["detections_per_image@0.5"], 1),
    ("D-ECE", lambda m: m["d_ece"], 3),
]


def format_table(table):
    """Every run, then each candidate's mean and spread (max - min) over its seeds."""
    rows = []
    for name, runs in table.items():
        for seed, m in sorted(runs.items()):
            rows.append([name, seed] + [f"{get(m):.{d}f}" for _, get, d in COLUMNS])
        if len(runs) > 1:
            cells = []
            for _, get, d in COLUMNS:
                values = [get(m) for m in runs.values()]
                spread = max(values) - min(values)
                cells.append(f"{statistics.mean(values):.{d}f} ({spread:.{d}f})")
            rows.append([f"**{name}**", "mean (spread)"] + cells)
    headers = ["candidate", "seed"] + [c for c, _, _ in COLUMNS]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def _mean(runs, key):
    return statistics.mean(m[key] for m in runs.values())


def decide(table, seeds):
    """The page's rule: (lines explaining it, the chosen candidate or None)."""
    frcn = table.get(REFERENCE, {})
    lines, passing = [], []
    for name in CANDIDATES:
        runs = table.get(name, {})
        if sorted(runs) != sorted(seeds) or sorted(frcn) != sorted(seeds):
            lines.append(f"{name}: not all seeds {list(seeds)} run; left out")
            continue
        failed = []
        for seed, m in runs.items():
            ref = frcn[seed]
            if m["median_lowest_kept_score"] > FLOOR_BAR:
                failed.append(f"seed {seed}: cap's bar {m['median_lowest_kept_score']:.3f}")
            if m["f1@0.5"] < ref["f1@0.5"] - F1_MARGIN:
                failed.append(f"seed {seed}: F1 {m['f1@0.5']:.2f} < FRCN {ref['f1@0.5']:.2f}")
            if m["d_ece"] > ref["d_ece"] + ECE_MARGIN:
                failed.append(f"seed {seed}: D-ECE {m['d_ece']:.3f} > FRCN {ref['d_ece']:.3f}+0.02")
            platelets = m["per_class_AP50_allpoint"][PLATELETS]
            ref_platelets = ref["per_class_AP50_allpoint"][PLATELETS]
            if platelets < PLATELET_SHARE * ref_platelets:
                failed.append(f"seed {seed}: platelets {platelets:.1f} < 0.9 x {ref_platelets:.1f}")
        lines.append(f"{name}: " + ("passes 1-3" if not failed else "; ".join(failed)))
        if not failed:
            passing.append(name)
    if not passing:
        lines.append("no candidate passes rules 1-3")
        return lines, None
    best = max(_mean(table[n], "voc_AP50_allpoint") for n in passing)
    tied = [n for n in passing if _mean(table[n], "voc_AP50_allpoint") >= best - TIE]
    chosen = max(tied, key=lambda n: _mean(table[n], "coco_AP"))
    lines.append(f"rule 4: {chosen} (within {TIE} of the best mean mAP50: {tied})")
    paper = table.get("paper", {})
    for key in ("voc_AP50_allpoint", "coco_AP"):
        gap = _mean(table[chosen], key) - _mean(paper, key)
        lines.append(f"rule 5: {key} {gap:+.2f} against paper")
        if gap < -PAPER_MARGIN:
            lines.append("rule 5 fails: no candidate is chosen")
            return lines, None
    return lines, chosen


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m studies.calibration", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("collect", help="keep a finished run's summary and detections")
    p.add_argument("name", choices=(REFERENCE, *MODELS))
    p.add_argument("seed", type=int)
    p.add_argument("method_dir")
    p = sub.add_parser("collect-corr", help="evaluate a paper model with the correction")
    p.add_argument("seed", type=int)
    p.add_argument("method_dir")
    p = sub.add_parser("table", help="the tables and the decision")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--save", help="write the measures to this JSON file")
    args = parser.parse_args(argv)
    if args.command == "collect":
        collect(args.name, args.seed, args.method_dir)
    elif args.command == "collect-corr":
        collect_corr(args.seed, args.method_dir)
    else:
        table = measure_all(args.seeds)
        print(format_table(table))
        lines, chosen = decide(table, args.seeds)
        print("\n" + "\n".join(lines) + f"\nchosen: {chosen}")
        if args.save:
            with open(args.save, "w") as f:
                json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
