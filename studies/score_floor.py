"""OHEM's score floor on BCCD: re-evaluate the demo's saved models and apply the study's rule.

    # per run folder (a demo --output-dir): re-evaluate every method's model_final.pth
    python -m studies.score_floor measure output/floor_val_s0 [...] [--diagnose]
    # the study's table and decision, from the runs' summary.json and score_floor.json
    python -m studies.score_floor table output/floor_val_s{seed} \\
        --candidate fg25=output/floor_val_fg25_s{seed} --seeds 0 1 2 3 4

``measure`` evaluates each model on its run's own test split (bccd_val for a --holdout run)
with ``MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION`` off ("plain") and, for models that carry the
class counts, on ("prior"). It writes <run>/<method>/score_floor.json: per variant, the
demo's metrics (all-point mAP50, COCO AP, AP50 per class) and the cap's statistics.
``--diagnose`` adds a pass without the 100-detection cap: per class, the scores of all RoIs
and of the kept detections; per image, how many detections score above its lowest true
platelet; and, from the counts, the class make-up of all RoIs and of the hard sets. Nothing
is trained, and the run's own files other than score_floor.json are left as they are.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

from studies.table import PLATELETS, format_runs, markdown

# The first protocol's candidates, by how far they depart from the paper (its tie order).
ORDER = ("paper", "paper+prior", "fg25", "fg25+prior")
# Inference settings of a trained OHEM model: the study's variants, by the label suffix of
# their rows ("" for the plain model). The correction's target and per-class keys.
VARIANTS = {
    "plain": ("", None),
    "prior": ("+prior", ("ALL_ROIS", True)),
    "prior_fgbg": ("+prior-fgbg", ("ALL_ROIS", False)),
    "sampler": ("+sampler", ("STOCK_SAMPLER", True)),
    "sampler_fgbg": ("+sampler-fgbg", ("STOCK_SAMPLER", False)),
}
# The second protocol's candidates (the paper's trained models, corrected at test time).
FLOOR_CANDIDATES = ("paper+prior", "paper+prior-fgbg", "paper+sampler", "paper+sampler-fgbg")
# A seed's floor is gone when the cap's bar is at most this (FRCN's highest on bccd_val).
FLOOR_BAR = 0.15


def _cfg(method_dir, summary, variant, cap):
    from ohem_d2.demo import saved_run_cfg

    cfg = saved_run_cfg(method_dir, summary)
    correction = VARIANTS[variant][1]
    cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION = correction is not None
    if correction is not None:
        cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_TARGET = correction[0]
        cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_PER_CLASS = correction[1]
    cfg.TEST.DETECTIONS_PER_IMAGE = cap
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="score_floor_")
    cfg.freeze()
    return cfg


def _model(cfg, method_dir):
    from ohem_d2.engine import Trainer
    from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer

    model = Trainer.build_model(cfg)
    SafeDetectionCheckpointer(model).load(os.path.join(method_dir, "model_final.pth"))
    return model.eval()


def evaluate(method_dir, summary, variant):
    """The demo's metrics and the cap's statistics of one model, at the cap of 100."""
    from detectron2.data import DatasetCatalog

    from ohem_d2.engine import Trainer
    from ohem_d2.engine.evaluation import detection_cap_statistics

    cfg = _cfg(method_dir, summary, variant, 100)
    results = Trainer.test(cfg, _model(cfg, method_dir))
    name = cfg.DATASETS.TEST[0]
    results = results.get(name, results)
    found = os.path.join(cfg.OUTPUT_DIR, "inference", name, "coco_instances_results.json")
    voc = results["voc_bbox"]
    return {
        "voc_AP50_allpoint": voc["mAP50_allpoint"],
        "coco_AP": results["bbox"]["AP"],
        "per_class_AP50_allpoint": {
            k.split("-", 1)[1]: v for k, v in voc.items() if k.startswith("AP50_allpoint-")
        },
        **detection_cap_statistics(found, len(DatasetCatalog.get(name))),
    }


def from_summary(method_dir, summary):
    """The same metrics as :func:`evaluate`, from the run's own evaluation (no model run)."""
    from detectron2.data import DatasetCatalog

    from ohem_d2.engine.evaluation import detection_cap_statistics

    name = summary["test_datasets"][0]
    found = os.path.join(method_dir, "inference", name, "coco_instances_results.json")
    return {
        "voc_AP50_allpoint": summary["voc_AP50_allpoint"],
        "coco_AP": summary["coco_AP"],
        "per_class_AP50_allpoint": summary["per_class_AP50_allpoint"],
        **detection_cap_statistics(found, len(DatasetCatalog.get(name))),
    }


def _own_variant(summary):
    """The variant the run's own evaluation used (from its OHEM options)."""
    opts = summary.get("ohem_opts") or []
    pairs = dict(zip(opts[::2], opts[1::2]))
    if pairs.get("MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION", "False") != "True":
        return "plain"
    own = (
        pairs.get("MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_TARGET", "ALL_ROIS"),
        pairs.get("MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_PER_CLASS", "True") == "True",
    )
    return next(v for v, (_, c) in VARIANTS.items() if c == own)


def _percentiles(values):
    if len(values) == 0:
        return None
    p10, p50, p90 = np.percentile(values, [10, 50, 90]).tolist()
    return {"min": float(np.min(values)), "p10": p10, "p50": p50, "p90": p90, "n": len(values)}


def above_lowest_true(detections, gt_boxes, cls, iou_thresh=0.5):
    """How many of an image's detections score above its lowest-scoring true `cls` object.

    Args:
        detections: (scores (D,), classes (D,), boxes (D, 4) XYXY), all the image's detections.
        gt_boxes: (G, 4) XYXY, the image's ground-truth boxes of class `cls`.

    A ground-truth box is found by its best-scoring detection of class `cls` with IoU >=
    `iou_thresh`; returns None when none is found.
    """
    from torchvision.ops import box_iou

    scores, classes, boxes = detections
    own = classes == cls
    if len(gt_boxes) == 0 or not bool(own.any()):
        return None
    iou = box_iou(torch.as_tensor(gt_boxes, dtype=torch.float32), boxes[own].float())
    best = torch.where(iou >= iou_thresh, scores[own][None, :], -1.0).max(dim=1).values
    found = best[best >= 0]
    if found.numel() == 0:
        return None
    return int((scores > found.min()).sum())


def diagnose(method_dir, summary, variant):
    """Score distributions and the platelets' rank, without the cap (see the module doc)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    from ohem_d2.engine.loaders import dataset_dicts_with_proposals, proposal_mapper

    cfg = _cfg(method_dir, summary, variant, -1)
    model = _model(cfg, method_dir)
    name = cfg.DATASETS.TEST[0]
    classes = MetadataCatalog.get(name).thing_classes
    platelet = classes.index(PLATELETS)
    roi_probs = []
    hook = model.roi_heads.box_predictor.register_forward_hook(
        lambda m, i, out: roi_probs.append(out[0].softmax(dim=1))
    )
    dicts = dataset_dicts_with_proposals(
        cfg.DATASETS.TEST,
        cfg.DATASETS.PROPOSAL_FILES_TEST,
        filter_empty=False,
        trusted=cfg.DATASETS.PROPOSAL_FILES_TRUSTED,
    )
    assert len(dicts) == len(DatasetCatalog.get(name))
    mapper = proposal_mapper(cfg, False)
    kept = {k: [] for k in range(len(classes))}
    num_kept, above = [], []
    with torch.no_grad():
        for d in dicts:
            inst = model([mapper(d)])[0]["instances"].to("cpu")
            scores, pred = inst.scores, inst.pred_classes
            top = slice(0, 100)  # the cap's cut: detections come sorted by score
            num_kept.append(int(scores[top].numel()))
            for k in kept:
                kept[k] += scores[top][pred[top] == k].tolist()
            gt = [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in d["annotations"]
                if a["category_id"] == platelet
            ]
            n = above_lowest_true((scores, pred, inst.pred_boxes.tensor), gt, platelet)
            if n is not None:
                above.append(n)
    hook.remove()
    probs = torch.cat(roi_probs)
    out = {
        "all_rois": {c: _percentiles(probs[:, k].numpy()) for k, c in enumerate(classes)},
        "all_rois_share_above_0.05": {
            c: float((probs[:, k] >= 0.05).float().mean()) for k, c in enumerate(classes)
        },
        "kept": {c: _percentiles(np.array(kept[k])) for k, c in enumerate(classes)},
        "images_at_cap": sum(n == 100 for n in num_kept) / len(num_kept),
        "above_lowest_true_platelet": {
            "median": statistics.median(above) if above else None,
            "images": len(above),
            "share_at_or_over_cap": sum(a >= 100 for a in above) / max(len(above), 1),
        },
    }
    head = model.roi_heads
    if hasattr(head, "ohem_class_counts_all"):
        names = list(classes) + ["background"]
        for key in ("all", "hard"):
            counts = getattr(head, f"ohem_class_counts_{key}").double()
            out[f"make_up_{key}"] = dict(zip(names, (counts / counts.sum()).tolist()))
    return out


def measure(run_dirs, with_diagnosis, methods=("frcn", "ohem"), variants=tuple(VARIANTS)):
    from ohem_d2.engine import register_project_datasets

    register_project_datasets()
    for run_dir in run_dirs:
        for method in methods:
            method_dir = os.path.join(run_dir, method)
            path = os.path.join(method_dir, "summary.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                summary = json.load(f)
            state = torch.load(
                os.path.join(method_dir, "model_final.pth"), map_location="cpu", weights_only=True
            )["model"]
            has_counts = "roi_heads.ohem_class_counts_all" in state
            out = os.path.join(method_dir, "score_floor.json")
            result = {}
            if os.path.isfile(out):  # variants measured before are kept
                with open(out) as f:
                    result = json.load(f)
            for variant in variants:
                if variant != "plain" and not has_counts:
                    continue
                # The run's own evaluation already is this variant's: no second pass.
                if variant == _own_variant(summary):
                    result[variant] = from_summary(method_dir, summary)
                else:
                    result[variant] = evaluate(method_dir, summary, variant)
                if with_diagnosis:
                    result[variant]["diagnosis"] = diagnose(method_dir, summary, variant)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
            print(method_dir, json.dumps({k: v["voc_AP50_allpoint"] for k, v in result.items()}))


def load_candidates(frcn_pattern, candidates, seeds):
    """{name: {seed: metrics}} of FRCN and the study's candidates, from score_floor.json;
    a run not measured yet is left out (its seed missing)."""

    def read(pattern, seed, method):
        path = os.path.join(pattern.format(seed=seed), method, "score_floor.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    patterns = {"frcn": (frcn_pattern, "frcn"), "paper": (frcn_pattern, "ohem")}
    patterns.update({name: (pattern, "ohem") for name, pattern in candidates.items()})
    table = {}
    for name, (pattern, method) in patterns.items():
        variants = ["plain"] if method == "frcn" else list(VARIANTS)
        for variant in variants:
            label = name + VARIANTS[variant][0]
            rows = {}
            for seed in seeds:
                runs = read(pattern, seed, method)
                if runs is not None and variant in runs:
                    rows[seed] = {k: v for k, v in runs[variant].items() if k != "diagnosis"}
            if label in ("frcn", *ORDER, *FLOOR_CANDIDATES):  # the protocols' rows only
                table[label] = rows
    return table


def decide(table, order=ORDER):
    """The protocol's rule (studies/bccd_score_floor.md). Returns (winner, reasons).

    `table`: {candidate: {seed: metrics}} with "frcn" and the candidates of `order`.
    """
    frcn = table["frcn"]
    seeds = sorted(frcn)

    def platelets(m):
        return m["per_class_AP50_allpoint"][PLATELETS]

    def mean(name):
        return statistics.mean(table[name][s]["voc_AP50_allpoint"] for s in seeds)

    eligible_seeds = {
        name: sum(platelets(table[name][s]) >= 0.8 * platelets(frcn[s]) for s in seeds)
        for name in order
    }
    eligible = [n for n in order if eligible_seeds[n] == len(seeds)]
    reasons = [f"eligible seeds: {eligible_seeds}"]
    if not eligible:
        best = max(order, key=lambda n: (eligible_seeds[n], mean(n)))
        reasons.append(f"no candidate is eligible; the most eligible seeds, then mean: {best}")
        return best, reasons
    top = max(mean(n) for n in eligible)
    # Within 1.0 of the best is a tie, resolved towards the paper (the order).
    winner = next(n for n in eligible if mean(n) >= top - 1.0)
    reasons.append(f"means: { {n: round(mean(n), 2) for n in eligible} }; rule 2: {winner}")
    if winner != "paper" and "paper" in eligible:
        diffs = [
            table[winner][s]["voc_AP50_allpoint"] - table["paper"][s]["voc_AP50_allpoint"]
            for s in seeds
        ]
        positive = sum(d > 0 for d in diffs)
        if statistics.mean(diffs) < 1.0 or positive < len(seeds) - 1:
            reasons.append(f"gain over paper {diffs} is inside the seed noise: paper stays")
            winner = "paper"
    return winner, reasons


def decide_floor(table, candidates=FLOOR_CANDIDATES):
    """The second protocol's rule (studies/bccd_score_floor.md). Returns (choice or None,
    reasons): None keeps paper OHEM as the only OHEM of the demo."""
    frcn, paper = table["frcn"], table["paper"]
    seeds = sorted(frcn)

    def platelets(m):
        return m["per_class_AP50_allpoint"][PLATELETS]

    def mean(name, key):
        return statistics.mean(table[name][s][key] for s in seeds)

    eligible, reasons = [], []
    for name in candidates:
        runs = table[name]
        no_floor = sum(runs[s]["median_lowest_kept_score"] <= FLOOR_BAR for s in seeds)
        kept = sum(platelets(runs[s]) >= 0.8 * platelets(frcn[s]) for s in seeds)
        reasons.append(f"{name}: floor gone on {no_floor}, platelets kept on {kept} seeds")
        if no_floor == kept == len(seeds):
            eligible.append(name)
    if not eligible:
        reasons.append("no candidate is eligible: paper OHEM stays the only OHEM")
        return None, reasons
    top = max(mean(n, "voc_AP50_allpoint") for n in eligible)
    tied = [n for n in eligible if mean(n, "voc_AP50_allpoint") >= top - 1.0]
    best = max(tied, key=lambda n: mean(n, "coco_AP"))
    gaps = {
        key: mean(best, key) - statistics.mean(paper[s][key] for s in seeds)
        for key in ("voc_AP50_allpoint", "coco_AP")
    }
    reasons.append(f"eligible: {eligible}; best: {best}; against paper: {gaps}")
    if min(gaps.values()) < -1.0:
        reasons.append("it loses more than 1.0 against paper OHEM: not recommended")
        return None, reasons
    return best, reasons


def format_diagnosis(rows):
    """Markdown: the floor's numbers per (label, seed, diagnosis) row (see :func:`diagnose`)."""
    headers = [
        "run",
        "seed",
        "RBC score, all RoIs: p50 / p90",
        "RoIs with RBC >= 0.05",
        "kept RBC: min / p10",
        "kept per image",
        "images at the cap",
        "cap's bar",
        "above the lowest true platelet (median; share >= 100)",
        "hard-set make-up (RBC / WBC / Plt / bg)",
        "all-RoI make-up",
    ]
    cells = []

    def make_up(d, key):
        m = d.get(f"make_up_{key}")
        if m is None:
            return "-"
        return " / ".join(f"{100 * m[c]:.0f}" for c in ("RBC", "WBC", PLATELETS, "background"))

    for label, seed, metrics in rows:
        d = metrics["diagnosis"]
        roi, kept = d["all_rois"]["RBC"], d["kept"]["RBC"]
        above = d["above_lowest_true_platelet"]
        cells.append(
            [
                label,
                seed,
                f"{roi['p50']:.3f} / {roi['p90']:.3f}",
                f"{100 * d['all_rois_share_above_0.05']['RBC']:.1f} %",
                f"{kept['min']:.3f} / {kept['p10']:.3f}",
                f"{metrics['mean_detections_per_image']:.1f}",
                f"{100 * d['images_at_cap']:.0f} %",
                f"{metrics['median_lowest_kept_score']:.3f}",
                f"{above['median']} ; {100 * above['share_at_or_over_cap']:.0f} %",
                make_up(d, "hard"),
                make_up(d, "all"),
            ]
        )
    return markdown(cells, headers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("runs", nargs="+")
    m.add_argument("--diagnose", action="store_true")
    m.add_argument("--methods", nargs="+", default=["frcn", "ohem"], choices=["frcn", "ohem"])
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    t = sub.add_parser("table")
    t.add_argument(
        "frcn_and_paper", nargs="?", help="pattern with {seed}: FRCN's and paper OHEM's runs"
    )
    t.add_argument("--candidate", nargs="*", default=[], metavar="NAME=PATTERN")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    t.add_argument("--save", help="also write the table's numbers to this JSON file")
    t.add_argument("--load", help="read the numbers from a JSON file written by --save")
    d = sub.add_parser("diagnosis", help="the floor's numbers of measured --diagnose runs")
    d.add_argument("runs", nargs="+", metavar="LABEL=METHOD_DIR[:VARIANT]")
    args = parser.parse_args(argv)
    if args.command == "diagnosis":
        rows = []
        for spec in args.runs:
            label, rest = spec.split("=", 1)
            method_dir, _, variant = rest.partition(":")
            with open(os.path.join(method_dir, "summary.json")) as f:
                seed = json.load(f)["seed"]
            with open(os.path.join(method_dir, "score_floor.json")) as f:
                rows.append((label, seed, json.load(f)[variant or "plain"]))
        print(format_diagnosis(rows))
        return 0
    if args.command == "measure":
        torch.set_num_threads(args.threads)
        measure(args.runs, args.diagnose, args.methods, args.variants)
        return 0
    if args.load:
        with open(args.load) as f:
            table = {k: {int(s): m for s, m in v.items()} for k, v in json.load(f).items()}
    else:
        candidates = dict(c.split("=", 1) for c in args.candidate)
        table = load_candidates(args.frcn_and_paper, candidates, args.seeds)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(table, f, indent=1)
    print(format_runs(table))
    missing = {k: sorted(set(args.seeds) - set(v)) for k, v in table.items()}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        print(f"\nnot measured yet: {missing}; the rule decides only on every seed")
        return 0
    order = [n for n in ORDER if n in table]
    winner, reasons = decide(table, order)
    print("\n" + "\n".join(reasons) + f"\n\nchosen: {winner}")
    if all(n in table for n in FLOOR_CANDIDATES):
        choice, reasons = decide_floor(table)
        print("\nsecond protocol:\n" + "\n".join(reasons) + f"\n\nrecommended: {choice}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
