"""One demo run: its config, its dataset, and the training and evaluation of one method in
this process (``<output-dir>/<method>/summary.json``; for OHEM also the recommended
settings' evaluation in ``<output-dir>/ohem_recommended``)."""

import hashlib
import json
import os
import resource
import statistics
import sys

from ..engine.allocator import allocator_in_use

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
DATASETS = {"bccd": "BCCD blood cells", "toy": "toy synthetic shapes"}
# Each run saves its detections on this many test images, for detections.png.
DRAW_IMAGES = 3
# The all-RoI loss (Fig. 3) is measured on this many fixed training images, about 15 times
# a run (each time a forward pass over all their RoIs).
PROBE_IMAGES = 4


def _config_path(dataset, method):
    from ..model_zoo import get_config_file

    return get_config_file(f"{dataset}/{method}.yaml")


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_iters(dataset):
    """The configs' number of iterations (FRCN's, which OHEM's equals)."""
    from detectron2.config import get_cfg

    from ..config import add_ohem_config
    from ..model_zoo import merge_config_file

    cfg = get_cfg()
    add_ohem_config(cfg)
    merge_config_file(cfg, _config_path(dataset, "frcn"))
    return cfg.SOLVER.MAX_ITER


# --holdout: train on BCCD's own train split, evaluate on its val split (both parts of
# trainval), to choose settings without looking at bccd_test.
HOLDOUT_SPLITS = ("train", "val")


def _proposal_files(dataset, splits=("trainval", "test")):
    if dataset == "bccd":
        from ..data.bccd import bccd_proposal_file as proposal_file
    else:
        from ..data.toy import toy_proposal_file as proposal_file
    return (proposal_file(None, splits[0]),), (proposal_file(None, splits[1]),)


def build_demo_cfg(
    dataset, method, output_dir, iters, seed, device, ohem_opts=(), *, opts=(), holdout=False
):
    """The config of one demo run: `opts` apply to every method, `ohem_opts` to OHEM only;
    `holdout` trains on bccd_train and evaluates on bccd_val."""
    from detectron2.config import get_cfg

    from ..config import add_ohem_config
    from ..model_zoo import merge_config_file

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


def probe_inputs(cfg, count):
    """`count` fixed training images, resized for the test (no flip), with their proposals
    and annotations, for the probes."""
    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    from ..engine.loaders import dataset_dicts_with_proposals

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


def prepare_dataset(dataset, cfg):
    """Make sure the dataset and its proposal files are there (computing what is missing)."""
    if dataset == "toy":
        from ..engine import prepare_toy_dataset

        prepare_toy_dataset(cfg)
        return
    from ..data.bccd import default_bccd_root
    from ..proposals.bccd import compute_bccd_proposals

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


def _draw_test_dicts(cfg):
    """DRAW_IMAGES test images spread over the test split, with proposals and annotations."""
    from ..engine.loaders import dataset_dicts_with_proposals

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

    from ..engine.loaders import proposal_mapper

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

    from ..engine.calibration import score_quality
    from ..engine.evaluation import detection_cap_statistics

    test_name = cfg.DATASETS.TEST[0]
    results_file = os.path.join(
        cfg.OUTPUT_DIR, "inference", test_name, "coco_instances_results.json"
    )
    with open(results_file) as f:
        detections = json.load(f)
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
        **detection_cap_statistics(results_file, len(DatasetCatalog.get(test_name))),
        **score_quality(detections, DatasetCatalog.get(test_name), dataset_name=test_name),
    }


def _evaluate_recommended(cfg, model, summary):
    """Evaluate the trained OHEM model with RECOMMENDED_OHEM_OPTS into <output>/RECOMMENDED_DIR;
    its summary is the run's with these metrics and ``"recommended": true``."""
    from detectron2.evaluation.testing import flatten_results_dict

    from ..engine import Trainer

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

    from ..engine import Trainer, register_project_datasets
    from ..modeling.ohem import scores_as_trained
    from .hooks import HardExampleSnapshot, RoILossProbe, TrainingProgress

    recommended = recommended and method == "ohem"
    # The recommended settings need what training records (the class counts); training
    # itself is the paper's, and every evaluation below but the recommended one is paper's.
    train_opts = list(ohem_opts) + (list(RECOMMENDED_OHEM_OPTS) if recommended else [])
    cfg = build_demo_cfg(
        dataset, method, output_dir, iters, seed, device, train_opts, opts=opts, holdout=holdout
    )
    if method == "ohem":  # OHEM's earlier recommended evaluation is of another model
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
                    probe_inputs(self.cfg, PROBE_IMAGES), probe_period, self.cfg.OUTPUT_DIR
                ),
                TrainingProgress(f"{METHODS[method]} ({cfg.MODEL.DEVICE})"),
            ]
            if method == "ohem":
                extra.append(
                    HardExampleSnapshot(
                        probe_inputs(self.cfg, 3), snapshot_iters, self.cfg.OUTPUT_DIR
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
        # The thread count changes a CPU run's numbers as a seed does.
        "threads": torch.get_num_threads(),
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
