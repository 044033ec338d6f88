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
