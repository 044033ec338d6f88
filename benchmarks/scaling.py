"""Scaling of FRCN and OHEM with the number of proposals per image: s/iter and peak memory.

Runs ``bench_train_step.py`` once per proposal count (each in its own process) and prints a
markdown table; the raw JSON lines go to ``--out``.

    python -m benchmarks.scaling --arch vgg16 --proposals 500 2000 5000 20000 \\
        --iters 1 --out benchmarks/results/scaling_vgg16.jsonl
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--image-size", type=int, default=600)
    p.add_argument("--proposals", type=int, nargs="+", default=[500, 2000, 5000, 20000])
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args, extra = p.parse_known_args()

    rows = []
    for n in args.proposals:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_train_step",
            f"--arch={args.arch}",
            f"--image-size={args.image_size}",
            f"--proposals={n}",
            f"--iters={args.iters}",
            f"--warmup={args.warmup}",
            "--no-mining-timing",
            "--json",
            *(["--memory-only"] if args.memory_only else []),
            *extra,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)

    # With --memory-only, s/iter is the single measured iteration of each memory process.
    table = []
    for r in rows:
        frcn = r.get("frcn_s_per_iter", r["frcn_memory_worker_iter_s"])
        ohem = r.get("ohem_s_per_iter", r["ohem_memory_worker_iter_s"])
        cells = [
            r["proposals_per_image"],
            frcn,
            ohem,
            round(ohem / frcn, 3),
            r["frcn_peak_mb"],
            r["ohem_peak_mb"],
        ]
        table.append(cells)
    headers = ["proposals/image", "FRCN s/iter", "OHEM s/iter", "ratio"]
    headers += ["FRCN peak MB", "OHEM peak MB"]
    print(tabulate(table, headers, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
