"""benchmarks/bells_and_whistles.py: its arguments, and a dry run on a saved toy model."""

import json
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from helpers import FAST, table_rows

from benchmarks.bells_and_whistles import VARIANTS, find_runs, main, parse_args, variant_cfg


def test_arguments_and_a_folder_without_runs(tmp_path):
    args = parse_args(["output/demo"])
    assert args.variants == ["plain", "B", "M", "M+B"]
    assert args.scales == [480, 576, 688, 864, 1000] and args.max_size == 1000
    with pytest.raises(SystemExit):
        parse_args(["output/demo", "--variants", "C"])
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        find_runs(str(tmp_path))


def test_dry_run_on_a_saved_toy_model(small_toy_registered, tmp_path, monkeypatch, capsys):
    """A demo-like run folder (summary.json, model_final.pth with random weights) on the
    small toy set: every variant evaluates and is timed."""
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(small_toy_registered))
    torch.set_num_threads(1)
    summary = {
        "dataset": "toy",
        "method": "frcn",
        "iterations": 1,
        "seed": 0,
        "ohem_opts": [],
        "opts": [str(x) for x in FAST],
        "test_datasets": ["ohem_toy_test"],
    }
    method_dir = tmp_path / "run" / "frcn"
    method_dir.mkdir(parents=True)
    (method_dir / "summary.json").write_text(json.dumps(summary))
    from ohem_d2.engine import Trainer

    torch.manual_seed(0)
    model = Trainer.build_model(variant_cfg(str(method_dir), summary, "plain", [96], 200))
    DetectionCheckpointer(model, save_dir=str(method_dir)).save("model_final")
    # The demo's own list of the methods' summaries, beside their folders.
    (tmp_path / "run" / "summary.json").write_text(json.dumps([summary]))

    rows = main([str(tmp_path / "run"), "--scales", "96", "128", "--max-size", "200"])
    assert [r[2] for r in rows] == list(VARIANTS)
    for _, method, _, result in rows:
        assert method == "frcn"
        assert 0 <= result["mAP50_allpoint"] <= 100 and 0 <= result["coco_AP"] <= 100
        assert result["s_per_image"] > 0
    assert "M+B" in [r[2] for r in table_rows(capsys.readouterr().out)]
