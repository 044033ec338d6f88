"""The demo's command line: one training process per method (``--run``), then the report."""

import argparse
import json
import logging
import os
import subprocess
import sys
import time

from .report import column_label, draw_detections, format_table, plot_roi_loss, read_summaries
from .run import (
    DATASETS,
    METHODS,
    build_demo_cfg,
    default_device,
    default_iters,
    prepare_dataset,
    run_one,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ohem_d2.demo", description="FRCN vs OHEM on BCCD (or the toy dataset)"
    )
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--dataset", choices=list(DATASETS), default="bccd")
    parser.add_argument("--iters", type=int, default=None, help="default: the configs'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--ohem-opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="config overrides of the OHEM run only, "
        "e.g. MODEL.ROI_HEADS.OHEM.EASY_BG_FRACTION 0.25",
    )
    parser.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="config overrides of every method's run, e.g. SOLVER.BASE_LR 0.01",
    )
    parser.add_argument(
        "--holdout",
        action="store_true",
        help="train on bccd_train, evaluate on bccd_val (BCCD's own split of trainval): "
        "for choosing settings without looking at bccd_test",
    )
    parser.add_argument(
        "--paper-only",
        action="store_true",
        help="OHEM as the paper only: no column with the recommended OHEM settings",
    )
    parser.add_argument("--run", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if len(args.ohem_opts) % 2:
        parser.error("--ohem-opts takes KEY VALUE pairs")
    if len(args.opts) % 2:
        parser.error("--opts takes KEY VALUE pairs")
    if args.holdout and args.dataset != "bccd":
        parser.error("--holdout needs --dataset bccd (its train / val split)")
    return args


def run_arguments(args):
    """The options every ``--run`` process gets: the parent's, with the device and the
    number of iterations resolved."""
    forwarded = ["--dataset", args.dataset, "--output-dir", args.output_dir]
    forwarded += ["--iters", str(args.iters), "--seed", str(args.seed), "--device", args.device]
    if args.ohem_opts:
        forwarded += ["--ohem-opts", *args.ohem_opts]
    if args.opts:
        forwarded += ["--opts", *args.opts]
    if args.holdout:
        forwarded.append("--holdout")
    if args.paper_only:
        forwarded.append("--paper-only")
    return forwarded


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("ohem_d2.demo")
    args.device = args.device or default_device()
    if args.iters is None:
        args.iters = default_iters(args.dataset)
    # One run's settings: the method's own process (--run), or preparing the data (FRCN's config).
    run = (args.dataset, args.run or "frcn", args.output_dir, args.iters, args.seed, args.device)
    if args.run:
        run_one(
            *run,
            args.ohem_opts,
            opts=args.opts,
            holdout=args.holdout,
            recommended=not args.paper_only,
        )
        return 0

    start = time.time()
    cfg = build_demo_cfg(*run, opts=args.opts, holdout=args.holdout)
    prepare_dataset(args.dataset, cfg)
    # Each method trains in its own process, so that peak memory is its own.
    command = [sys.executable, "-m", "ohem_d2.demo"]
    forwarded = run_arguments(args)
    for method in args.methods:
        log.info("=== training %s for %d iterations ===", METHODS[method], args.iters)
        subprocess.run([*command, "--run", method, *forwarded], check=True)
    summaries = read_summaries(args.output_dir, args.methods)
    table = format_table(summaries)
    plot_roi_loss(args.output_dir, args.methods)
    from detectron2.data import MetadataCatalog

    from ..engine import register_project_datasets

    register_project_datasets()
    draw_detections(
        args.output_dir,
        [(s.pop("folder"), column_label(s)) for s in summaries],
        MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes,
    )
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=1)
    title = (
        f"{DATASETS[args.dataset]} ({cfg.DATASETS.TEST[0]}), narrow VGG16, {args.iters} "
        f"iterations, seed {args.seed}"
        + (f", {' '.join(args.opts)}" if args.opts else "")
        + (f", OHEM with {' '.join(args.ohem_opts)}" if args.ohem_opts else "")
        + ":"
    )
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(title + "\n\n" + table + "\n")
    print("\n" + title + "\n\n" + table)
    print(
        f"\nWritten to {args.output_dir}/: summary.md, detections.png, roi_loss.png, "
        "ohem/hard_examples_*.png"
    )
    print(f"Total time: {time.time() - start:.0f} s")
    return 0
