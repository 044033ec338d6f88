"""The training-step benchmark of FRCN against OHEM, as a library.

Its settings (the command line of ``bench_train_step.py``, :func:`parse_args`), the models
built from the shipped configs, the synthetic batch, one timed training step, the mining
measurements and the peak-memory measurement of one iteration. ``bench_train_step.py`` is
the command line; ``lowrank_sweep.py`` reuses the batch, the models and the hard sets.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ohem_d2.config import add_ohem_config
from ohem_d2.engine.allocator import (
    ALLOCATORS,
    allocator_in_use,
)
from ohem_d2.modeling.ohem import ReadonlyScorer, readonly_head

REPO = Path(__file__).resolve().parents[1]

# (FRCN config, OHEM config), relative to the repository.
ARCHS = {
    "vgg16": ("configs/frcn_vgg16.yaml", "configs/frcn_vgg16_ohem.yaml"),
    "vggm": ("configs/table1/row01_frcn_vggm.yaml", "configs/table1/row12_ohem_vggm.yaml"),
    # The zoo's R50-FPN (RPN proposals, 512 sampled RoIs, 2 fc of 1024) and its OHEM variant.
    "r50-fpn": (
        "configs/model_zoo/COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        "configs/faster_rcnn_R_50_FPN_ohem.yaml",
    ),
}
NUM_GT = 3  # objects per synthetic image
DESCRIPTION = "Time and measure full training iterations of FRCN and OHEM side by side."


def build_cfg(arch, variant, args):
    """cfg of ``variant`` in {"frcn", "ohem", "approx"} for ``arch``, from the shipped yaml."""
    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.merge_from_file(str(REPO / ARCHS[arch][0 if variant == "frcn" else 1]))
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    if arch == "r50-fpn":
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = args.proposals
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = max(2000, args.proposals)
    else:
        cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN = args.proposals
    if args.chunk_size is not None:
        cfg.MODEL.ROI_HEADS.OHEM.READONLY_CHUNK_SIZE = args.chunk_size
    if variant == "approx":
        cfg.MODEL.ROI_HEADS.OHEM.FAST_READONLY.MODE = args.approx_mode
        if args.approx_rank is not None:
            cfg.MODEL.ROI_HEADS.OHEM.FAST_READONLY.RANK = args.approx_rank
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def build(cfg, inputs, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    calibrate_frozen_bn(model, inputs)
    return model, build_optimizer(cfg, model)


@torch.no_grad()
def calibrate_frozen_bn(model, inputs):
    """Give randomly initialised frozen BN layers the statistics of their inputs.

    The zoo's R50-FPN freezes its BN layers, which ImageNet weights would fill; left at
    identity on random weights, the activations grow by ~2000x over the ResNet, the RPN's
    deltas explode and only a handful of non-empty proposals survive, so there is nothing to
    mine. One backbone forward on the benchmark's batch sets each layer's mean and variance
    to those of its input (in order, so each sees already-normalised inputs), as a
    data-dependent initialisation. No-op for models without frozen BN (VGG).
    """
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    if not norms:
        return

    def set_stats(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    handles = [m.register_forward_pre_hook(set_stats) for m in norms]
    try:
        model.backbone(model.preprocess_image(inputs).tensor)
    finally:
        for h in handles:
            h.remove()


def synthetic_batch(cfg, args, seed=0):
    """``args.images`` inputs: noise images (short side ``image_size``, 4:3), NUM_GT objects
    each, and ``proposals`` boxes per image: 5% jittered around the objects (the foreground
    candidates), the rest anywhere at any scale, like selective search's mostly-background set.
    """
    g = torch.Generator().manual_seed(seed)
    h = args.image_size
    w = int(round(h * args.aspect))
    inputs = []
    for _ in range(args.images):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        wh = torch.rand(NUM_GT, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 32
        xy = torch.rand(NUM_GT, 2, generator=g) * (torch.tensor([w, h]) - wh)
        gt = torch.cat([xy, xy + wh], dim=1)
        n_near = max(1, args.proposals // 20)
        near = gt[torch.randint(NUM_GT, (n_near,), generator=g)]
        size = torch.cat([near[:, 2:] - near[:, :2]] * 2, dim=1)
        near = near + torch.randn(near.shape, generator=g) * 0.1 * size
        side = torch.exp(torch.rand(args.proposals - n_near, 2, generator=g) * 3.4 + 2.8)
        side = torch.minimum(side, torch.tensor([w - 1.0, h - 1.0]))
        xy = torch.rand(len(side), 2, generator=g) * (torch.tensor([w, h]) - side)
        far = torch.cat([xy, xy + side], dim=1)
        props = Instances((h, w))
        props.proposal_boxes = Boxes(torch.cat([near, far]))
        props.proposal_boxes.clip((h, w))
        props.objectness_logits = torch.zeros(args.proposals)
        target = Instances((h, w))
        target.gt_boxes = Boxes(gt)
        target.gt_classes = torch.randint(cfg.MODEL.ROI_HEADS.NUM_CLASSES, (NUM_GT,), generator=g)
        inputs.append(
            {"image": image, "height": h, "width": w, "instances": target, "proposals": props}
        )
    return inputs


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optimizer, inputs, device):
    """One Detectron2 SimpleTrainer iteration; returns its wall time in seconds."""
    sync(device)
    start = time.perf_counter()
    loss = sum(model(inputs).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def readonly_inputs(model, inputs):
    """What the OHEM head's miner receives: features and all labelled proposals."""
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    targets = [x["instances"].to(model.device) for x in inputs]
    if hasattr(model, "select_proposals"):  # FastRCNN: precomputed proposals
        proposals = model.select_proposals(inputs)
    else:
        proposals, _ = model.proposal_generator(images, features, targets)
    heads = model.roi_heads
    return [features[f] for f in heads.in_features], heads.label_proposals(proposals, targets)


class TimedMiner:
    """Stands in for a head's miner and adds up the wall time of its calls, so that the
    mining done inside a training step is timed where it runs (same memory state)."""

    def __init__(self, miner, device):
        self.miner, self.device, self.seconds = miner, device, 0.0

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        out = self.miner(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out

    def __getattr__(self, name):
        return getattr(self.miner, name)


def readonly_kwargs(model):
    """The readonly pass's RoI network of ``model``'s head, as ``ReadonlyScorer.predict``
    takes it."""
    network = readonly_head(model.roi_heads)
    return {"box_forward": network, "readonly_modules": network.modules}


def time_mining(model, features, labelled, device):
    """(readonly_s, selection_s) of one mining call, timed separately."""
    miner, heads = model.roi_heads.miner, model.roi_heads
    sync(device)
    start = time.perf_counter()
    predictions = miner.scorer.predict(features, labelled, **readonly_kwargs(model))
    sync(device)
    middle = time.perf_counter()
    miner.select(labelled, predictions, heads.box_predictor)
    sync(device)
    return middle - start, time.perf_counter() - middle


@torch.no_grad()
def hard_sets(model, scorer, features, labelled, seed):
    """Per image, the set of indices mined with ``scorer`` (dropout seeded by ``seed``)."""
    miner, predictor = model.roi_heads.miner, model.roi_heads.box_predictor
    torch.manual_seed(seed)
    predictions = scorer.predict(features, labelled, **readonly_kwargs(model))
    losses = scorer.losses(predictor, predictions, labelled)
    kept = miner.hard_indices(losses, labelled, predictor.num_classes)
    sets = [set(keep.tolist()) for keep, _ in kept]
    return sets


def overlap(a_sets, b_sets):
    """Mean over images of |A & B| / |A|."""
    return statistics.mean(len(a & b) / max(len(a), 1) for a, b in zip(a_sets, b_sets))


def measure_overlaps(approx_model, features, labelled, iteration):
    """Overlap of the approximate hard set with the exact one (same dropout masks), and, for
    scale, of two exact hard sets drawn with different dropout masks."""
    miner = approx_model.roi_heads.miner
    exact = ReadonlyScorer(
        hardness=miner.scorer.hardness,
        train_mode=miner.scorer.train_mode,
        chunk_size=miner.scorer.chunk_size,
    )
    seed = 1000 + iteration
    reference = hard_sets(approx_model, exact, features, labelled, seed)
    approx = hard_sets(approx_model, miner.scorer, features, labelled, seed)
    other_dropout = hard_sets(approx_model, exact, features, labelled, seed + 500)
    eval_scorers = [copy.copy(exact), copy.copy(miner.scorer)]
    for s in eval_scorers:
        s.train_mode = False
    eval_ref, eval_approx = (
        hard_sets(approx_model, s, features, labelled, 0) for s in eval_scorers
    )
    return {
        "approx_overlap": overlap(reference, approx),
        "approx_overlap_no_dropout": overlap(eval_ref, eval_approx),
        "exact_overlap_other_dropout": overlap(reference, other_dropout),
    }


def _reset_peak(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        # Resets the process's peak RSS (VmHWM), Linux >= 4.0.
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_memory(args, variant):
    """Peak memory of the second training iteration (the optimizer's momentum buffers exist
    from the first step on): resident model, optimizer state, activations and temporaries;
    not the interpreter's import or the model's construction. Also the peak of its forward
    and backward alone (before the optimizer step)."""
    cfg = build_cfg(args.arch, variant, args)
    inputs = synthetic_batch(cfg, args)
    model, optimizer = build(cfg, inputs)
    # The first step only creates the optimizer state: few proposals make it quick.
    warm_args = copy.copy(args)
    warm_args.proposals = min(args.proposals, 256)
    with EventStorage(0) as storage:
        train_step(model, optimizer, synthetic_batch(cfg, warm_args), args.device)
        storage.step()
        before_reset = _peak_mb(args.device)  # construction and the first step
        _reset_peak(args.device)
        start = time.perf_counter()
        loss = sum(model(inputs).values())
        optimizer.zero_grad()
        loss.backward()
        sync(args.device)
        fwd_bwd = _peak_mb(args.device)
        optimizer.step()
        sync(args.device)
        iter_s = time.perf_counter() - start
    peak = _peak_mb(args.device)
    # Not ru_maxrss: a child inherits its parent's peak RSS through fork and exec.
    peak_process = max(before_reset, peak)
    out = {"peak_mb": round(peak, 1), "fwd_bwd_peak_mb": round(fwd_bwd, 1)}
    out["iter_s"] = round(iter_s, 3)
    out["process_peak_mb"] = round(peak_process, 1)
    return out


def profile_table(args, variant):
    """torch.profiler table of one training iteration (after one warm-up), as text."""
    from torch.profiler import ProfilerActivity, profile

    cfg = build_cfg(args.arch, variant, args)
    inputs = synthetic_batch(cfg, args)
    model, optimizer = build(cfg, inputs)
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with EventStorage(0):
        train_step(model, optimizer, inputs, args.device)
        with profile(activities=activities) as prof:
            train_step(model, optimizer, inputs, args.device)
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows)


def compare(args):
    """FRCN, OHEM (and with ``--approx-mode`` the approximate OHEM) trained on one batch,
    interleaved ABBA: medians and every time, readonly and selection times, hard-set
    overlaps. Prints one line per iteration."""
    variants = ["frcn", "ohem"] + (["approx"] if args.approx_mode else [])
    cfgs = {v: build_cfg(args.arch, v, args) for v in variants}
    inputs = synthetic_batch(cfgs["frcn"], args)
    models = {v: build(cfgs[v], inputs) for v in variants}
    state = models["frcn"][0].state_dict()
    for v in variants[1:]:
        models[v][0].load_state_dict(state)
    ohem = models["ohem"][0]
    timers = {}
    for v in variants[1:]:
        heads = models[v][0].roi_heads
        timers[v] = heads.miner = TimedMiner(heads.miner, args.device)
    in_step = {v: [] for v in timers}
    times = {v: [] for v in variants}
    readonly, selection, overlaps, approx_readonly = [], [], [], []
    with EventStorage(0) as storage:
        features, labelled = readonly_inputs(ohem, inputs)
        for it in range(args.warmup + args.iters):
            order = variants if it % 2 == 0 else variants[::-1]
            for timer in timers.values():
                timer.seconds = 0.0
            step_times = {v: train_step(*models[v], inputs, args.device) for v in order}
            r, s = (
                (0.0, 0.0)
                if args.no_mining_timing
                else time_mining(ohem, features, labelled, args.device)
            )
            if args.approx_mode and not args.no_mining_timing:
                approx_readonly.append(
                    time_mining(models["approx"][0], features, labelled, args.device)[0]
                )
            storage.step()
            print(f"iter {it}: {step_times} readonly {r:.3f} selection {s:.4f}", flush=True)
            if it < args.warmup:
                continue
            for v in variants:
                times[v].append(step_times[v])
            for v, timer in timers.items():
                in_step[v].append(timer.seconds)
            readonly.append(r)
            selection.append(s)
            if args.approx_mode and len(overlaps) < args.overlap_iters:
                overlaps.append(measure_overlaps(models["approx"][0], features, labelled, it))

    med = {v: statistics.median(t) for v, t in times.items()}
    result = {
        "arch": args.arch,
        "device": args.device,
        "allocator": allocator_in_use(),
        "torch_threads": torch.get_num_threads(),
        "image_size": [args.image_size, int(round(args.image_size * args.aspect))],
        "images": args.images,
        "proposals_per_image": args.proposals,
        "rois_scored_per_image": statistics.mean(len(p) for p in labelled),
        "iters": args.iters,
        "warmup": args.warmup,
        "frcn_s_per_iter": round(med["frcn"], 4),
        "ohem_s_per_iter": round(med["ohem"], 4),
        "ratio": round(med["ohem"] / med["frcn"], 4),
        "readonly_s": round(statistics.median(readonly), 4),
        "selection_s": round(statistics.median(selection), 4),
        "extra_over_readonly": round(
            (med["ohem"] - med["frcn"]) / max(statistics.median(readonly), 1e-9), 4
        ),
        "selection_fraction": round(statistics.median(selection) / med["ohem"], 5),
        # The miner's calls inside OHEM's training steps (readonly pass and selection there).
        "in_step_mining_s": round(statistics.median(in_step["ohem"]), 4),
        "extra_over_in_step_mining": round(
            (med["ohem"] - med["frcn"]) / max(statistics.median(in_step["ohem"]), 1e-9), 4
        ),
        "frcn_times": [round(t, 3) for t in times["frcn"]],
        "ohem_times": [round(t, 3) for t in times["ohem"]],
    }
    if args.approx_mode:
        approx = models["approx"][0].roi_heads.miner.scorer.approximation
        result.update(
            {
                "approx_mode": args.approx_mode,
                "approx_rank": cfgs["approx"].MODEL.ROI_HEADS.OHEM.FAST_READONLY.RANK,
                "approx_s_per_iter": round(med["approx"], 4),
                "approx_ratio": round(med["approx"] / med["frcn"], 4),
                "approx_times": [round(t, 3) for t in times["approx"]],
                "approx_refresh_s": round(approx.last_refresh_s, 3),
                "approx_readonly_s": round(statistics.median(approx_readonly or [0.0]), 4),
                "approx_in_step_mining_s": round(statistics.median(in_step["approx"]), 4),
            }
        )
        for key in overlaps[0] if overlaps else []:
            result[key] = round(statistics.mean(o[key] for o in overlaps), 4)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--arch", choices=sorted(ARCHS), default="vgg16")
    p.add_argument("--image-size", type=int, default=600, help="short side, pixels")
    p.add_argument("--aspect", type=float, default=4 / 3, help="width / height")
    p.add_argument("--images", type=int, default=2, help="images per iteration (N)")
    p.add_argument("--proposals", type=int, default=2000, help="proposals per image")
    p.add_argument("--iters", type=int, default=5, help="timed iterations of each model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chunk-size", type=int, default=None, help="READONLY_CHUNK_SIZE override")
    p.add_argument(
        "--approx-mode", default="", help="also time OHEM with FAST_READONLY.MODE (e.g. lowrank)"
    )
    p.add_argument("--approx-rank", type=int, default=None, help="FAST_READONLY.RANK override")
    p.add_argument("--overlap-iters", type=int, default=2, help="iterations measuring overlap")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory processes")
    p.add_argument(
        "--no-mining-timing", action="store_true", help="skip readonly_s and selection_s"
    )
    p.add_argument("--profile", choices=["frcn", "ohem", "approx"], default=None)
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument(
        "--allocator", choices=ALLOCATORS, default="auto", help="as train_net.py's --allocator"
    )
    p.add_argument(
        "--memory-worker", choices=["frcn", "ohem"], default=None, help=argparse.SUPPRESS
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    return p.parse_args(argv)
