#!/usr/bin/env python
"""Hard-set overlap and speed of the low-rank readonly pass for several RANK / NUM_LAYERS.

    .venv/bin/python -m benchmarks.lowrank_sweep --specs 512:0 512:1 256:1 128:1

Each spec is RANK:NUM_LAYERS (NUM_LAYERS 0: every layer a factorisation makes cheaper; 1:
fc6 only). On VGG16 at 600 x 800, N = 2, 2000 proposals per image (bench_train_step.py's
batch and model), it times one approximate readonly pass plus selection after the
calibrating pass, and compares its hard sets with the exact pass's under the same dropout
masks, for two mask seeds. Prints one JSON line per spec. A benchmark, not a test.
"""

import argparse
import json
import statistics
import time

from detectron2.utils.events import EventStorage

import benchmarks.train_step_lib as bench
from ohem_d2.engine.allocator import (
    ALLOCATORS,
    allocator_in_use,
    relaunch_with_allocator,
)
from ohem_d2.modeling.ohem import LowRankReadonly, ReadonlyScorer

SEEDS = (1, 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", nargs="+", default=["512:0", "512:1", "256:1", "128:1"])
    p.add_argument("--arch", default="vgg16", choices=sorted(bench.ARCHS))
    p.add_argument("--allocator", default="auto", choices=ALLOCATORS)
    args = p.parse_args(argv)
    relaunch_with_allocator(args.allocator)
    bench_args = bench.parse_args(["--arch", args.arch])
    cfg = bench.build_cfg(args.arch, "ohem", bench_args)
    inputs = bench.synthetic_batch(cfg, bench_args)
    model, _ = bench.build(cfg, inputs)
    with EventStorage(0):
        features, labelled = bench.readonly_inputs(model, inputs)
        scorer = model.roi_heads.miner.scorer
        exact = ReadonlyScorer(hardness=scorer.hardness, chunk_size=scorer.chunk_size)
        start = time.perf_counter()
        reference = {s: bench.hard_sets(model, exact, features, labelled, s) for s in SEEDS}
        exact_s = (time.perf_counter() - start) / len(SEEDS)
        for spec in args.specs:
            rank, num_layers = map(int, spec.split(":"))
            approx = ReadonlyScorer(
                hardness=scorer.hardness,
                chunk_size=scorer.chunk_size,
                approximation=LowRankReadonly(
                    rank=rank, refresh_period=1000, num_layers=num_layers
                ),
            )
            bench.hard_sets(model, approx, features, labelled, 0)  # the calibrating pass
            overlaps, seconds = [], []
            for s in SEEDS:
                start = time.perf_counter()
                hard = bench.hard_sets(model, approx, features, labelled, s)
                seconds.append(time.perf_counter() - start)
                overlaps.append(bench.overlap(reference[s], hard))
            result = {
                "arch": args.arch,
                "allocator": allocator_in_use(),
                "rank": rank,
                "num_layers": num_layers,
                "factorised": len(approx.approximation.layers),
                "overlap": [round(o, 4) for o in overlaps],
                "mining_s": round(statistics.median(seconds), 3),
                "exact_mining_s": round(exact_s, 3),
            }
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
