"""Files from elsewhere cannot run code; files this project writes load with weights_only=True.

(The converter's output is checked with weights_only=True in test_convert_weights.py.)
"""

import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from helpers import REPO, toy_overrides

import ohem_d2
from ohem_d2.data.proposal_io import ProposalFileError, read_proposal_file
from ohem_d2.engine import Trainer
from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer, UnsafeCheckpointError


class _Payload:
    """Unpickling this creates the file `marker`: a stand-in for any code an attacker runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _toy_cfg(root, out, *opts):
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "toy", "ohem.yaml"))
    cfg.merge_from_list([*toy_overrides(root), "INPUT.MIN_SIZE_TRAIN", (128,)])
    cfg.merge_from_list(["INPUT.MAX_SIZE_TRAIN", 200, "DATASETS.TEST", ()])
    cfg.merge_from_list(["OUTPUT_DIR", str(out), *opts])
    return cfg


def test_pickled_proposals_are_read_only_when_trusted(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "proposals.pkl"
    evil.write_bytes(pickle.dumps({"ids": ["1"], "boxes": [_Payload(str(marker))]}))
    with pytest.raises(ProposalFileError, match="PROPOSAL_FILES_TRUSTED"):
        read_proposal_file(str(evil))
    assert not marker.exists()

    benign = tmp_path / "benign.pkl"
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    benign.write_bytes(
        pickle.dumps({"ids": [1], "boxes": [boxes], "objectness_logits": [np.ones(1)]})
    )
    assert read_proposal_file(str(benign), trusted=True).ids == ["1"]


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_checkpoints_cannot_run_code(tmp_path, suffix):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"model{suffix}"
    state = {"model": {"w": torch.zeros(2)}, "__author__": "x", "extra": _Payload(str(marker))}
    if suffix == ".pth":
        torch.save(state, evil)
    else:
        evil.write_bytes(pickle.dumps({**state, "model": {"w": np.zeros(2)}}))
    checkpointer = SafeDetectionCheckpointer(torch.nn.Linear(1, 2))
    expected = pickle.UnpicklingError  # torch's weights_only refusal, and ours for .pkl
    with pytest.raises(expected) as info:
        checkpointer.load(str(evil))
    if suffix == ".pkl":
        assert isinstance(info.value, UnsafeCheckpointError)
        assert str(evil) in str(info.value) and "Python object io.open" in str(info.value)
    assert not marker.exists()


def test_model_zoo_style_pickle_still_loads(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "zoo.pkl"
    weights = {"weight": np.full((2, 3), 0.5, np.float32), "bias": np.arange(2.0)}
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "zoo"}, protocol=2))
    SafeDetectionCheckpointer(model).load(str(path))
    assert torch.equal(model.weight, torch.full((2, 3), 0.5))


def test_trained_checkpoints_load_with_weights_only(small_toy_registered, tmp_path):
    cfg = _toy_cfg(
        small_toy_registered, tmp_path, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    model = trainer.model.state_dict()
    assert set(final["model"]) == set(model)
    assert all(torch.equal(final["model"][k], model[k]) for k in model)
    # The periodic checkpoint's resume state (optimizer, scheduler, iteration) is plain
    # data as well: Detectron2's trainer state holds only tensors, numbers and containers.
    periodic = torch.load(tmp_path / "model_0000000.pth", map_location="cpu", weights_only=True)
    state = periodic["trainer"]
    assert state["iteration"] == 0 and state["hooks"]["LRScheduler"]["last_epoch"] == 1
    assert state["_trainer"]["optimizer"]["state"]  # momentum buffers
    # ... and our checkpointer resumes from it.
    resumed = Trainer(cfg)
    resumed.checkpointer.load(str(tmp_path / "model_0000000.pth"))
    assert resumed.iter == 0
