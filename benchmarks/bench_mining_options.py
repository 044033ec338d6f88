"""What the options against unlabelled objects cost, as a share of an iteration.

    python -m benchmarks.bench_mining_options --iters 10 --repeats 20

Builds the demo's OHEM model (configs/bccd/ohem.yaml, the demo's schedule settings) and two
BCCD training images mapped as in training (their shipped selective-search proposals). In one
process it times (1) full training iterations of paper OHEM (forward, backward, SGD step),
and (2) ``HardExampleMiner.select`` (per-RoI losses, suspects, ranking, NMS, top-k, gathering,
every diagnostic) on the same readonly predictions with each option set, interleaved round
by round. Prints a Markdown table: median select time and its share of the median
iteration, and the option's extra time over paper OHEM's select. Not a test: asserts nothing.
"""

import argparse
import statistics
import time

import torch
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage
from tabulate import tabulate

from ohem_d2.demo import build_demo_cfg
from ohem_d2.engine import Trainer, register_project_datasets
from ohem_d2.engine.allocator import allocator_in_use, relaunch_with_allocator
from ohem_d2.engine.loaders import dataset_dicts_with_proposals, proposal_mapper
from ohem_d2.modeling.ohem import (
    HardExampleMiner,
    readonly_head,
)

K = "MODEL.ROI_HEADS.OHEM."
# The settings measured by the demo's variant table, then all three together.
SETTINGS = {
    "paper": [],
    "suspect excluded (weight 0)": [K + "SUSPECT_BG_WEIGHT", 0.0],
    "suspect down-weighted (0.5)": [K + "SUSPECT_BG_WEIGHT", 0.5],
    "trim 0.1": [K + "TRIM_BG_FRACTION", 0.1],
    "easy bg 0.25": [K + "EASY_BG_FRACTION", 0.25],
    "all three": [
        *(K + "SUSPECT_BG_WEIGHT", 0.5),
        *(K + "TRIM_BG_FRACTION", 0.1),
        *(K + "EASY_BG_FRACTION", 0.25),
    ],
}


DIAGNOSTICS = "finding the suspects alone (part of every row)"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=10, help="timed training iterations")
    parser.add_argument("--repeats", type=int, default=20, help="timed select rounds")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    register_project_datasets()
    cfg = build_demo_cfg("bccd", "ohem", "/tmp/bench_mining_options", 450, 0, args.device)
    dicts = dataset_dicts_with_proposals(
        cfg.DATASETS.TRAIN, cfg.DATASETS.PROPOSAL_FILES_TRAIN, filter_empty=True, trusted=False
    )
    mapper = proposal_mapper(cfg, True)
    inputs = [mapper(d) for d in dicts[:2]]
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)

    with EventStorage():
        step_times = []
        for i in range(args.iters + 1):
            start = time.perf_counter()
            loss = sum(model(inputs).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i:  # the first iteration warms up
                step_times.append(time.perf_counter() - start)

        with torch.no_grad():
            head = model.roi_heads
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            targets = [x["instances"].to(model.device) for x in inputs]
            labelled = head.label_proposals(model.select_proposals(inputs), targets)
            feats = [features[f] for f in head.in_features]
            network = readonly_head(head)
            predictions = head.miner.scorer.predict(
                feats, labelled, box_forward=network, readonly_modules=network.modules
            )
            miners = {}
            for name, opts in SETTINGS.items():
                c = cfg.clone()
                c.defrost()
                c.merge_from_list(opts)
                miners[name] = HardExampleMiner(c)
            times = {name: [] for name in [*SETTINGS, DIAGNOSTICS]}
            for _ in range(args.repeats + 1):
                for name, miner in miners.items():
                    start = time.perf_counter()
                    miner.select(labelled, predictions, head.box_predictor)
                    times[name].append(time.perf_counter() - start)
                # The suspects alone (found whatever the options, for the diagnostics).
                start = time.perf_counter()
                miners["paper"].suspect_background(labelled, predictions, head.box_predictor)
                times[DIAGNOSTICS].append(time.perf_counter() - start)
    step = statistics.median(step_times)
    paper = statistics.median(times["paper"][1:])
    num_rois = sum(len(p) for p in labelled)
    print(
        f"Paper OHEM training iteration (2 BCCD images, {num_rois} labelled RoIs): median "
        f"{step:.3f} s over {args.iters}; select() medians over {args.repeats} interleaved "
        f"rounds; torch threads {torch.get_num_threads()}; allocator {allocator_in_use()}.\n"
    )
    rows = []
    for name in times:
        t = statistics.median(times[name][1:])
        extra = "-" if name == DIAGNOSTICS else f"{100 * (t - paper) / step:+.2f} %"
        rows.append([name, f"{t * 1e3:.2f}", f"{100 * t / step:.2f} %", extra])
    headers = ["setting", "select (ms)", "share of the iteration", "extra over paper select"]
    print(tabulate(rows, headers, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    relaunch_with_allocator("auto")
    main()
