"""The main job: FRCN and OHEM side by side on the embedded dataset.

    python -m ohem_d2.demo --output-dir output/demo

Trains the FRCN heuristic baseline (configs/toy/frcn.yaml) and OHEM (configs/toy/ohem.yaml)
with the same narrow VGG16, seed and iteration count, each in its own process (so that peak
memory is its own), evaluates both (VOC AP50, COCO AP), prints a table side by side and
writes into the output folder:
  - summary.json and summary.md: the table;
  - roi_loss.png: mean loss over all RoIs of fixed training images vs iteration (Fig. 3);
  - ohem/hard_examples_iter*.png: the hard RoIs OHEM picks early, midway and late
    (foreground red, background blue, ground truth yellow).
"""

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time

from .engine.allocator import allocator_in_use, relaunch_with_allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"frcn": "FRCN (heuristic sampling)", "ohem": "OHEM"}


def _config_path(method):
    return os.path.join(REPO, "configs", "toy", f"{method}.yaml")


def build_demo_cfg(method, output_dir, iters, seed):
    from detectron2.config import get_cfg

    from .config import add_ohem_config
    from .data.embedded import embedded_proposal_file

    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.merge_from_file(_config_path(method))
    # The embedded dataset lives under $DETECTRON2_DATASETS (default ./datasets).
    cfg.DATASETS.PROPOSAL_FILES_TRAIN = (embedded_proposal_file(None, "trainval"),)
    cfg.DATASETS.PROPOSAL_FILES_TEST = (embedded_proposal_file(None, "test"),)
    base_iters = cfg.SOLVER.MAX_ITER
    cfg.SOLVER.MAX_ITER = iters
    # Keep the step at the same fraction of the schedule.
    steps = (int(round(s * iters / base_iters)) for s in cfg.SOLVER.STEPS)
    cfg.SOLVER.STEPS = tuple(s for s in steps if 0 < s < iters)
    cfg.SOLVER.CHECKPOINT_PERIOD = iters
    cfg.OUTPUT_DIR = os.path.join(output_dir, method)
    cfg.SEED = seed
    cfg.freeze()
    return cfg


def _probe_inputs(cfg, count):
    """`count` fixed training images, resized for the test (no flip), with their proposals
    and annotations, for the probes."""
    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    from .engine.loaders import dataset_dicts_with_proposals

    dicts = dataset_dicts_with_proposals(
        cfg.DATASETS.TRAIN,
        cfg.DATASETS.PROPOSAL_FILES_TRAIN,
        filter_empty=True,
        trusted=cfg.DATASETS.PROPOSAL_FILES_TRUSTED,
    )
    kwargs = DatasetMapper.from_config(cfg, True)
    kwargs["augmentations"] = [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
    ]
    kwargs["precomputed_proposal_topk"] = sys.maxsize
    mapper = DatasetMapper(**kwargs)
    return [mapper(d) for d in dicts[:count]]


def run_one(method, output_dir, iters, seed):
    """Train and evaluate one method in this process; write <output_dir>/<method>/summary.json."""
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    from .engine import Trainer, register_project_datasets
    from .engine.hooks import HardExampleSnapshot, RoILossProbe

    cfg = build_demo_cfg(method, output_dir, iters, seed)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(cfg.OUTPUT_DIR)
    seed_all_rng(cfg.SEED)
    register_project_datasets()

    probe_period = max(1, iters // 30)
    snapshot_iters = sorted({1, max(1, iters // 2), iters})

    class DemoTrainer(Trainer):
        def build_hooks(self):
            hooks = super().build_hooks()
            extra = [RoILossProbe(_probe_inputs(self.cfg, 8), probe_period, self.cfg.OUTPUT_DIR)]
            if method == "ohem":
                extra.append(
                    HardExampleSnapshot(
                        _probe_inputs(self.cfg, 3), snapshot_iters, self.cfg.OUTPUT_DIR
                    )
                )
            # Before the PeriodicWriter (last), so that the probe's values are written.
            return hooks[:-1] + extra + hooks[-1:]

    trainer = DemoTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # The final evaluation (Detectron2's EvalHook) leaves its metrics in the storage.
    results = {k: v for k, (v, _) in trainer.storage.latest().items()}
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        times = [json.loads(line).get("time") for line in f]
    times = [t for t in times if t is not None]
    summary = {
        "method": method,
        "iterations": iters,
        "voc_AP50": results["voc_bbox/AP50"],
        "coco_AP": results["bbox/AP"],
        "coco_AP50": results["bbox/AP50"],
        "s_per_iter": statistics.median(times) if times else float("nan"),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "allocator": allocator_in_use(),
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def format_table(summaries):
    rows = [
        ("VOC07 AP50 (%)", "voc_AP50", "{:.1f}"),
        ("COCO AP (%)", "coco_AP", "{:.1f}"),
        ("COCO AP50 (%)", "coco_AP50", "{:.1f}"),
        ("s/iter (median)", "s_per_iter", "{:.3f}"),
        ("peak memory (MB RSS)", "peak_rss_mb", "{:.0f}"),
        ("memory allocator", "allocator", "{}"),
    ]
    methods = [s["method"] for s in summaries]
    lines = ["| metric | " + " | ".join(METHODS[m] for m in methods) + " |"]
    lines.append("|---" * (len(methods) + 1) + "|")
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(s[key]) for s in summaries) + " |")
    return "\n".join(lines)


def plot_roi_loss(output_dir, methods):
    """Both methods' probe curves in one PNG; returns the data plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for method in methods:
        with open(os.path.join(output_dir, method, "roi_loss_probe.json")) as f:
            curve = json.load(f)
        data[method] = curve
        ax.plot(curve["iteration"], curve["mean_roi_loss"], label=METHODS[method])
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean loss per RoI (all RoIs)")
    ax.set_title("Training loss over all RoIs (paper Fig. 3)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "roi_loss.png"))
    plt.close(fig)
    with open(os.path.join(output_dir, "roi_loss.json"), "w") as f:
        json.dump(data, f)
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description="FRCN vs OHEM on the embedded dataset")
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--iters", type=int, default=None, help="default: the toy configs'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--run", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("ohem_d2.demo")

    if args.iters is None:
        from detectron2.config import get_cfg

        from .config import add_ohem_config

        cfg = get_cfg()
        add_ohem_config(cfg)
        cfg.merge_from_file(_config_path("frcn"))
        args.iters = cfg.SOLVER.MAX_ITER
    if args.run:
        run_one(args.run, args.output_dir, args.iters, args.seed)
        return 0

    from .engine import prepare_embedded_dataset

    start = time.time()
    prepare_embedded_dataset(build_demo_cfg("frcn", args.output_dir, args.iters, args.seed))
    summaries = []
    for method in args.methods:
        log.info("=== training %s for %d iterations ===", METHODS[method], args.iters)
        cmd = [sys.executable, "-m", "ohem_d2.demo", "--run", method]
        cmd += ["--output-dir", args.output_dir, "--iters", str(args.iters)]
        cmd += ["--seed", str(args.seed)]
        subprocess.run(cmd, check=True)
        with open(os.path.join(args.output_dir, method, "summary.json")) as f:
            summaries.append(json.load(f))
    table = format_table(summaries)
    plot_roi_loss(args.output_dir, args.methods)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=1)
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(f"Embedded dataset, narrow VGG16, {args.iters} iterations, seed {args.seed}:")
    print(table)
    print(f"\nWritten to {args.output_dir}/: summary.md, roi_loss.png, ohem/hard_examples_*.png")
    print(f"Total time: {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    # As train_net.py: on jemalloc when found (engine/allocator.py); the per-method training
    # processes inherit it. Only as a command: main(argv) called in-process must not re-exec.
    relaunch_with_allocator("auto")
    sys.exit(main())
