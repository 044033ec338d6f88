"""Kill and resume: a run killed with SIGKILL after a checkpoint continues with --resume."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from detectron2.config import get_cfg
from helpers import FAST, REPO, toy_overrides

import ohem_d2
from ohem_d2.engine import Trainer
from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer
from ohem_d2.engine.resume import truncate_metrics

BASE_LR, STEP, MAX_ITER, PERIOD = 0.01, 4, 9, 3
TOY_OHEM = "configs/toy/ohem.yaml"


def _overrides(small_toy_root, out):
    """The short checkpointed schedule of these tests, as KEY VALUE strings."""
    overrides = [
        *toy_overrides(small_toy_root), *FAST,
        "DATASETS.TEST", "()", "DATASETS.PROPOSAL_FILES_TEST", "()",
        "SOLVER.BASE_LR", BASE_LR,
        "SOLVER.WARMUP_ITERS", 0,
        "SOLVER.STEPS", f"({STEP},)",
        "SOLVER.MAX_ITER", MAX_ITER,
        "SOLVER.CHECKPOINT_PERIOD", PERIOD,
        "OUTPUT_DIR", out,
    ]  # fmt: skip
    return [str(x) for x in overrides]


def _train_net(args, datasets, log):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets, PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train_net.py"), *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def _wait_for(predicate, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"train_net exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _last_checkpoint(out):
    try:
        return (out / "last_checkpoint").read_text().strip()
    except FileNotFoundError:
        return None


def _metrics(out):
    with open(out / "metrics.json") as f:
        return [json.loads(line) for line in f]


def test_sigkill_after_checkpoint_then_resume(small_toy_registered, tmp_path):
    small_toy_root = small_toy_registered
    datasets = os.path.dirname(small_toy_root)
    out = tmp_path / "out"
    args = ["--config-file", TOY_OHEM, *_overrides(small_toy_root, out)]
    first = _train_net(args, datasets, tmp_path / "first.log")
    try:
        # Kill as soon as the first checkpoint is complete (last_checkpoint names it),
        # not after a fixed sleep: a fast machine finishes the short run within one.
        first_ckpt = f"model_{PERIOD - 1:07d}.pth"
        _wait_for(lambda: _last_checkpoint(out) == first_ckpt, first, 240, first_ckpt)
        assert first.poll() is None, "the run finished before it could be killed"
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
    finally:
        first.kill()
    assert not (out / "model_final.pth").exists()
    last = (out / "last_checkpoint").read_text().strip()
    resumed_after = int(last[len("model_") : -len(".pth")])
    assert resumed_after >= PERIOD - 1 and (resumed_after + 1) % PERIOD == 0

    log = tmp_path / "resumed.log"
    second = _train_net(["--resume", *args], datasets, log)
    try:
        assert second.wait(300) == 0, log.read_text()[-3000:]
    finally:
        second.kill()
    text = log.read_text()
    assert f"Loading trainer from {out / last}" in text  # optimizer, scheduler, iteration
    assert f"Starting training from iteration {resumed_after + 1}" in text
    assert "Starting training from iteration 0" not in text

    # One line per checkpointed iteration, in order: nothing lost, nothing twice.
    lines = [m for m in _metrics(out) if "total_loss" in m]
    iterations = [m["iteration"] for m in lines]
    assert iterations == list(range(PERIOD - 1, MAX_ITER, PERIOD)), iterations
    # The scheduler resumed where it was: the step at STEP applies after the resume too.
    for m in lines:
        expected = BASE_LR * (0.1 if m["iteration"] >= STEP else 1.0)
        assert abs(m["lr"] - expected) < 1e-9, (m["iteration"], m["lr"])

    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == MAX_ITER - 1
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == MAX_ITER

    # The final checkpoint loads (every tensor, strictly) and evaluates.
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "toy", "ohem.yaml"))
    cfg.merge_from_list([*toy_overrides(small_toy_root), *FAST, "OUTPUT_DIR", str(out)])
    model = Trainer.build_model(cfg)
    SafeDetectionCheckpointer(model).load(str(out / "model_final.pth"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, final["model"][key]), key
    results = Trainer.test(cfg, model)
    assert {"AP", "AP50"} <= set(results["voc_bbox"])


def test_truncate_metrics_drops_lost_and_partial_lines(tmp_path):
    path = tmp_path / "metrics.json"
    rows = [{"iteration": 3, "a": 1}, {"iteration": 7, "a": 2}, {"iteration": 9, "a": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iterat')
    with open(path, "a") as appender:  # as JSONWriter holds it
        assert truncate_metrics(str(path), 7) == 2
        appender.write(json.dumps({"iteration": 8}) + "\n")
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [3, 7, 8]
    assert truncate_metrics(str(tmp_path / "absent.json"), 7) == 0


def _toy_cfg(small_toy_root, out):
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, TOY_OHEM))
    cfg.merge_from_list(_overrides(small_toy_root, out))
    return cfg


def test_killed_between_last_checkpoint_and_model_final_resumes_to_model_final(
    small_toy_registered, tmp_path
):
    out = tmp_path / "out"
    cfg = _toy_cfg(small_toy_registered, out)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    saved_with_lines = {}
    save = trainer.checkpointer.save

    def recording_save(name, **kwargs):
        # What a kill right after this checkpoint would leave in metrics.json.
        saved_with_lines[name] = [m["iteration"] for m in _metrics(out) if "total_loss" in m]
        save(name, **kwargs)

    trainer.checkpointer.save = recording_save
    trainer.train()
    last = f"model_{MAX_ITER - 1:07d}"
    for i in range(PERIOD - 1, MAX_ITER, PERIOD):
        assert i in saved_with_lines[f"model_{i:07d}"], (i, saved_with_lines)
    del trainer

    # The state a SIGKILL during the save of model_final.pth leaves behind.
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text(f"{last}.pth")
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == MAX_ITER
    resumed.train()
    final = torch.load(out / "model_final.pth", weights_only=True)
    before = torch.load(out / f"{last}.pth", weights_only=True)
    assert final["iteration"] == MAX_ITER - 1
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == MAX_ITER
    for key, value in before["model"].items():
        assert torch.equal(value, final["model"][key]), key
    lines = [m["iteration"] for m in _metrics(out) if "total_loss" in m]
    assert lines == list(range(PERIOD - 1, MAX_ITER, PERIOD))
