"""The main job: FRCN and OHEM side by side on BCCD, real blood-cell microscopy images.

    python -m ohem_d2.demo --output-dir output/demo [--seed 0] [--iters N] [--device cpu]

Trains the FRCN heuristic baseline (configs/bccd/frcn.yaml) and OHEM (configs/bccd/ohem.yaml)
with the same narrow VGG16, initial weights, seed, data order and schedule, each in its own
process (so that peak memory is its own), evaluates both on ``bccd_test``, prints a table
side by side and writes into the output folder:
  - summary.json and summary.md: per-class AP50, mAP50 (VOC07 11-point and all-point), COCO
    AP / AP50 / AP75, s/iter, peak memory, allocator and device;
  - detections.png: the same test images with FRCN's (left) and OHEM's (right) detections;
  - roi_loss.png: the mean loss over all RoIs of fixed training images vs iteration (paper
    Fig. 3), with the parts that foreground and background RoIs contribute;
  - ohem/hard_examples_iter*.png: the hard RoIs OHEM picks early, midway and late
    (foreground red, background blue, ground truth yellow).
``--dataset toy`` runs the same on the small synthetic shapes (the fast tests use it).
"""

import argparse
import hashlib
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time

from .engine.allocator import allocator_in_use, relaunch_with_allocator

METHODS = {"frcn": "FRCN (heuristic sampling)", "ohem": "OHEM"}
# The OHEM settings the demo recommends for dense images beside the paper's, chosen on
# bccd_val (studies/bccd_score_floor.md). They change inference only: the OHEM run trains
# once (its training is the paper's) and is evaluated both ways, into <output-dir>/ohem
# (paper) and <output-dir>/ohem_recommended.
RECOMMENDED_OHEM_OPTS = (
    "MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION",
    "True",
    "MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_TARGET",
    "STOCK_SAMPLER",
    "MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_PER_CLASS",
    "False",
)
RECOMMENDED_DIR = "ohem_recommended"
DATASETS = {"bccd": "BCCD blood cells", "toy": "embedded synthetic shapes"}
# Detections drawn in detections.png: at least this score, for this many test images.
DRAW_SCORE, DRAW_IMAGES = 0.5, 3
# The all-RoI loss (Fig. 3) is measured on this many fixed training images, about 15 times
# a run (each time a forward pass over all their RoIs).
PROBE_IMAGES = 4
# BGR colours per class index, for detections.png.
CLASS_COLOURS = [(0, 0, 255), (255, 255, 255), (0, 200, 0), (255, 0, 255)]


def _config_path(dataset, method):
    from .model_zoo import get_config_file

    return get_config_file(f"{dataset}/{method}.yaml")


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --holdout: train on BCCD's own train split, evaluate on its val split (both parts of
# trainval), to choose settings without looking at bccd_test.
HOLDOUT_SPLITS = ("train", "val")


def _proposal_files(dataset, splits=("trainval", "test")):
    if dataset == "bccd":
        from .data.bccd import bccd_proposal_file as proposal_file
    else:
        from .data.embedded import embedded_proposal_file as proposal_file
    return (proposal_file(None, splits[0]),), (proposal_file(None, splits[1]),)


def build_demo_cfg(
    dataset, method, output_dir, iters, seed, device, ohem_opts=(), *, opts=(), holdout=False
):
    """The config of one demo run: `opts` apply to every method, `ohem_opts` to OHEM only;
    `holdout` trains on bccd_train and evaluates on bccd_val."""
    from detectron2.config import get_cfg

    from .config import add_ohem_config
    from .model_zoo import merge_config_file

    cfg = get_cfg()
    add_ohem_config(cfg)
    merge_config_file(cfg, _config_path(dataset, method))
    splits = ("trainval", "test")
    if holdout:
        if dataset != "bccd":
            raise ValueError("--holdout needs --dataset bccd (its train / val split)")
        splits = HOLDOUT_SPLITS
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (f"bccd_{splits[0]}",), (f"bccd_{splits[1]}",)
    # The datasets live under $DETECTRON2_DATASETS (default ./datasets).
    cfg.DATASETS.PROPOSAL_FILES_TRAIN, cfg.DATASETS.PROPOSAL_FILES_TEST = _proposal_files(
        dataset, splits
    )
    # Before the schedule is derived, so that SOLVER.MAX_ITER / STEPS given here count.
    cfg.merge_from_list(list(opts))
    base_iters = cfg.SOLVER.MAX_ITER
    cfg.SOLVER.MAX_ITER = iters
    # Keep the step at the same fraction of the schedule.
    steps = (int(round(s * iters / base_iters)) for s in cfg.SOLVER.STEPS)
    cfg.SOLVER.STEPS = tuple(s for s in steps if 0 < s < iters)
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, iters)
    cfg.SOLVER.CHECKPOINT_PERIOD = iters
    cfg.MODEL.DEVICE = device
    cfg.OUTPUT_DIR = os.path.join(output_dir, method)
    cfg.SEED = seed
    if method == "ohem" and ohem_opts:
        cfg.merge_from_list(list(ohem_opts))
    cfg.freeze()
    return cfg


def saved_run_cfg(method_dir, summary, device="cpu"):
    """The (unfrozen) config a saved demo run trained with, from its folder
    (<output-dir>/<method>) and summary.json; a --holdout run keeps its own test split
    (bccd_val), never bccd_test."""
    cfg = build_demo_cfg(
        summary["dataset"],
        summary["method"],
        os.path.dirname(method_dir),
        summary["iterations"],
        summary["seed"],
        device,
        summary["ohem_opts"],
        opts=summary["opts"],
        holdout=summary["test_datasets"] == ["bccd_val"],
    )
    if list(cfg.DATASETS.TEST) != summary["test_datasets"]:
        raise ValueError(
            f"{method_dir}: evaluates on {summary['test_datasets']}, not {cfg.DATASETS.TEST}"
        )
    cfg.defrost()
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


def _draw_test_dicts(cfg):
    """DRAW_IMAGES test images spread over the test split, with proposals and annotations."""
    from .engine.loaders import dataset_dicts_with_proposals

    dicts = dataset_dicts_with_proposals(
        cfg.DATASETS.TEST,
        cfg.DATASETS.PROPOSAL_FILES_TEST,
        filter_empty=False,
        trusted=cfg.DATASETS.PROPOSAL_FILES_TRUSTED,
    )
    step = max(1, len(dicts) // DRAW_IMAGES)
    return dicts[::step][:DRAW_IMAGES]


def save_test_detections(cfg, model, path):
    """Run `model` on the drawn test images; write their detections and ground truth."""
    import torch

    from .engine.loaders import proposal_mapper

    dicts = _draw_test_dicts(cfg)
    mapper = proposal_mapper(cfg, False)
    was_training = model.training
    model.eval()
    records = []
    with torch.no_grad():
        for d in dicts:
            inst = model([mapper(d)])[0]["instances"].to("cpu")
            records.append(
                {
                    "file_name": d["file_name"],
                    "gt_boxes": [a["bbox"] for a in d["annotations"]],
                    "gt_classes": [a["category_id"] for a in d["annotations"]],
                    "boxes": inst.pred_boxes.tensor.tolist(),
                    "scores": inst.scores.tolist(),
                    "classes": inst.pred_classes.tolist(),
                }
            )
    model.train(was_training)
    with open(path, "w") as f:
        json.dump(records, f)


def _weights_digest(model):
    """A hash of the model's weights (not of the OHEM class counts, training statistics
    that only a model with PRIOR_CORRECTION has), equal for FRCN and OHEM of one seed."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".ohem_class_counts_" in name:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _flat_results(storage):
    return {k: v for k, (v, _) in storage.latest().items()}


def _test_metrics(cfg, results):
    """The summary's metrics from flat evaluation results ("voc_bbox/...", "bbox/...") and
    the detections the evaluator wrote under cfg.OUTPUT_DIR."""
    from detectron2.data import DatasetCatalog

    from .engine.evaluation import detection_cap_statistics

    test_name = cfg.DATASETS.TEST[0]
    return {
        "voc_AP50_11point": results["voc_bbox/mAP50_11point"],
        "voc_AP50_allpoint": results["voc_bbox/mAP50_allpoint"],
        "per_class_AP50_allpoint": {
            k.split("-", 1)[1]: v
            for k, v in results.items()
            if k.startswith("voc_bbox/AP50_allpoint-")
        },
        "coco_AP": results["bbox/AP"],
        "coco_AP50": results["bbox/AP50"],
        "coco_AP75": results["bbox/AP75"],
        **detection_cap_statistics(
            os.path.join(cfg.OUTPUT_DIR, "inference", test_name, "coco_instances_results.json"),
            len(DatasetCatalog.get(test_name)),
        ),
    }


def _evaluate_recommended(cfg, model, summary):
    """Evaluate the trained OHEM model with RECOMMENDED_OHEM_OPTS into <output>/RECOMMENDED_DIR;
    its summary is the run's with these metrics and ``"recommended": true``."""
    from detectron2.evaluation.testing import flatten_results_dict

    from .engine import Trainer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = os.path.join(os.path.dirname(cfg.OUTPUT_DIR), RECOMMENDED_DIR)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    results = flatten_results_dict(Trainer.test(cfg, model))
    save_test_detections(cfg, model, os.path.join(cfg.OUTPUT_DIR, "detections.json"))
    recommended = {**summary, **_test_metrics(cfg, results), "recommended": True}
    recommended["inference_opts"] = list(RECOMMENDED_OHEM_OPTS)
    with open(os.path.join(cfg.OUTPUT_DIR, "summary.json"), "w") as f:
        json.dump(recommended, f, indent=1)
    return recommended


def run_one(
    dataset,
    method,
    output_dir,
    iters,
    seed,
    device,
    ohem_opts=(),
    *,
    opts=(),
    holdout=False,
    recommended=True,
):
    """Train and evaluate one method in this process; write <output_dir>/<method>/summary.json
    and, for OHEM with `recommended`, <output_dir>/RECOMMENDED_DIR/summary.json."""
    import shutil

    import torch
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    from .engine import Trainer, register_project_datasets
    from .engine.hooks import HardExampleSnapshot, RoILossProbe, TrainingProgress
    from .modeling.ohem import scores_as_trained

    recommended = recommended and method == "ohem"
    # The recommended settings need what training records (the class counts); training
    # itself is the paper's, and every evaluation below but the recommended one is paper's.
    train_opts = list(ohem_opts) + (list(RECOMMENDED_OHEM_OPTS) if recommended else [])
    cfg = build_demo_cfg(
        dataset, method, output_dir, iters, seed, device, train_opts, opts=opts, holdout=holdout
    )
    shutil.rmtree(os.path.join(output_dir, RECOMMENDED_DIR), ignore_errors=True)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    # Detectron2's full log goes to <method>/log.txt; the terminal gets a progress bar.
    setup_logger(cfg.OUTPUT_DIR, configure_stdout=False)
    setup_logger(cfg.OUTPUT_DIR, name="ohem_d2", configure_stdout=False)
    seed_all_rng(cfg.SEED)
    register_project_datasets()

    probe_period = max(1, iters // 15)
    snapshot_iters = sorted({1, max(1, iters // 2), iters})

    class DemoTrainer(Trainer):
        @classmethod
        def test(cls, cfg, model, evaluators=None):
            with scores_as_trained(model):
                return super().test(cfg, model, evaluators)

        def build_hooks(self):
            hooks = super().build_hooks()
            extra = [
                RoILossProbe(
                    _probe_inputs(self.cfg, PROBE_IMAGES), probe_period, self.cfg.OUTPUT_DIR
                ),
                TrainingProgress(f"{METHODS[method]} ({cfg.MODEL.DEVICE})"),
            ]
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
    init_digest = _weights_digest(trainer.model)
    print(f"{METHODS[method]}: training for {iters} iterations, seed {seed}", flush=True)
    trainer.train()
    # The final evaluation (Detectron2's EvalHook) leaves its metrics in the storage.
    results = _flat_results(trainer.storage)
    with scores_as_trained(trainer.model):
        save_test_detections(cfg, trainer.model, os.path.join(cfg.OUTPUT_DIR, "detections.json"))
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        times = [json.loads(line).get("time") for line in f]
    times = [t for t in times if t is not None]
    with open(os.path.join(cfg.OUTPUT_DIR, "roi_loss_probe.json")) as f:
        probe = json.load(f)
    summary = {
        "dataset": dataset,
        "method": method,
        "iterations": iters,
        "seed": seed,
        "ohem_opts": list(ohem_opts) if method == "ohem" else [],
        "opts": list(opts),
        "train_datasets": list(cfg.DATASETS.TRAIN),
        "test_datasets": list(cfg.DATASETS.TEST),
        "device": cfg.MODEL.DEVICE,
        "init_weights_sha256": init_digest,
        **_test_metrics(cfg, results),
        "final_roi_loss": {k: probe[k][-1] for k in RoILossProbe.KEYS},
        "s_per_iter": statistics.median(times) if times else float("nan"),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": (
            torch.cuda.max_memory_allocated() / 2**20
            if cfg.MODEL.DEVICE.startswith("cuda")
            else None
        ),
        "allocator": allocator_in_use(),
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if recommended:
        _evaluate_recommended(cfg, trainer.model, summary)
    return summary


def _optional(value, fmt):
    return "-" if value is None else fmt.format(value)


def _label(summary):
    return METHODS[summary["method"]] + (" (recommended)" if summary.get("recommended") else "")


def format_table(summaries):
    """The side-by-side table (Markdown) of the methods' summaries."""
    rows = [
        ("mAP50, all-point (%)", lambda s: f"{s['voc_AP50_allpoint']:.1f}"),
        ("mAP50, VOC07 11-point (%)", lambda s: f"{s['voc_AP50_11point']:.1f}"),
    ]
    for name in summaries[0]["per_class_AP50_allpoint"]:
        rows.append(
            (
                f"AP50 {name}, all-point (%)",
                lambda s, n=name: f"{s['per_class_AP50_allpoint'][n]:.1f}",
            )
        )
    rows += [
        ("COCO AP (%)", lambda s: f"{s['coco_AP']:.1f}"),
        ("COCO AP50 (%)", lambda s: f"{s['coco_AP50']:.1f}"),
        ("COCO AP75 (%)", lambda s: f"{s['coco_AP75']:.1f}"),
        ("detections per image (mean)", lambda s: f"{s['mean_detections_per_image']:.1f}"),
        (
            "lowest kept score (median over images)",
            lambda s: _optional(s["median_lowest_kept_score"], "{:.3f}"),
        ),
        (
            "final loss over all RoIs (fg + bg)",
            lambda s: "{mean_roi_loss:.3f} ({fg_part:.3f} + {bg_part:.3f})".format(
                **s["final_roi_loss"]
            ),
        ),
        ("s/iter (median)", lambda s: f"{s['s_per_iter']:.3f}"),
        ("peak memory (MB RSS)", lambda s: f"{s['peak_rss_mb']:.0f}"),
    ]
    if any(s.get("peak_cuda_mb") is not None for s in summaries):
        rows.append(("peak CUDA memory (MB)", lambda s: f"{s['peak_cuda_mb']:.0f}"))
    rows += [
        ("memory allocator", lambda s: s["allocator"]),
        ("device", lambda s: s["device"]),
    ]
    lines = ["| metric | " + " | ".join(_label(s) for s in summaries) + " |"]
    lines.append("|---" * (len(summaries) + 1) + "|")
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(s) for s in summaries) + " |")
    return "\n".join(lines)


def plot_roi_loss(output_dir, methods):
    """Both methods' probe curves (total, foreground and background parts) in one PNG;
    returns the data plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for k, method in enumerate(methods):
        with open(os.path.join(output_dir, method, "roi_loss_probe.json")) as f:
            curve = json.load(f)
        data[method] = curve
        colour = f"C{k}"
        it = curve["iteration"]
        ax.plot(it, curve["mean_roi_loss"], color=colour, label=f"{METHODS[method]}: all RoIs")
        ax.plot(it, curve["fg_part"], color=colour, ls="--", label="  foreground part")
        ax.plot(it, curve["bg_part"], color=colour, ls=":", label="  background part")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean loss per RoI (all RoIs)")
    ax.set_title(
        f"Training loss over all RoIs of {PROBE_IMAGES} fixed training images (paper Fig. 3)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "roi_loss.png"))
    plt.close(fig)
    with open(os.path.join(output_dir, "roi_loss.json"), "w") as f:
        json.dump(data, f)
    return data


def draw_detections(output_dir, panels, class_names):
    """detections.png: one row per test image, one panel per (folder, title) of `panels`
    (GT yellow, detections with score >= DRAW_SCORE coloured by class, with class and
    score)."""
    import cv2
    import numpy as np

    from .engine.hooks import GT_COLOUR

    per_method = {}
    for method, _ in panels:
        with open(os.path.join(output_dir, method, "detections.json")) as f:
            per_method[method] = json.load(f)
    rows = []
    for k in range(len(per_method[panels[0][0]])):
        row = []
        for method, name in panels:
            rec = per_method[method][k]
            img = cv2.imread(rec["file_name"])
            for box in rec["gt_boxes"]:
                x0, y0, x1, y1 = np.round(box).astype(int).tolist()
                cv2.rectangle(img, (x0, y0), (x1, y1), GT_COLOUR, 1)
            for box, score, cls in zip(rec["boxes"], rec["scores"], rec["classes"]):
                if score < DRAW_SCORE:
                    continue
                x0, y0, x1, y1 = np.round(box).astype(int).tolist()
                colour = CLASS_COLOURS[cls % len(CLASS_COLOURS)]
                cv2.rectangle(img, (x0, y0), (x1, y1), colour, 2)
                label = f"{class_names[cls]} {score:.2f}"
                cv2.putText(
                    img, label, (x0 + 2, y0 + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1
                )
            title = f"{name}: score >= {DRAW_SCORE}, ground truth yellow"
            cv2.rectangle(img, (0, 0), (img.shape[1], 26), (0, 0, 0), -1)
            cv2.putText(img, title, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, GT_COLOUR, 1)
            row.append(cv2.copyMakeBorder(img, 2, 2, 2, 2, cv2.BORDER_CONSTANT))
        rows.append(np.concatenate(row, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [cv2.copyMakeBorder(r, 0, 0, 0, width - r.shape[1], cv2.BORDER_CONSTANT) for r in rows]
    path = os.path.join(output_dir, "detections.png")
    cv2.imwrite(path, np.concatenate(rows, axis=0))
    return path


def prepare_dataset(dataset, cfg):
    """Make sure the dataset and its proposal files are there (computing what is missing)."""
    if dataset == "toy":
        from .engine import prepare_embedded_dataset

        prepare_embedded_dataset(cfg)
        return
    from .data.bccd import default_bccd_root
    from .proposals.bccd import compute_bccd_proposals

    root = default_bccd_root()
    if not os.path.isdir(os.path.join(root, "JPEGImages")):
        # An installed wheel holds the code and configs, not the 364 images.
        raise SystemExit(
            f"ERROR: BCCD not found (no {os.path.join(root, 'JPEGImages')}). Its images ship "
            "in the repository's datasets/bccd, not in the installed package: run the demo "
            "from a clone (`make demo`), or copy datasets/bccd to $DETECTRON2_DATASETS/bccd. "
            "`--dataset toy` needs no data: it generates it under $DETECTRON2_DATASETS/ohem_toy "
            "(default ./datasets/ohem_toy)."
        )
    compute_bccd_proposals(missing_only=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="FRCN vs OHEM on BCCD (or the toy dataset)")
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("ohem_d2.demo")
    args.device = args.device or default_device()

    if args.iters is None:
        from detectron2.config import get_cfg

        from .config import add_ohem_config
        from .model_zoo import merge_config_file

        cfg = get_cfg()
        add_ohem_config(cfg)
        merge_config_file(cfg, _config_path(args.dataset, "frcn"))
        args.iters = cfg.SOLVER.MAX_ITER
    if args.run:
        run_one(
            args.dataset,
            args.run,
            args.output_dir,
            args.iters,
            args.seed,
            args.device,
            args.ohem_opts,
            opts=args.opts,
            holdout=args.holdout,
            recommended=not args.paper_only,
        )
        return 0

    start = time.time()
    cfg = build_demo_cfg(
        args.dataset,
        "frcn",
        args.output_dir,
        args.iters,
        args.seed,
        args.device,
        opts=args.opts,
        holdout=args.holdout,
    )
    prepare_dataset(args.dataset, cfg)
    summaries = []
    for method in args.methods:
        log.info("=== training %s for %d iterations ===", METHODS[method], args.iters)
        cmd = [sys.executable, "-m", "ohem_d2.demo", "--run", method, "--dataset", args.dataset]
        cmd += ["--output-dir", args.output_dir, "--iters", str(args.iters)]
        cmd += ["--seed", str(args.seed), "--device", args.device]
        if args.ohem_opts:
            cmd += ["--ohem-opts", *args.ohem_opts]
        if args.opts:
            cmd += ["--opts", *args.opts]
        if args.holdout:
            cmd.append("--holdout")
        if args.paper_only:
            cmd.append("--paper-only")
        subprocess.run(cmd, check=True)
        for folder in (method, RECOMMENDED_DIR) if method == "ohem" else (method,):
            path = os.path.join(args.output_dir, folder, "summary.json")
            if os.path.isfile(path):
                with open(path) as f:
                    summaries.append({**json.load(f), "folder": folder})
    table = format_table(summaries)
    plot_roi_loss(args.output_dir, args.methods)
    from detectron2.data import MetadataCatalog

    from .engine import register_project_datasets

    register_project_datasets()
    draw_detections(
        args.output_dir,
        [(s.pop("folder"), _label(s)) for s in summaries],
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


if __name__ == "__main__":
    # As train_net.py: on jemalloc when found (engine/allocator.py); the per-method training
    # processes inherit it. Only as a command: main(argv) called in-process must not re-exec.
    relaunch_with_allocator("auto")
    sys.exit(main())
