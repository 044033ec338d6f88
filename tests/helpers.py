"""Helpers shared by the end-to-end tests (imported as `helpers`: tests/ is on sys.path)."""

import os
import subprocess
import sys

from ohem_d2.data.embedded import embedded_proposal_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small images and few proposals: about a second per iteration on a busy 2-core machine.
FAST = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", 200,
    "INPUT.MIN_SIZE_TEST", 128,
    "INPUT.MAX_SIZE_TEST", 200,
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN", 300,
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST", 300,
]  # fmt: skip


def toy_overrides(root):
    """Config overrides that point the toy configs at the dataset in `root`."""
    train, test = (embedded_proposal_file(root, s) for s in ("trainval", "test"))
    return [
        "DATASETS.PROPOSAL_FILES_TRAIN",
        f"('{train}',)",
        "DATASETS.PROPOSAL_FILES_TEST",
        f"('{test}',)",
    ]


def run_train_net(args, datasets_root, timeout=600):
    """Run train_net.py in a subprocess with DETECTRON2_DATASETS=datasets_root.

    Returns the CompletedProcess (stdout and stderr merged into stdout)."""
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def toy_model(config="toy/frcn.yaml", *opts, seed=0):
    """A model of one of the project's configs with random weights, in eval mode on CPU, and
    its config (add_ohem_config applied, `opts` merged)."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import ohem_d2
    from ohem_d2.model_zoo import merge_config_file

    torch.set_num_threads(1)
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    merge_config_file(cfg, os.path.join(REPO, "configs", config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *map(str, opts)])
    torch.manual_seed(seed)
    return build_model(cfg).eval(), cfg


def random_image_and_proposals(height=64, width=96, num_proposals=12, seed=0):
    """An (3, H, W) uint8 image and (R, 4) float32 XYXY proposal boxes inside it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(3, height, width, generator=g) * 255).to(torch.uint8)
    size = torch.rand(num_proposals, 2, generator=g) * (min(height, width) / 2) + 8
    corner = torch.rand(num_proposals, 2, generator=g) * (torch.tensor([width, height]) - size)
    return image, torch.cat([corner, corner + size], dim=1)
