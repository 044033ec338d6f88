"""On a machine with CUDA: run and measure, in one command, everything that differs there.

    python -m benchmarks.gpu_check [--output-dir output/gpu_check] [--skip STEP ...] [--dry-run]

Each step runs as a subprocess of this interpreter, in this order (one failing step is
recorded and the next still runs); its output goes to the terminal and to
``<output-dir>/<step>.log``:

1. ``tests``: the default test suite (``python -m pytest -q -rfE tests``; the slow tests
   stay excluded) with ``OHEM_D2_TEST_DEVICE=cuda`` (tests/helpers.py), which puts the
   tests' models on the GPU: the OHEM heads, mining and scoring; the detectors the tests
   build (multi-scale testing, box regression with voting, deployment by scripting, tracing
   and ONNX, in-process training, the drop-in model-zoo runs of train_net.py) and the demo's
   training hooks. What is about the CPU stays there by design: train_net.py with several
   CPU processes (gloo) and the refusals for want of a GPU, both with the GPUs hidden from
   the subprocess (``CUDA_VISIBLE_DEVICES=``, as ``check_devices`` asks), the allocator, the
   demo's CPU defaults, the threaded CPU RoI pooling, and the runs on the toy configs' own
   ``MODEL.DEVICE cpu`` (checkpoints, resume, bad inputs, train_net.py end to end).
   Figures: pytest's counts and the ids of the failed tests.
2. ``train_step``: the VGG16 600-px training-step benchmark, FRCN vs OHEM
   (``python -m benchmarks.bench_train_step``, benchmarks/README.md's VGG16 command) with
   ``--device cuda``; its JSON line is saved as ``<output-dir>/bench_train_step_vgg16.json``.
   Figures: s/iter and peak memory (``torch.cuda.max_memory_allocated``) of each method,
   the OHEM / FRCN ratios, beside the paper's Table 2.
3. ``ddp``: the card's command, ``train_net.py --config-file configs/frcn_vgg16_ohem.yaml
   --num-gpus N`` (N = ``torch.cuda.device_count()``, NCCL; one GPU gives a single
   process) with ``MODEL.DEVICE cuda``, overridden only for its data (the toy set, generated
   on first use as ``train_net.py`` does; random initial weights) and its length (40
   iterations after Detectron2 scales the schedule to N processes), then evaluated on the
   toy test split. Figures: the processes line, the world size, the scaled batch and
   learning rate, the last logged s/iter, whether model_final.pth exists.
4. ``demo``: the demo, ``python -m ohem_d2.demo --device cuda --output-dir
   <output-dir>/demo``. Figures: mAP50, COCO AP, s/iter and peak CUDA memory of each
   method, from the summary.json it writes (if it stopped early, from those of the methods
   that finished).

Writes ``<output-dir>/gpu_check.json`` (``--json`` to choose), rewritten after each step:
{"torch", "cuda", "devices", "steps": {name: {"command", "env", "returncode", "seconds",
"log", "figures"}}} (``env``: the variables the step sets on top of this process's).
``--dry-run`` records the commands without running them (returncode null).
Exits 2 without CUDA (unless --dry-run), 1 if a step failed, else 0.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("tests", "train_step", "ddp", "demo")
NO_CUDA = "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run"

# The training-step benchmark's VGG16 command (benchmarks/README.md, "Commands").
TRAIN_STEP_MODULE = "benchmarks.bench_train_step"
TRAIN_STEP_ARGS = [
    "--arch", "vgg16", "--image-size", "600", "--images", "2", "--proposals", "2000",
    "--iters", "5", "--warmup", "1", "--approx-mode", "lowrank",
]  # fmt: skip
TRAIN_STEP_JSON = "bench_train_step_vgg16.json"

# Paper, Table 2: training cost on an Nvidia Titan X, VGG16 (* = 2 x 1 image with gradient
# accumulation, the like-for-like pair; FRCN without * takes both images in one pass).
# Its "max memory" is the whole Caffe process's; ours is torch's allocations of an iteration.
PAPER_TABLE2_VGG16 = {
    "frcn_s_per_iter": 0.60,
    "frcn_max_memory_gb": 11.2,
    "frcn_accum_s_per_iter": 0.57,
    "frcn_accum_max_memory_gb": 6.4,
    "ohem_accum_s_per_iter": 1.00,
    "ohem_accum_max_memory_gb": 8.7,
    "ratio": round(1.00 / 0.57, 4),
    "memory_ratio": round(8.7 / 6.4, 4),
}

# The variables a step's process gets on top of this one's: the tests' device switch
# (tests/helpers.py).
STEP_ENV = {"tests": {"OHEM_D2_TEST_DEVICE": "cuda"}}

# The card's command (README, train_net.py): the paper's OHEM config, its batch and schedule
# scaled to the processes by Detectron2's rule (SOLVER.REFERENCE_WORLD_SIZE 1).
CARD_CONFIG = "configs/frcn_vgg16_ohem.yaml"
DDP_ITERS = 40  # iterations after the scaling


def card_overrides(num_gpus, train_proposals, test_proposals, out, iters=DDP_ITERS):
    """The overrides of the card's command that only change its data (the toy set), its
    length (`iters` iterations on `num_gpus` processes) and where it writes."""
    from ohem_d2.data.toy import TOY_CLASS_NAMES

    return [
        "DATASETS.TRAIN", "('ohem_toy_trainval',)",
        "DATASETS.TEST", "('ohem_toy_test',)",
        "DATASETS.PROPOSAL_FILES_TRAIN", f"('{train_proposals}',)",
        "DATASETS.PROPOSAL_FILES_TEST", f"('{test_proposals}',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(len(TOY_CLASS_NAMES)),
        # No ImageNet weights are downloaded: random initialisation.
        "MODEL.WEIGHTS", "",
        "MODEL.BACKBONE.FREEZE_AT", "0",
        "SOLVER.MAX_ITER", str(iters * num_gpus),
        "OUTPUT_DIR", out,
    ]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Run and measure what differs on CUDA: the tests, the VGG16 training "
        "step FRCN vs OHEM, a DDP run over the GPUs and the demo; one JSON with every figure."
    )
    p.add_argument("--output-dir", default="output/gpu_check")
    p.add_argument(
        "--skip",
        nargs="+",
        choices=STEPS,
        default=[],
        metavar="STEP",
        help=f"steps to leave out, of: {' '.join(STEPS)}",
    )
    p.add_argument("--dry-run", action="store_true", help="record the commands, run nothing")
    p.add_argument("--json", default=None, help="default: <output-dir>/gpu_check.json")
    args = p.parse_args(argv)
    if args.json is None:
        args.json = os.path.join(args.output_dir, "gpu_check.json")
    return args


# ------------------------------------------------------------------------------ commands


def toy_proposals():
    """The toy dataset's training and test proposals where train_net.py generates that
    dataset ($DETECTRON2_DATASETS/ohem_toy, default datasets/ohem_toy)."""
    root = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "ohem_toy")
    return tuple(
        os.path.join(root, "proposals", f"ss_ohem_toy_{split}.npz")
        for split in ("trainval", "test")
    )


def commands(out, num_gpus):
    """{step: command} for the output folder `out` (absolute) and `num_gpus` processes."""
    py = sys.executable
    ddp = [py, "train_net.py", "--config-file", CARD_CONFIG, "--num-gpus", str(num_gpus)]
    ddp += [
        "MODEL.DEVICE",
        "cuda",
        *card_overrides(num_gpus, *toy_proposals(), os.path.join(out, "ddp")),
    ]
    return {
        "tests": [py, "-m", "pytest", "-q", "-rfE", "tests"],
        "train_step": [py, "-m", TRAIN_STEP_MODULE, *TRAIN_STEP_ARGS, "--device", "cuda", "--json"],
        "ddp": ddp,
        "demo": [py, "-m", "ohem_d2.demo", "--device", "cuda"]
        + ["--output-dir", os.path.join(out, "demo")],
    }


# ------------------------------------------------------------------------------- figures

_PYTEST_COUNT = re.compile(
    r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b"
)
_PYTEST_SUMMARY = re.compile(r"\bin \d+(?:\.\d+)?s\b")


def pytest_figures(output):
    """Counts from pytest's last summary line ("3 failed, 370 passed, ... in 12.3s") and
    the ids of the failed tests ("FAILED tests/x.py::test_y - ..." lines of -rfE)."""
    figures = {}
    for line in reversed(output.splitlines()):
        counts = _PYTEST_COUNT.findall(line)
        if counts and _PYTEST_SUMMARY.search(line):
            for n, what in counts:
                what = {"error": "errors", "warning": "warnings"}.get(what, what)
                figures[what] = int(n)
            break
    for key in ("passed", "failed", "skipped", "errors"):
        figures.setdefault(key, 0)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    figures["failed_tests"] = list(dict.fromkeys(failed))
    return figures


def last_json_object(output):
    """The last line of `output` that is a JSON object, or None."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def train_step_figures(result):
    """The VGG16 figures of a bench_train_step.py JSON (dict), beside the paper's."""
    if result is None:
        return {"paper_table2_vgg16_titan_x": PAPER_TABLE2_VGG16}
    keys = (
        "device", "allocator", "image_size", "proposals_per_image", "iters",
        "frcn_s_per_iter", "ohem_s_per_iter", "ratio", "readonly_s", "selection_s",
        "extra_over_readonly", "approx_s_per_iter", "approx_ratio", "approx_overlap",
        "frcn_peak_mb", "ohem_peak_mb", "memory_ratio",
        "frcn_process_peak_mb", "ohem_process_peak_mb",
    )  # fmt: skip
    figures = {k: result[k] for k in keys if k in result}
    figures["paper_table2_vgg16_titan_x"] = PAPER_TABLE2_VGG16
    return figures


def ddp_figures(output, output_dir):
    """What train_net.py said it ran and the last s/iter of its metrics.json."""
    figures = {}
    m = re.search(r"Processes on this machine: (.*)", output)
    figures["processes"] = m.group(1).strip() if m else None
    sizes = re.findall(r"World size: (\d+)", output)
    figures["world_size"] = int(sizes[-1]) if sizes else None
    # Detectron2's auto_scale_workers line: the batch and schedule it scaled to.
    m = re.search(r"Auto-scaling the config to batch_size=(\d+), learning_rate=([\d.e-]+)", output)
    figures["scaled_batch"], figures["scaled_lr"] = (
        (int(m.group(1)), float(m.group(2))) if m else (None, None)
    )
    times = []
    metrics = os.path.join(output_dir, "metrics.json")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if "time" in entry:
                        times.append((entry.get("iteration"), entry["time"]))
    figures["last_logged_iteration"], figures["s_per_iter"] = times[-1] if times else (None,) * 2
    figures["model_final"] = os.path.isfile(os.path.join(output_dir, "model_final.pth"))
    return figures


def demo_figures(demo_dir):
    """Per method (frcn, ohem, ohem_recommended) of the demo's summaries: mAP50 (VOC
    all-point and 11-point), COCO AP, s/iter, peak CUDA memory; and OHEM's s/iter over FRCN's.
    Read from each method's own summary.json, so a demo that stopped part-way still gives
    the methods that finished."""
    from ohem_d2.demo.report import read_summaries

    summaries = read_summaries(demo_dir)
    figures = {}
    for s in summaries:
        name = s["method"] + ("_recommended" if s.get("recommended") else "")
        figures[name] = {
            "device": s.get("device"),
            "iterations": s.get("iterations"),
            "mAP50": s.get("voc_AP50_allpoint"),
            "mAP50_11point": s.get("voc_AP50_11point"),
            "coco_AP": s.get("coco_AP"),
            "coco_AP50": s.get("coco_AP50"),
            "per_class_AP50": s.get("per_class_AP50_allpoint"),
            "s_per_iter": s.get("s_per_iter"),
            "peak_cuda_mb": s.get("peak_cuda_mb"),
        }
    frcn, ohem = figures.get("frcn", {}), figures.get("ohem", {})
    if frcn.get("s_per_iter") and ohem.get("s_per_iter"):
        figures["ohem_over_frcn_s_per_iter"] = round(ohem["s_per_iter"] / frcn["s_per_iter"], 4)
    return figures


def figures_of(step, output, out):
    """The figures of `step` from its combined output and the files it wrote under `out`."""
    if step == "tests":
        return pytest_figures(output)
    if step == "train_step":
        result = last_json_object(output)
        if result is not None:
            with open(os.path.join(out, TRAIN_STEP_JSON), "w") as f:
                json.dump(result, f)
        return train_step_figures(result)
    if step == "ddp":
        return ddp_figures(output, os.path.join(out, "ddp"))
    return demo_figures(os.path.join(out, "demo"))


# ----------------------------------------------------------------------------------- run


def run_step(command, log_path, env=None):
    """Run `command` from the repository with the variables `env` added to this process's,
    its output both shown and written to `log_path`; returns (returncode, seconds, output)."""
    start = time.perf_counter()
    lines = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=dict(os.environ, **(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            lines.append(line)
        returncode = proc.wait()
    return returncode, round(time.perf_counter() - start, 2), "".join(lines)


def write_json(path, record):
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(NO_CUDA, file=sys.stderr)
        return 2
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    json_dir = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(json_dir, exist_ok=True)
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": devices}
    record["steps"] = {}
    # A dry run without CUDA still writes a runnable command: one process.
    cmds = commands(out, max(len(devices), 1))
    failed = []
    for step in STEPS:
        if step in args.skip:
            continue
        env = STEP_ENV.get(step, {})
        entry = {"command": cmds[step], "env": env, "returncode": None, "seconds": None}
        entry["log"] = os.path.join(out, f"{step}.log")
        entry["figures"] = {}
        record["steps"][step] = entry
        shown = " ".join([f"{k}={v}" for k, v in env.items()] + [shlex.join(cmds[step])])
        print(f"gpu_check: {step}: {shown}", flush=True)
        if args.dry_run:
            continue
        entry["returncode"], entry["seconds"], output = run_step(cmds[step], entry["log"], env)
        try:
            entry["figures"] = figures_of(step, output, out)
        except (OSError, ValueError, KeyError, TypeError) as e:  # a step's files cut short
            entry["figures"] = {"error": f"{type(e).__name__}: {e}"}
        if entry["returncode"] != 0:
            failed.append(step)
        print(f"gpu_check: {step}: exit {entry['returncode']}, {entry['seconds']} s", flush=True)
        write_json(args.json, record)
    write_json(args.json, record)
    print(f"gpu_check: written {args.json}" + (f"; failed: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
