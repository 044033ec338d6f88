#!/usr/bin/env python
"""Soak: resident memory over a long single-process training run of the narrow toy model.

    .venv/bin/python -m benchmarks.bench_soak --iters 300 --config configs/toy/ohem.yaml

Runs on the allocator train_net.py would use (``--allocator``, default auto: jemalloc when
found). Trains with the project's Trainer (data loader, OHEM head, hooks, writers, checkpoints as
configured), samples the process's RSS after every iteration and prints one JSON object:
RSS at the reference iteration (default 50, after warm-up: allocator pools, data loader
buffers) and at the end, the growth between them in percent, and whether it is within
``--max-growth`` percent. The toy dataset is generated under ``--datasets`` if absent.
The JSON object is the last thing on stdout (after Detectron2's log). Results and the exact
command: benchmarks/soak.md.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import psutil
import torch
from detectron2.config import get_cfg
from detectron2.engine import HookBase

import ohem_d2
from ohem_d2.data.toy import (
    register_toy_dataset,
    toy_proposal_file,
)
from ohem_d2.engine import Trainer
from ohem_d2.engine.allocator import (
    ALLOCATORS,
    allocator_in_use,
    relaunch_with_allocator,
)
from ohem_d2.proposals.toy import generate_toy_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RSSSampler(HookBase):
    """Resident set size of this process (bytes) after every iteration."""

    def __init__(self):
        self.process = psutil.Process()
        self.samples = []

    def after_step(self):
        self.samples.append(self.process.memory_info().rss)


class SoakTrainer(Trainer):
    def build_hooks(self):
        hooks = super().build_hooks()
        self.rss = RSSSampler()
        return [*hooks, self.rss]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/toy/ohem.yaml")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--reference-iter", type=int, default=50)
    parser.add_argument("--max-growth", type=float, default=10.0, help="percent")
    parser.add_argument("--datasets", default=os.path.join(REPO, "datasets"))
    parser.add_argument("--num-trainval", type=int, default=144)
    parser.add_argument(
        "--allocator", choices=ALLOCATORS, default="auto", help="as train_net.py's --allocator"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)
    relaunch_with_allocator(args.allocator)
    warnings.filterwarnings("ignore")

    root = os.path.join(args.datasets, "ohem_toy")
    if not os.path.exists(toy_proposal_file(root, "trainval")):
        generate_toy_dataset(root, num_trainval=args.num_trainval, num_test=12)
    register_toy_dataset(root)

    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, args.config))
    out = tempfile.mkdtemp(prefix="soak_")
    cfg.merge_from_list(
        [
            "DATASETS.PROPOSAL_FILES_TRAIN", (toy_proposal_file(root, "trainval"),),
            "DATASETS.TEST", (), "DATASETS.PROPOSAL_FILES_TEST", (),
            "SOLVER.MAX_ITER", args.iters,
            "OUTPUT_DIR", out,
            *args.opts,
        ]
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = SoakTrainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    mb = [s / 2**20 for s in trainer.rss.samples]
    ref, end = mb[args.reference_iter - 1], mb[-1]
    growth = 100.0 * (end - ref) / ref
    print(
        json.dumps(
            {
                "config": args.config,
                "allocator": allocator_in_use(),
                "malloc_env": {
                    k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_"))
                },
                "iterations": len(mb),
                "rss_mb_at_1": round(mb[0], 1),
                f"rss_mb_at_{args.reference_iter}": round(ref, 1),
                f"rss_mb_at_{len(mb)}": round(end, 1),
                "rss_mb_max_after_reference": round(max(mb[args.reference_iter - 1 :]), 1),
                "growth_percent": round(growth, 2),
                "rss_mb_every_25": [round(x, 1) for x in mb[24::25]],
                "max_growth_percent": args.max_growth,
                "ok": growth <= args.max_growth,
                "seconds_per_iter": round(seconds / len(mb), 3),
                "torch_threads": torch.get_num_threads(),
                "output_dir": out,
            },
            indent=1,
        )
    )
    return 0 if growth <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
