"""End-to-end: train_net.py trains, evaluates and runs under DDP on the toy dataset."""

import os
import re

import pytest
import torch
from detectron2.config import get_cfg
from helpers import DEVICE, REPO, run_train_net, toy_overrides

import ohem_d2
from ohem_d2.engine import Trainer
from ohem_d2.engine.allocator import find_jemalloc
from ohem_d2.model_zoo import merge_config_file


def _copypaste(output, task):
    """Metrics printed by Detectron2's print_csv_format for `task`."""
    m = re.search(rf"copypaste: Task: {task}\n.*copypaste: (.*)\n.*copypaste: (.*)\n", output)
    assert m, f"no {task} results in output:\n{output[-3000:]}"
    return dict(zip(m.group(1).split(","), map(float, m.group(2).split(","))))


def test_train_then_eval_only_beats_untrained(small_toy_root, tmp_path):
    """Train the narrow VGG briefly, then --eval-only reports VOC and COCO metrics and the
    trained weights beat untrained ones. Evaluated on the 24 training images: a few dozen
    iterations from scratch cannot generalise yet, but they must fit what they saw."""
    datasets = os.path.dirname(small_toy_root)
    config = ["--config-file", "configs/toy/frcn.yaml"]
    on_train_set = [
        "DATASETS.TEST",
        "('ohem_toy_trainval',)",
        "DATASETS.PROPOSAL_FILES_TEST",
        toy_overrides(small_toy_root)[1],
    ]
    overrides = [*toy_overrides(small_toy_root), *on_train_set]
    out = tmp_path / "out"
    train = run_train_net(
        [*config, *overrides, "SOLVER.MAX_ITER", 150, "SOLVER.STEPS", "(140,)", "OUTPUT_DIR", out],
        datasets,
    )
    assert train.returncode == 0, train.stdout[-3000:]
    assert (out / "model_final.pth").exists()
    assert "eta:" in train.stdout  # progress with ETA in the log
    # --allocator auto: jemalloc when the machine has it (engine/allocator.py)
    expected = "jemalloc" if find_jemalloc() else "system"
    assert f"Memory allocator: {expected}" in train.stdout

    def evaluate(weights, output_dir):
        result = run_train_net(
            [
                *config,
                "--eval-only",
                *overrides,
                "MODEL.WEIGHTS",
                weights,
                "OUTPUT_DIR",
                output_dir,
            ],
            datasets,
        )
        assert result.returncode == 0, result.stdout[-3000:]
        return _copypaste(result.stdout, "voc_bbox"), _copypaste(result.stdout, "bbox")

    trained_voc, trained_coco = evaluate(out / "model_final.pth", out)
    untrained_voc, untrained_coco = evaluate("", tmp_path / "untrained")
    assert {"AP", "AP50", "AP75"} <= set(trained_voc)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(trained_coco)
    assert trained_voc["AP50"] > untrained_voc["AP50"] + 5.0, (trained_voc, untrained_voc)
    assert trained_coco["AP"] > untrained_coco["AP"], (trained_coco, untrained_coco)


@pytest.mark.parametrize("config", ["ohem.yaml", "ohem_cascade.yaml", "ohem_res5.yaml"])
def test_ddp_two_processes_on_cpu(small_toy_root, tmp_path, config):
    result = run_train_net(
        [
            "--num-gpus",
            2,
            "--dist-url",
            "auto",
            "--config-file",
            f"configs/toy/{config}",
            *toy_overrides(small_toy_root),
            "MODEL.DEVICE",
            "cpu",
            "SOLVER.MAX_ITER",
            3,
            "DATASETS.TEST",
            "()",
            "DATASETS.PROPOSAL_FILES_TEST",
            "()",
            "OUTPUT_DIR",
            tmp_path,
        ],
        os.path.dirname(small_toy_root),
        no_gpu=True,  # CPU processes: on a machine with CUDA, they need the GPUs hidden
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "World size: 2" in result.stdout
    # Said up front: two CPU processes reducing with gloo.
    assert "Processes on this machine: 2 CPU process(es) (gloo): MODEL.DEVICE cpu" in result.stdout
    # The spawned workers inherit the allocator of the relaunched parent.
    expected = "jemalloc" if find_jemalloc() else "system"
    assert f"Memory allocator of rank 1: {expected}" in result.stdout
    assert (tmp_path / "model_final.pth").exists()


def _toy_cfg(config, root, tmp_path, *opts):
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "toy", config))
    cfg.merge_from_list(toy_overrides(root))
    cfg.merge_from_list(["MODEL.DEVICE", DEVICE, "OUTPUT_DIR", str(tmp_path)])
    cfg.merge_from_list(["SOLVER.MAX_ITER", 3, *opts])
    cfg.merge_from_list(["DATASETS.TEST", (), "DATASETS.PROPOSAL_FILES_TEST", ()])
    return cfg


@pytest.mark.parametrize("config", ["ohem.yaml", "ohem_cascade.yaml", "ohem_res5.yaml"])
def test_ohem_heads_train_on_toy_dataset(small_toy_registered, tmp_path, config):
    torch.manual_seed(0)
    trainer = Trainer(_toy_cfg(config, small_toy_registered, tmp_path))
    trainer.train()
    storage = trainer.storage
    history = storage.histories()
    mined = [k for k in history if k.endswith("ohem/num_candidates")]
    assert mined, sorted(history)
    # every stage mines at most BATCH_SIZE_PER_IMAGE RoIs per image from all its candidates
    for key in mined:
        assert history[key].latest() > trainer.cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
    assert torch.isfinite(torch.tensor(history["total_loss"].latest()))


def test_model_zoo_r50_fpn_with_ohem_head(small_toy_registered, tmp_path):
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    merge_config_file(cfg, os.path.join(REPO, "configs", "faster_rcnn_R_50_FPN_ohem.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", DEVICE,
            "MODEL.ROI_HEADS.NUM_CLASSES", 4,
            "DATASETS.TRAIN", ("ohem_toy_trainval",),
            "DATASETS.TEST", (),
            "INPUT.MIN_SIZE_TRAIN", (224,),
            "INPUT.MAX_SIZE_TRAIN", 320,
            "SOLVER.IMS_PER_BATCH", 2,
            "SOLVER.BASE_LR", 0.001,
            "SOLVER.MAX_ITER", 2,
            "DATALOADER.NUM_WORKERS", 0,
            "OUTPUT_DIR", str(tmp_path),
        ]
    )  # fmt: skip
    assert cfg.MODEL.ROI_HEADS.NAME == "OHEMROIHeads"
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.train()
    history = trainer.storage.histories()
    # RPN proposals plus GT boxes are all scored; NMS keeps a subset of them
    assert history["ohem/num_candidates"].latest() >= history["ohem/num_after_nms"].latest() > 0
    assert {"loss_rpn_cls", "loss_cls", "loss_box_reg"} <= set(history)
