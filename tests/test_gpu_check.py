"""benchmarks.gpu_check: its arguments, its refusal without CUDA, a dry run's JSON, and the
parsers of each step's figures on outputs written by hand in the real formats."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, toy_overrides

from benchmarks import gpu_check

NO_CUDA = "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run"


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *map(str, args)],
        cwd=REPO,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_arguments_defaults_and_skip():
    args = gpu_check.parse_args([])
    assert args.output_dir == "output/gpu_check"
    assert args.skip == [] and args.dry_run is False
    assert args.json == os.path.join("output/gpu_check", "gpu_check.json")
    args = gpu_check.parse_args(["--output-dir", "o", "--skip", "ddp", "demo", "--dry-run"])
    assert args.skip == ["ddp", "demo"] and args.dry_run is True
    assert args.json == os.path.join("o", "gpu_check.json")
    assert gpu_check.parse_args(["--json", "x.json"]).json == "x.json"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--skip", "nothing"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_says_so_and_runs_nothing(tmp_path):
    result = _run("--output-dir", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert NO_CUDA in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_dry_run_records_the_four_commands(tmp_path):
    out = tmp_path / "out"
    result = _run("--output-dir", out, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "gpu_check.json") as f:
        record = json.load(f)
    assert {"torch", "cuda", "devices", "steps"} <= set(record)
    assert record["torch"] == torch.__version__
    steps = record["steps"]
    assert list(steps) == ["tests", "train_step", "ddp", "demo"]
    for name, step in steps.items():
        assert step["returncode"] is None and step["seconds"] is None, name
        assert step["command"][0] == sys.executable, name
        assert step["figures"] == {}, name
        if name != "tests":
            assert step["env"] == {}, name

    tests = steps["tests"]["command"]
    assert tests[1:3] == ["-m", "pytest"] and tests[-1] == "tests"
    # The tests' models on the GPU (tests/helpers.py: DEVICE).
    assert steps["tests"]["env"] == {"OHEM_D2_TEST_DEVICE": "cuda"}
    assert "gpu_check: tests: OHEM_D2_TEST_DEVICE=cuda " in result.stdout

    bench = steps["train_step"]["command"]
    assert bench[1:3] == ["-m", "benchmarks.bench_train_step"]
    for flag, value in [("--arch", "vgg16"), ("--image-size", "600"), ("--device", "cuda")]:
        assert bench[bench.index(flag) + 1] == value
    assert "--json" in bench

    ddp = steps["ddp"]["command"]
    assert ddp[1] == "train_net.py"
    num_gpus = int(ddp[ddp.index("--num-gpus") + 1])
    assert num_gpus == max(torch.cuda.device_count(), 1)
    assert ddp[ddp.index("MODEL.DEVICE") + 1] == "cuda"
    # The card's command, its schedule 40 iterations once scaled to the processes.
    assert ddp[ddp.index("--config-file") + 1] == "configs/frcn_vgg16_ohem.yaml"
    assert int(ddp[ddp.index("SOLVER.MAX_ITER") + 1]) == 40 * num_gpus
    assert "SOLVER.IMS_PER_BATCH" not in ddp
    assert ddp[ddp.index("OUTPUT_DIR") + 1] == str(out / "ddp")

    demo = steps["demo"]["command"]
    assert demo[1:3] == ["-m", "ohem_d2.demo"]
    assert demo[demo.index("--device") + 1] == "cuda"
    assert demo[demo.index("--output-dir") + 1] == str(out / "demo")


def test_a_step_runs_with_its_variables_added(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_INHERITED", "yes")
    code = "import os; print(os.environ['OHEM_D2_TEST_DEVICE'], os.environ['GPU_CHECK_INHERITED'])"
    log = tmp_path / "step.log"
    env = gpu_check.STEP_ENV["tests"]
    returncode, _, output = gpu_check.run_step([sys.executable, "-c", code], str(log), env)
    assert returncode == 0 and output.split() == ["cuda", "yes"]
    assert log.read_text() == output


def test_dry_run_skip_and_json_path(tmp_path, capsys):
    path = tmp_path / "elsewhere" / "check.json"
    args = ["--output-dir", tmp_path / "out", "--dry-run", "--skip", "tests", "demo"]
    assert gpu_check.main([*map(str, args), "--json", str(path)]) == 0
    with open(path) as f:
        assert list(json.load(f)["steps"]) == ["train_step", "ddp"]
    assert "gpu_check: ddp: " in capsys.readouterr().out


def test_ddp_reads_the_proposals_train_net_generates(monkeypatch, tmp_path):
    for root in (None, str(tmp_path)):
        if root is None:
            monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
        else:
            monkeypatch.setenv("DETECTRON2_DATASETS", root)
        # The project's own file name for the default toy dataset (root None).
        expected = toy_overrides(None)[1::2]
        assert [f"('{p}',)" for p in gpu_check.toy_proposals()] == expected


def test_pytest_figures():
    output = "\n".join(
        [
            "....F..s.. [100%]",
            "=========================== short test summary info ============================",
            "FAILED tests/test_train_net.py::test_ddp_two_processes_on_cpu[ohem.yaml] - Asse...",
            "ERROR tests/test_x.py::test_y - RuntimeError: boom",
            "2 failed, 370 passed, 5 skipped, 1 deselected, 1 error, 12 warnings in 901.32s "
            "(0:15:01)",
        ]
    )
    figures = gpu_check.pytest_figures(output)
    assert figures["passed"] == 370 and figures["failed"] == 2 and figures["skipped"] == 5
    assert figures["deselected"] == 1 and figures["errors"] == 1 and figures["warnings"] == 12
    assert figures["failed_tests"] == [
        "tests/test_train_net.py::test_ddp_two_processes_on_cpu[ohem.yaml]",
        "tests/test_x.py::test_y",
    ]
    # Without -q: the decorated line; counts not printed are 0.
    figures = gpu_check.pytest_figures("===== 12 passed in 3.10s =====\n")
    assert figures["passed"] == 12 and figures["failed"] == 0 and figures["errors"] == 0
    assert figures["failed_tests"] == []


# One JSON line as bench_train_step.py --json prints it (keys of train_step_lib.compare and
# bench_train_step.memory_results), with CUDA-like values.
BENCH_RESULT = {
    "arch": "vgg16", "device": "cuda", "allocator": "jemalloc", "torch_threads": 8,
    "image_size": [600, 800], "images": 2, "proposals_per_image": 2000,
    "rois_scored_per_image": 2003, "iters": 5, "warmup": 1,
    "frcn_s_per_iter": 0.2512, "ohem_s_per_iter": 0.4021, "ratio": 1.6007,
    "readonly_s": 0.1402, "selection_s": 0.0101, "extra_over_readonly": 1.0763,
    "selection_fraction": 0.02512, "in_step_mining_s": 0.1498, "extra_over_in_step_mining": 1.0,
    "frcn_times": [0.251, 0.25, 0.252, 0.251, 0.26], "ohem_times": [0.402, 0.4, 0.41, 0.402, 0.39],
    "approx_mode": "lowrank", "approx_rank": 256, "approx_s_per_iter": 0.3012,
    "approx_ratio": 1.199, "approx_times": [0.3, 0.301, 0.302, 0.31, 0.29],
    "approx_refresh_s": 0.05, "approx_readonly_s": 0.04, "approx_in_step_mining_s": 0.045,
    "approx_overlap": 0.95, "approx_overlap_no_dropout": 0.96, "exact_overlap_other_dropout": 0.6,
    "frcn_peak_mb": 5120.5, "frcn_fwd_bwd_peak_mb": 5000.0, "frcn_process_peak_mb": 5200.0,
    "frcn_memory_worker_iter_s": 0.26, "ohem_peak_mb": 5300.25, "ohem_fwd_bwd_peak_mb": 5200.0,
    "ohem_process_peak_mb": 5400.0, "ohem_memory_worker_iter_s": 0.41, "memory_ratio": 1.0351,
}  # fmt: skip


def test_bench_result_is_in_the_real_format():
    # The same keys as a stored run of the VGG16 command (benchmarks/results/).
    with open(os.path.join(REPO, "benchmarks", "results", "vgg16_600_p2000.json")) as f:
        assert set(json.load(f)) == set(BENCH_RESULT)


def test_train_step_figures(tmp_path):
    # The benchmark's progress goes to stderr, merged before its JSON line.
    output = "building models\n{not json\n" + json.dumps(BENCH_RESULT) + "\n"
    result = gpu_check.last_json_object(output)
    assert result == BENCH_RESULT
    assert gpu_check.last_json_object("no json here\n") is None
    figures = gpu_check.train_step_figures(result)
    assert figures["device"] == "cuda"
    assert figures["frcn_s_per_iter"] == 0.2512 and figures["ohem_s_per_iter"] == 0.4021
    assert figures["ratio"] == 1.6007
    assert figures["frcn_peak_mb"] == 5120.5 and figures["ohem_peak_mb"] == 5300.25
    assert figures["memory_ratio"] == 1.0351
    assert figures["approx_ratio"] == 1.199
    paper = figures["paper_table2_vgg16_titan_x"]
    assert paper["frcn_accum_s_per_iter"] == 0.57 and paper["ohem_accum_s_per_iter"] == 1.00
    assert paper["frcn_accum_max_memory_gb"] == 6.4 and paper["ohem_accum_max_memory_gb"] == 8.7
    assert paper["ratio"] == pytest.approx(1.75, abs=0.01)
    assert paper["memory_ratio"] == pytest.approx(1.36, abs=0.01)
    # A failed benchmark still records the paper's figures; the step writes the JSON line.
    assert set(gpu_check.train_step_figures(None)) == {"paper_table2_vgg16_titan_x"}
    gpu_check.figures_of("train_step", output, str(tmp_path))
    with open(tmp_path / gpu_check.TRAIN_STEP_JSON) as f:
        assert json.load(f) == BENCH_RESULT


def test_ddp_figures(tmp_path):
    output = (
        "Processes on this machine: 2 CUDA process(es) (nccl)\n"
        "[12/06 10:00:00 detectron2]: Rank of current process: 0. World size: 2\n"
        "[12/06 10:00:01 d2.engine.defaults]: Auto-scaling the config to batch_size=4, "
        "learning_rate=0.002, max_iter=40, warmup=0.\n"
    )
    metrics = [
        {"data_time": 0.01, "iteration": 19, "time": 0.31, "total_loss": 1.2},
        {"data_time": 0.01, "iteration": 39, "time": 0.12, "total_loss": 0.9},
    ]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (tmp_path / "model_final.pth").write_bytes(b"")
    figures = gpu_check.ddp_figures(output, str(tmp_path))
    assert figures == {
        "processes": "2 CUDA process(es) (nccl)",
        "world_size": 2,
        "scaled_batch": 4,
        "scaled_lr": 0.002,
        "last_logged_iteration": 39,
        "s_per_iter": 0.12,
        "model_final": True,
    }
    figures = gpu_check.ddp_figures("ERROR: something\n", str(tmp_path / "none"))
    assert figures["processes"] is None and figures["s_per_iter"] is None
    assert figures["model_final"] is False


def _demo_summary(method, ap50, coco_ap, s_per_iter, **extra):
    return {
        "dataset": "bccd", "method": method, "iterations": 450, "seed": 0, "ohem_opts": [],
        "opts": [], "train_datasets": ["bccd_trainval"], "test_datasets": ["bccd_test"],
        "device": "cuda", "init_weights_sha256": "5b489c7b66badad5",
        "voc_AP50_11point": ap50 - 0.5, "voc_AP50_allpoint": ap50,
        "per_class_AP50_allpoint": {"RBC": 60.0, "WBC": 98.0, "Platelets": 50.0},
        "coco_AP": coco_ap, "coco_AP50": ap50 - 0.1, "coco_AP75": 27.0,
        "mean_detections_per_image": 99.0, "median_lowest_kept_score": 0.07,
        "final_roi_loss": {"mean_roi_loss": 0.3, "fg_part": 0.2, "bg_part": 0.1,
                           "fg_fraction": 0.09},
        "s_per_iter": s_per_iter, "peak_rss_mb": 1700.0, "peak_cuda_mb": 900.5,
        "allocator": "jemalloc", **extra,
    }  # fmt: skip


def test_demo_figures(tmp_path):
    frcn = _demo_summary("frcn", 69.4, 31.6, 0.08)
    ohem = _demo_summary("ohem", 73.2, 33.0, 0.12)
    recommended = _demo_summary("ohem", 73.9, 33.6, 0.12, recommended=True, inference_opts=[])
    # As the demo writes them: one per method's folder, then all in <output-dir>/summary.json.
    for folder, summary in [("frcn", frcn), ("ohem", ohem), ("ohem_recommended", recommended)]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "summary.json").write_text(json.dumps(summary, indent=1))
    (tmp_path / "summary.json").write_text(json.dumps([frcn, ohem, recommended], indent=1))
    figures = gpu_check.demo_figures(str(tmp_path))
    assert set(figures) == {"frcn", "ohem", "ohem_recommended", "ohem_over_frcn_s_per_iter"}
    assert figures["frcn"]["mAP50"] == 69.4 and figures["frcn"]["coco_AP"] == 31.6
    assert figures["ohem"]["mAP50"] == 73.2 and figures["ohem"]["mAP50_11point"] == 72.7
    assert figures["ohem_recommended"]["coco_AP"] == 33.6
    assert figures["ohem"]["s_per_iter"] == 0.12 and figures["ohem"]["peak_cuda_mb"] == 900.5
    assert figures["ohem"]["device"] == "cuda"
    assert figures["ohem_over_frcn_s_per_iter"] == 1.5

    # A demo that stopped after FRCN: its summary.json is not written, FRCN's is.
    (tmp_path / "summary.json").unlink()
    for folder in ("ohem", "ohem_recommended"):
        (tmp_path / folder / "summary.json").unlink()
    figures = gpu_check.demo_figures(str(tmp_path))
    assert set(figures) == {"frcn"} and figures["frcn"]["mAP50"] == 69.4
    assert gpu_check.demo_figures(str(tmp_path / "missing")) == {}
