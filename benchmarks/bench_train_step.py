"""Time and measure full training iterations of FRCN and OHEM side by side.

Both models are built from the project's configs (the shipped code), share one state dict and
train on the same synthetic images, ground truth and proposals; their iterations are
interleaved (ABBA order) after warm-up and the medians are reported. Peak memory is measured
in a separate process per model. Prints one JSON line.

    python -m benchmarks.bench_train_step --arch vgg16 --image-size 600 --images 2 \\
        --proposals 2000 --iters 5 --json

This is a benchmark, not a test: it asserts nothing about time. The measurements are in
``train_step_lib.py``.
"""

import contextlib
import json
import os
import subprocess
import sys

from benchmarks.train_step_lib import compare, measure_memory, parse_args, profile_table
from ohem_d2.engine.allocator import allocator_in_use, relaunch_with_allocator


def peak_memory_mb(args, variant):
    """Peak memory of ``variant``'s training iteration, in a fresh process (--memory-worker)."""
    # Before the config overrides, which take the rest of the command line.
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_train_step",
        "--memory-worker",
        variant,
        *sys.argv[1:],
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_results(args):
    """Peak memory of FRCN and OHEM, each in its own process."""
    result = {
        "arch": args.arch,
        "device": args.device,
        "allocator": allocator_in_use(),
        "proposals_per_image": args.proposals,
    }
    for v in ("frcn", "ohem"):
        mem = peak_memory_mb(args, v)
        result[f"{v}_peak_mb"] = mem["peak_mb"]
        result[f"{v}_fwd_bwd_peak_mb"] = mem["fwd_bwd_peak_mb"]
        result[f"{v}_process_peak_mb"] = mem["process_peak_mb"]
        # One iteration, not interleaved: for the scaling table, not for the ratio targets.
        result[f"{v}_memory_worker_iter_s"] = mem["iter_s"]
    result["memory_ratio"] = round(result["ohem_peak_mb"] / result["frcn_peak_mb"], 4)
    return result


def main():
    args = parse_args()
    relaunch_with_allocator(args.allocator)  # the memory workers inherit it
    if args.memory_worker:
        print(json.dumps(measure_memory(args, args.memory_worker)))
        return
    if args.profile:
        print(profile_table(args, args.profile))
        return
    with contextlib.redirect_stdout(sys.stderr):
        if args.memory_only:
            result = memory_results(args)
        else:
            result = compare(args)
            if not args.no_memory:
                result.update(memory_results(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
