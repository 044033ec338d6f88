"""N processes train what one process would: the card's command on 4 CPU processes, the
batch and schedule scaled by Detectron2's rule, and 2 processes x 1 image against 1 process
x 2 images (the hard sets, the losses, the weights and the prior-correction counts)."""

import os
import re
import sys

import pytest
import torch
from helpers import FAST, run_train_net, toy_overrides

from benchmarks.gpu_check import card_overrides
from ohem_d2.data.toy import toy_proposal_file
from ohem_d2.proposals.toy import generate_toy_dataset

SMALL = [*FAST, "DATALOADER.NUM_WORKERS", 0]


def test_cards_command_on_four_cpu_processes(small_toy_root, tmp_path):
    """train_net.py --config-file configs/frcn_vgg16_ohem.yaml --num-gpus 4 MODEL.DEVICE cpu,
    with the overrides of benchmarks.gpu_check (the data, the run's length) and a narrow
    VGG16 for the CPU: Detectron2 scales the paper's 1-process batch and schedule to 4
    processes and says so; the run trains, saves and evaluates."""
    train, test = (toy_proposal_file(small_toy_root, s) for s in ("trainval", "test"))
    result = run_train_net(
        [
            "--config-file",
            "configs/frcn_vgg16_ohem.yaml",
            "--num-gpus",
            4,
            "MODEL.DEVICE",
            "cpu",
            *card_overrides(4, train, test, str(tmp_path), iters=2),
            *SMALL,
            "MODEL.VGG.WIDTH_MULT",
            0.125,
            "MODEL.VGG.FC_DIMS",
            "[64, 64]",
        ],  # fmt: skip
        os.path.dirname(small_toy_root),
        no_gpu=True,
        timeout=900,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    assert "Processes on this machine: 4 CPU process(es) (gloo)" in out
    # 2 images x 4, LR 0.001 x 4, (2 x 4) / 4 iterations (Detectron2's own log line).
    assert re.search(
        r"Auto-scaling the config to batch_size=8, learning_rate=0\.004, max_iter=2, warmup=0",
        out,
    ), out[-3000:]
    assert "Starting training from iteration 0" in out
    assert (tmp_path / "model_final.pth").exists()
    assert "voc_bbox" in out and "copypaste" in out  # evaluated after training


# A model without batch-dependent layers or randomness: no BN, no dropout, no flips.
EXACT = [
    "MODEL.VGG.NORM", "", "MODEL.ROI_BOX_HEAD.DROPOUT", 0.0, "INPUT.RANDOM_FLIP", "none",
    "DATALOADER.ASPECT_RATIO_GROUPING", False, "MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION", True,
    "SOLVER.BASE_LR", 0.01, "SOLVER.WARMUP_ITERS", 0, "SOLVER.CHECKPOINT_PERIOD", 100,
    "DATASETS.TEST", "()", "DATASETS.PROPOSAL_FILES_TEST", "()",
    # The batch is 2 images in both runs: no scaling.
    "SOLVER.IMS_PER_BATCH", 2, "SOLVER.REFERENCE_WORLD_SIZE", 0,
]  # fmt: skip


def _record(root, out, processes, max_iter, *extra):
    args = [
        *extra,
        "--num-gpus", processes, "--dist-url", "auto", "--config-file", "configs/toy/ohem.yaml",
        *toy_overrides(root), *SMALL, *EXACT, "SOLVER.MAX_ITER", max_iter, "OUTPUT_DIR", out,
    ]  # fmt: skip
    result = run_train_net(
        args,
        os.path.dirname(root),
        no_gpu=True,
        script=os.path.join("tests", "ddp_record.py"),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:]
    return [torch.load(out / f"mined_rank{r}.pt") for r in range(processes)], _state(out)


def _state(out):
    return torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """3 iterations of 1 process x 2 images and of 2 processes x 1 image, then 2 more of
    each after --resume. The images are all 192 x 192: a 2-image batch pads neither, so the
    backbone sees each image as a 1-image batch does."""
    root = generate_toy_dataset(
        str(tmp_path_factory.mktemp("square") / "ohem_toy"),
        num_trainval=8, num_test=2, min_side=192, max_side=192, progress=False,
    )  # fmt: skip
    runs = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp(f"p{processes}")
        mined, state = _record(root, out, processes, 3)
        resumed, resumed_state = _record(root, out, processes, 5, "--resume")
        runs[processes] = (mined, state, resumed, resumed_state)
    return runs


def test_two_processes_mine_and_train_what_one_process_does(one_and_two):
    (single,), state, _, _ = one_and_two[1]
    ranks, ddp_state, _, _ = one_and_two[2]
    assert len(single) == 3 and all(len(r) == 3 for r in ranks)
    for step, record in enumerate(single):
        for image in range(2):  # image i of the 1-process batch is rank i's image
            (losses,), (hard,) = ranks[image][step]["losses"], ranks[image][step]["hard"]
            torch.testing.assert_close(losses, record["losses"][image], rtol=1e-4, atol=1e-5)
            assert torch.equal(hard[1], record["hard"][image][1]), (step, image)
            torch.testing.assert_close(hard[0], record["hard"][image][0])
    for key, value in state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The class counts of all labelled RoIs and of the hard sets count both images.
    for key in ("roi_heads.ohem_class_counts_all", "roi_heads.ohem_class_counts_hard"):
        assert torch.equal(ddp_state[key], state[key]), (key, ddp_state[key], state[key])
        assert int(state[key].sum()) > 0


def test_resume_on_two_processes_does_not_count_twice(one_and_two):
    _, _, _, state = one_and_two[1]
    _, _, _, ddp_state = one_and_two[2]
    for key in ("roi_heads.ohem_class_counts_all", "roi_heads.ohem_class_counts_hard"):
        assert torch.equal(ddp_state[key], state[key]), (key, ddp_state[key], state[key])


def _check_setup(*opts, num_gpus=4):
    import train_net

    argv = ["--config-file", "configs/frcn_vgg16_ohem.yaml", "--num-gpus", str(num_gpus)]
    # No datasets: the check of the batch is the subject here, not the data.
    argv += ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "DATASETS.TRAIN", "()"]
    argv += ["DATASETS.TEST", "()", *map(str, opts)]
    old, sys.argv = sys.argv, ["train_net.py", *argv]
    try:
        return train_net.check_setup(train_net.parse_args())
    finally:
        sys.argv = old


def test_pre_launch_check_judges_the_scaled_batch(monkeypatch, catalog_restored):
    from ohem_d2.engine.distributed import DistributedSetupError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The paper's 2 images for 1 process become 8 for 4: accepted.
    assert _check_setup().startswith("4 CPU process(es) (gloo)")
    # Kept as written, 2 images cannot be shared by 4: the refusal names both keys.
    with pytest.raises(DistributedSetupError, match="IMS_PER_BATCH.*REFERENCE_WORLD_SIZE"):
        _check_setup("SOLVER.REFERENCE_WORLD_SIZE", 0)
    with pytest.raises(DistributedSetupError, match=r"\(3\) must be divisible by SOLVER.REFERENCE"):
        _check_setup("SOLVER.IMS_PER_BATCH", 3, "SOLVER.REFERENCE_WORLD_SIZE", 2)
