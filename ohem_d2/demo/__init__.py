"""The demo: FRCN and OHEM side by side on BCCD, real blood-cell microscopy images.

    python -m ohem_d2.demo --output-dir output/demo [--seed 0] [--iters N] [--device cpu]

Trains the FRCN heuristic baseline (configs/bccd/frcn.yaml) and OHEM (configs/bccd/ohem.yaml)
with the same narrow VGG16, initial weights, seed, data order and schedule, each in its own
process (so that peak memory is its own), evaluates both on ``bccd_test``, prints a table
side by side and writes into the output folder:
  - summary.json and summary.md: per-class AP50, mAP50 (VOC07 11-point and all-point), COCO
    AP / AP50 / AP75, s/iter, peak memory, allocator and device;
  - detections.png: the same test images with FRCN's, OHEM's and the recommended OHEM's
    detections, left to right;
  - roi_loss.png: the mean loss over all RoIs of fixed training images vs iteration (paper
    Fig. 3), with the parts that foreground and background RoIs contribute;
  - ohem/hard_examples_iter*.png: the hard RoIs OHEM picks early, midway and late
    (foreground red, background blue, ground truth yellow).
``--dataset toy`` runs the same on the small synthetic shapes (the fast tests use it).

The package: ``cli`` the command line, ``run`` the config, dataset and training of one run,
``report`` the table and pictures, ``hooks`` the training hooks behind the loss curves, the
hard-example pictures and the progress bar.
"""

from .cli import main
from .run import (
    METHODS,
    RECOMMENDED_DIR,
    RECOMMENDED_OHEM_OPTS,
    build_demo_cfg,
    probe_inputs,
    run_one,
    saved_run_cfg,
)

__all__ = [
    "METHODS",
    "RECOMMENDED_DIR",
    "RECOMMENDED_OHEM_OPTS",
    "build_demo_cfg",
    "main",
    "probe_inputs",
    "run_one",
    "saved_run_cfg",
]
