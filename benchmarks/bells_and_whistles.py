"""Inference time and accuracy of the demo's saved models with the paper's bells and
whistles: plain, B (iterative box regression + box voting), M (multi-scale testing) and M+B.

    python -m benchmarks.bells_and_whistles output/demo [output/demo_s1 ...]
    python -m benchmarks.bells_and_whistles output/demo/ohem --variants plain B

Each argument is a demo --output-dir (every <dir>/<method>/ with summary.json and
model_final.pth) or one method's folder. Every model is evaluated on its run's own test split
(bccd_val for a --holdout run) once per variant, with the demo's evaluators; the table gives
all-point mAP50, COCO AP and the model's inference time per image (data loading and
evaluation excluded). M tests at --scales (default the paper's 480, 576, 688, 864, 1000,
longer side at most --max-size 1000), without flip. Nothing is trained; the evaluation output
goes to a temporary folder, so the runs' own files are left as they are.
"""

import argparse
import json
import os
import tempfile
import time

import torch
from tabulate import tabulate
from torch import nn

VARIANTS = {
    # name: (multi-scale testing, iterative box regression and box voting)
    "plain": (False, False),
    "B": (False, True),
    "M": (True, False),
    "M+B": (True, True),
}
PAPER_SCALES = (480, 576, 688, 864, 1000)


def find_runs(path):
    """[(method folder, summary)] of a demo --output-dir or of one method's folder."""
    # A method's folder holds its model; a demo --output-dir holds the methods' folders (and
    # a summary.json of its own, the list of the methods' summaries).
    folders = [path] if os.path.isfile(os.path.join(path, "model_final.pth")) else []
    folders += [
        os.path.join(path, m)
        for m in ("frcn", "ohem")
        if os.path.isfile(os.path.join(path, m, "summary.json"))
    ]
    if not folders:
        raise FileNotFoundError(
            f"{path}: no summary.json there nor in its frcn/ or ohem/ folder (give a demo "
            "--output-dir or one method's folder in it)"
        )
    runs = []
    for folder in folders:
        with open(os.path.join(folder, "summary.json")) as f:
            runs.append((folder, json.load(f)))
    return runs


def variant_cfg(method_dir, summary, variant, scales, max_size):
    """The demo run's config with the variant's options, evaluating into a temporary folder."""
    from ohem_d2.demo import saved_run_cfg

    cfg = saved_run_cfg(method_dir, summary)
    multiscale, refine = VARIANTS[variant]
    cfg.TEST.AUG.ENABLED = multiscale
    cfg.TEST.AUG.MIN_SIZES = tuple(scales)
    cfg.TEST.AUG.MAX_SIZE = max_size
    cfg.TEST.AUG.FLIP = False
    cfg.TEST.ITERATIVE_BBOX_REG.ENABLED = refine
    cfg.TEST.BOX_VOTING.ENABLED = refine
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="bells_and_whistles_")
    cfg.freeze()
    return cfg


class TimedModel(nn.Module):
    """Calls ``model`` and adds up the seconds its calls take and the images they get."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seconds, self.images = 0.0, 0

    def forward(self, batched_inputs):
        start = time.perf_counter()
        outputs = self.model(batched_inputs)
        self.seconds += time.perf_counter() - start
        self.images += len(batched_inputs)
        return outputs


def evaluate(method_dir, summary, variant, scales, max_size):
    """{"mAP50_allpoint", "coco_AP", "s_per_image"} of one saved model and variant."""
    from detectron2.evaluation import inference_on_dataset

    from ohem_d2.engine import Trainer, build_detection_evaluator
    from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer
    from ohem_d2.engine.loaders import build_multiscale_test_loader
    from ohem_d2.modeling.multiscale import MultiScaleRCNN

    cfg = variant_cfg(method_dir, summary, variant, scales, max_size)
    model = Trainer.build_model(cfg)
    SafeDetectionCheckpointer(model).load(os.path.join(method_dir, "model_final.pth"))
    model.eval()
    name = cfg.DATASETS.TEST[0]
    # As Trainer.test_with_TTA and Trainer.test build them (B inside M when both are on).
    if cfg.TEST.AUG.ENABLED:
        model, loader = MultiScaleRCNN(cfg, model), build_multiscale_test_loader(cfg, name)
    else:
        model = Trainer.with_box_refinement(cfg, model)
        loader = Trainer.build_test_loader(cfg, name)
    timed = TimedModel(model)
    results = inference_on_dataset(
        timed, loader, build_detection_evaluator(name, cfg.OUTPUT_DIR, cfg)
    )
    return {
        "mAP50_allpoint": results["voc_bbox"]["mAP50_allpoint"],
        "coco_AP": results["bbox"]["AP"],
        "s_per_image": timed.seconds / max(timed.images, 1),
    }


def format_table(rows):
    headers = ["run", "method", "variant", "mAP50 all-point (%)", "COCO AP (%)", "s/image"]
    cells = [
        [
            run,
            method,
            variant,
            f"{r['mAP50_allpoint']:.1f}",
            f"{r['coco_AP']:.1f}",
            f"{r['s_per_image']:.3f}",
        ]
        for run, method, variant, r in rows
    ]
    return tabulate(cells, headers, tablefmt="github", disable_numparse=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="demo --output-dir(s) or method folder(s)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--scales", type=int, nargs="+", default=list(PAPER_SCALES))
    parser.add_argument("--max-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--jsonl",
        help="append each result to this file as it is measured (long runs keep "
        "what they finished)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from ohem_d2.engine import register_project_datasets

    torch.set_num_threads(args.threads)
    register_project_datasets()
    runs = [run for path in args.runs for run in find_runs(path)]  # fail before evaluating
    rows = []
    for method_dir, summary in runs:
        for variant in args.variants:
            result = evaluate(method_dir, summary, variant, args.scales, args.max_size)
            row = (os.path.dirname(method_dir), summary["method"], variant, result)
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    record = {"run": row[0], "method": row[1], "variant": variant, **result}
                    f.write(json.dumps(record) + "\n")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
