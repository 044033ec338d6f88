#!/usr/bin/env python
"""Median seconds per training iteration of a toy config on the toy dataset.

    .venv/bin/python -m benchmarks.bench_toy_step --config configs/toy/ohem.yaml --iters 30

Builds the model, optimizer and proposal-aware train loader with the project's Trainer
classmethods and times forward + backward + SGD step (data loading excluded). Used to
measure environment settings such as MALLOC_MMAP_THRESHOLD_ (benchmarks/soak.md).
"""

import argparse
import json
import os
import statistics
import time

import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

import ohem_d2
from ohem_d2.engine import Trainer, prepare_toy_dataset, register_project_datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/toy/ohem.yaml")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args(argv)
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, args.config))
    prepare_toy_dataset(cfg)
    register_project_datasets()
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    loader = iter(Trainer.build_train_loader(cfg))
    times = []
    with EventStorage() as storage:
        for _ in range(args.iters):
            batch = next(loader)
            start = time.perf_counter()
            losses = model(batch)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
            storage.step()
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))
    }
    print(json.dumps({"config": args.config, "env": env, "s_per_iter": statistics.median(times)}))


if __name__ == "__main__":
    main()
