"""Re-evaluate the demo's final models with other caps on the detections kept per image.

    python -m studies.detection_cap --caps 100 300 --runs output/demo \\
        output/test_frcn_s1:output/test_ohem_s1 output/test_frcn_s2:output/test_ohem_s2

Each run is an --output-dir of `python -m ohem_d2.demo` (or FRCN_DIR:OHEM_DIR, as in
studies.table). For every method's model_final.pth it evaluates the run's test split
again (bccd_test, or bccd_val for a --holdout run; COCO and VOC, the demo's evaluators) with
`TEST.DETECTIONS_PER_IMAGE` set to each cap, and prints all-point mAP50, Platelets AP50 and
COCO AP per cap. Nothing is trained; the evaluation output goes to a temporary folder, so
the runs' own files are left as they are.

On bccd_test this is a diagnostic of the evaluation, never a choice: a cap other than the
paper's and Detectron2's 100 may only be chosen on bccd_val (studies/bccd_learning_rate.md).
"""

import argparse
import os
import tempfile

import torch

from ohem_d2.demo import saved_run_cfg
from ohem_d2.engine import Trainer, register_project_datasets
from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer
from studies.table import load_run, markdown


def evaluate(run_dir, summary, cap):
    method_dir = os.path.join(run_dir, summary["method"])
    cfg = saved_run_cfg(method_dir, summary)
    weights = os.path.join(method_dir, "model_final.pth")
    cfg.TEST.DETECTIONS_PER_IMAGE = cap
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="detection_cap_")
    cfg.freeze()
    model = Trainer.build_model(cfg)
    SafeDetectionCheckpointer(model).load(weights)
    results = Trainer.test(cfg, model)
    results = results[cfg.DATASETS.TEST[0]] if cfg.DATASETS.TEST[0] in results else results
    return (
        results["voc_bbox"]["mAP50_allpoint"],
        results["voc_bbox"]["AP50_allpoint-Platelets"],
        results["bbox"]["AP"],
    )


def trained_runs(spec):
    """[(run folder, summary)] of each trained model of DIR or FRCN_DIR:OHEM_DIR (see
    studies.table.load_run). The recommended OHEM is the paper's model evaluated otherwise,
    so it is left out."""
    runs = [
        (summary["run_dir"], summary)
        for summary in load_run(spec)
        if not summary.get("recommended")
        and os.path.isfile(os.path.join(summary["run_dir"], summary["method"], "model_final.pth"))
    ]
    return sorted(runs, key=lambda run: run[1]["method"])


def main():
    parser = argparse.ArgumentParser(prog="python -m studies.detection_cap")
    parser.add_argument("--caps", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--runs", nargs="+", default=["output/demo"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_project_datasets()
    headers = ["seed", "method"]
    for c in args.caps:
        headers += [f"mAP50 @{c}", f"Platelets @{c}", f"COCO AP @{c}"]
    rows = []
    for spec in args.runs:
        for run_dir, summary in trained_runs(spec):
            method, cells = summary["method"], []
            for cap in args.caps:
                cells += [f"{v:.1f}" for v in evaluate(run_dir, summary, cap)]
            rows.append([summary["seed"], method] + cells)
    print(markdown(rows, headers))


if __name__ == "__main__":
    main()
