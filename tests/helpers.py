"""Helpers shared by the end-to-end tests (imported as `helpers`: tests/ is on sys.path)."""

import os
import subprocess
import sys

from ohem_d2.data.toy import toy_proposal_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The device the tests' models run on: OHEM_D2_TEST_DEVICE, "cpu" unless set (`python -m
# benchmarks.gpu_check` sets "cuda"; conftest.py refuses a device the machine lacks). Tests
# whose subject is the CPU stay there: several CPU processes (gloo), the allocator, the
# demo's defaults, the refusals for want of a GPU.
DEVICE = os.environ.get("OHEM_D2_TEST_DEVICE", "cpu")
# Hides the GPUs from a subprocess, as a user starting CPU processes on a machine with CUDA
# does (train_net.py refuses them otherwise: Detectron2's launcher would pick NCCL).
NO_GPU_ENV = {"CUDA_VISIBLE_DEVICES": ""}

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
    train, test = (toy_proposal_file(root, s) for s in ("trainval", "test"))
    return [
        "DATASETS.PROPOSAL_FILES_TRAIN",
        f"('{train}',)",
        "DATASETS.PROPOSAL_FILES_TEST",
        f"('{test}',)",
    ]


def on_device(x):
    """`x` on DEVICE: a tensor, Instances, Boxes, or a list, tuple or dict of them (other
    values as they are)."""
    if isinstance(x, dict):
        return {k: on_device(v) for k, v in x.items()}
    if type(x) in (list, tuple):
        return type(x)(on_device(v) for v in x)
    return x.to(DEVICE) if hasattr(x, "to") else x


def run_train_net(args, datasets_root, timeout=600, no_gpu=False, script="train_net.py", env=()):
    """Run train_net.py (or another `script` of the repository with its command line) in a
    subprocess with DETECTRON2_DATASETS=datasets_root and the variables `env`; `no_gpu`
    hides the GPUs from it (NO_GPU_ENV): on a machine without one, that changes nothing.

    Returns the CompletedProcess (stdout and stderr merged into stdout)."""
    variables = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONWARNINGS="ignore")
    variables.update(env)
    if no_gpu:
        variables.update(NO_GPU_ENV)
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, args)],
        cwd=REPO,
        env=variables,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def toy_model(config="toy/frcn.yaml", *opts, seed=0):
    """A model of one of the project's configs with random weights, in eval mode on DEVICE,
    and its config (add_ohem_config applied, `opts` merged)."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import ohem_d2
    from ohem_d2.model_zoo import merge_config_file

    torch.set_num_threads(1)
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    merge_config_file(cfg, os.path.join(REPO, "configs", config))
    cfg.merge_from_list(["MODEL.DEVICE", DEVICE, "MODEL.WEIGHTS", "", *map(str, opts)])
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


# Detectron2 RPN models, narrow, with random weights (the M / B and deployment tests).
ZOO_SMALL = [
    "MODEL.DEVICE", DEVICE,
    "MODEL.WEIGHTS", "",
    "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
    "MODEL.FPN.OUT_CHANNELS", 16,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 50,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 10,
    "MODEL.ROI_HEADS.NUM_CLASSES", 3,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
    "TEST.DETECTIONS_PER_IMAGE", 5,
]  # fmt: skip
ZOO = {
    "mask_fpn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "mask_c4": "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
    "cascade": "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
}
# Iterative box regression and box voting on (B).
B_ON = ["TEST.ITERATIVE_BBOX_REG.ENABLED", "True", "TEST.BOX_VOTING.ENABLED", "True"]


def zoo_model(name, *opts):
    """A narrow Detectron2 model-zoo model with random weights, in eval mode on DEVICE, and
    its config."""
    import torch
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from ohem_d2.config import add_ohem_config

    torch.set_num_threads(1)
    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(ZOO[name]))
    cfg.merge_from_list([*map(str, ZOO_SMALL), *opts])
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def spread(model):
    """Random weights give near-uniform scores and tiny deltas: spread both, so that scales
    and passes give detections that differ."""
    import torch

    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        predictor.cls_score.weight.mul_(30)
        predictor.bbox_pred.weight.mul_(100)
    return model


def row_cells(line):
    """The cells of one row of a Markdown table, stripped of their padding."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_rows(text):
    """The cells of each row of the Markdown tables in `text`, separator rows left out."""
    rows = [row_cells(line) for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if not all(set(c) <= set("-:") for c in r)]
