"""What the project relies on in Detectron2 and fvcore beyond their documented API.

Each test names the upstream behaviour or private name it pins; when one fails after an
upgrade, the message says which project code to re-check.
"""

import ast
import inspect
import os
import pickle
import textwrap

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.engine import defaults as d2_defaults
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.common.checkpoint import Checkpointer
from helpers import DEVICE, REPO

import ohem_d2
from ohem_d2.engine import Trainer
from ohem_d2.engine.checkpoint import (
    CheckpointMismatchError,
    SafeDetectionCheckpointer,
    UnsafeCheckpointError,
)

# ----------------------------------------------------------------------------- FastRCNN


def _fast_rcnn(*opts):
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "frcn_vgg16.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", DEVICE, "MODEL.VGG.WIDTH_MULT", 0.125])
    cfg.merge_from_list(["MODEL.VGG.FC_DIMS", [32, 32], "MODEL.ROI_HEADS.NUM_CLASSES", 3])
    cfg.merge_from_list(list(opts))
    torch.manual_seed(0)
    return build_model(cfg)


def _input():
    gt = Instances((96, 128))
    gt.gt_boxes = Boxes(torch.tensor([[10.0, 10, 60, 70]]))
    gt.gt_classes = torch.tensor([1])
    props = Instances((96, 128))
    boxes = [[12, 8, 58, 72], [12, 8, 58, 72], [70, 10, 120, 90], [0, 0, 30, 30], [5, 5, 9, 9]]
    props.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    props.objectness_logits = -torch.arange(5, dtype=torch.float32)
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255
    return {"image": image, "instances": gt, "proposals": props, "height": 192, "width": 256}


def _record(calls, name, fn):
    def recorded(*args, **kwargs):
        calls.append((name, args, kwargs))
        return fn(*args, **kwargs)

    return recorded


def test_fast_rcnn_runs_generalized_rcnn_forward_and_inference(monkeypatch):
    """FastRCNN (ohem_d2/modeling/meta_arch.py) gives GeneralizedRCNN no proposal generator
    and relies on: GeneralizedRCNN.forward and .inference then hand each input's "proposals"
    to the ROI heads (and to visualize_training), and forward at inference calls
    self.inference. Each input's proposals are selected once per call."""
    model = _fast_rcnn(
        "VIS_PERIOD", 1, "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN", 2,
        "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST", 3,
    )  # fmt: skip
    assert model.proposal_generator is None
    calls = []
    selector, heads = model.proposal_selector, model.roi_heads
    monkeypatch.setattr(selector, "forward", _record(calls, "select", selector.forward))
    monkeypatch.setattr(heads, "forward", _record(calls, "roi_heads", heads.forward))
    monkeypatch.setattr(
        model, "visualize_training", _record(calls, "visualize", model.visualize_training)
    )
    x = _input()

    with EventStorage():
        losses = model([x, dict(x)])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert [c[0] for c in calls] == ["select", "roi_heads", "visualize"], (
        "GeneralizedRCNN.forward no longer takes each input's 'proposals' when it has no "
        "proposal generator: re-check FastRCNN.forward"
    )
    # The ROI heads and the visualisation see the selected proposals (duplicate and the
    # box with sides <= MIN_SIZE dropped, top 2 kept), not the inputs' five.
    (_, (_, _, to_heads, _), _), (_, (_, to_visualize), _) = calls[1:]
    assert [len(p) for p in to_heads] == [len(p) for p in to_visualize] == [2, 2]
    assert len(x["proposals"]) == 5  # the caller's inputs are left as they are

    calls.clear()
    model.eval()
    with torch.no_grad():
        (out,) = model([x])
        (raw,) = model.inference([x], do_postprocess=False)
    assert [c[0] for c in calls] == ["select", "roi_heads"] * 2, (
        "GeneralizedRCNN.forward at inference no longer calls self.inference: "
        "re-check FastRCNN.forward"
    )
    assert [len(p) for p in calls[1][1][2]] == [3]
    assert out["instances"].image_size == (192, 256) and raw.image_size == (96, 128)


# ----------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this creates the file `marker`: a stand-in for any code an attacker runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pth_is_read_with_weights_only_through_detectron2s_torch_load_hook(tmp_path, monkeypatch):
    """SafeDetectionCheckpointer overrides DetectionCheckpointer._torch_load (private), which
    DetectionCheckpointer._load_file calls for .pth files. Where torch.load's default would
    run a pickle's code (torch < 2.6), the public load() must still refuse it."""
    assert hasattr(DetectionCheckpointer, "_torch_load"), (
        "DetectionCheckpointer._torch_load is gone: .pth checkpoints would no longer be read "
        "with weights_only=True; move SafeDetectionCheckpointer._torch_load to its successor"
    )
    torch_load = torch.load

    def permissive_load(f, *args, weights_only=False, **kwargs):
        return torch_load(f, *args, weights_only=weights_only, **kwargs)

    monkeypatch.setattr(torch, "load", permissive_load)
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pth"
    torch.save({"model": {"weight": torch.zeros(2, 1)}, "extra": _Payload(str(marker))}, evil)
    # The setting is meaningful: Detectron2's own checkpointer runs the payload here.
    DetectionCheckpointer(torch.nn.Linear(1, 2)).load(str(evil))
    assert marker.exists()
    marker.unlink()

    with pytest.raises(pickle.UnpicklingError):
        SafeDetectionCheckpointer(torch.nn.Linear(1, 2)).load(str(evil))
    assert not marker.exists(), (
        "SafeDetectionCheckpointer._torch_load was not called by load(): re-check how "
        "DetectionCheckpointer._load_file reads .pth files"
    )


def test_pkl_is_read_through_the_load_file_hook(tmp_path):
    """fvcore's Checkpointer.load reads the file with self._load_file (documented as the
    method to override), where SafeDetectionCheckpointer reads .pkl files."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pkl"
    evil.write_bytes(pickle.dumps({"model": {}, "__author__": "x", "e": _Payload(str(marker))}))
    with pytest.raises(UnsafeCheckpointError):
        SafeDetectionCheckpointer(torch.nn.Linear(1, 2)).load(str(evil))
    assert not marker.exists()


def test_shape_mismatch_is_an_error_through_fvcores_load_model_hook(tmp_path, monkeypatch):
    """SafeDetectionCheckpointer overrides Checkpointer._load_model (fvcore, private), which
    Checkpointer.load calls and whose ``incorrect_shapes`` it would only log."""
    assert hasattr(Checkpointer, "_load_model"), (
        "fvcore's Checkpointer._load_model is gone: move SafeDetectionCheckpointer's shape "
        "check (CheckpointMismatchError) to its successor"
    )
    path = tmp_path / "other.pth"
    torch.save({"model": torch.nn.Linear(4, 2).state_dict()}, path)
    calls = []
    checkpointer = SafeDetectionCheckpointer(torch.nn.Linear(3, 2))
    monkeypatch.setattr(
        checkpointer, "_load_model", _record(calls, "load_model", checkpointer._load_model)
    )
    expected = r"'weight' has shape \(2, 4\) in the checkpoint but \(2, 3\) in the model\."
    with pytest.raises(CheckpointMismatchError, match=expected):
        checkpointer.load(str(path))
    assert len(calls) == 1, "Checkpointer.load no longer calls self._load_model"


# ----------------------------------------------------------------------------- trainer


def _body(function):
    """The statements of `function`, without its docstring, as normalised source."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(function))).body
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return [ast.unparse(statement) for statement in body]


# Trainer.__init__ is DefaultTrainer.__init__ with these statements changed.
_TRAINER_CHANGES = {
    "super().__init__()": "TrainerBase.__init__(self)",
    "model = create_ddp_model(model, broadcast_buffers=False)": (
        "model = create_ddp_model(model, broadcast_buffers=False, device_ids=ddp_device_ids(model))"
    ),
    "self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, "
    "trainer=weakref.proxy(self))": "self.checkpointer = SafeDetectionCheckpointer(model, "
    "cfg.OUTPUT_DIR, trainer=weakref.proxy(self))",
}


def test_trainer_init_is_default_trainer_init_with_three_changes():
    """Trainer.__init__ (ohem_d2/engine/trainer.py) restates DefaultTrainer.__init__, which
    has no seam for DDP's device_ids or the checkpointer's class. When Detectron2 changes
    DefaultTrainer.__init__, make Trainer.__init__ do what the new one does (with the same
    three changes) and update _TRAINER_CHANGES if those statements moved."""
    assert DefaultTrainer.__bases__ == (TrainerBase,)
    upstream = _body(DefaultTrainer.__init__)
    missing = set(_TRAINER_CHANGES) - set(upstream)
    assert not missing, f"DefaultTrainer.__init__ changed upstream: no {sorted(missing)}"
    expected = [_TRAINER_CHANGES.get(s, s) for s in upstream]
    assert _body(Trainer.__init__) == expected, (
        "Trainer.__init__ and DefaultTrainer.__init__ differ in more than the DDP device ids "
        "and the checkpointer: re-check Trainer.__init__ against Detectron2's"
    )


def test_create_ddp_model_passes_the_given_device_ids(monkeypatch):
    """Trainer passes device_ids=None for a CPU model: create_ddp_model must hand a given
    device_ids (even None) to DistributedDataParallel rather than its [local_rank]."""
    wrapped = []
    monkeypatch.setattr(d2_defaults.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(
        d2_defaults, "DistributedDataParallel", lambda model, **kw: wrapped.append(kw)
    )
    d2_defaults.create_ddp_model(torch.nn.Linear(1, 1), broadcast_buffers=False, device_ids=None)
    assert wrapped == [{"broadcast_buffers": False, "device_ids": None}]


@pytest.mark.parametrize(
    "cls_name, method, params",
    [
        ("ROIHeads", "_sample_proposals", ["matched_idxs", "matched_labels", "gt_classes"]),
        ("ROIHeads", "label_and_sample_proposals", ["proposals", "targets"]),
        ("CascadeROIHeads", "_run_stage", ["features", "proposals", "stage"]),
        ("CascadeROIHeads", "_create_proposals_from_boxes", ["boxes", "image_sizes"]),
        ("CascadeROIHeads", "_match_and_label_boxes", ["proposals", "stage", "targets"]),
        ("StandardROIHeads", "_forward_mask", ["features", "instances"]),
        ("StandardROIHeads", "_forward_keypoint", ["features", "instances"]),
        ("StandardROIHeads", "_forward_box", ["features", "proposals"]),
        ("Res5ROIHeads", "_shared_roi_transform", ["features", "boxes"]),
    ],
)
def test_roi_head_hooks_the_ohem_heads_call(cls_name, method, params):
    # ohem_d2/modeling/ohem/{labelling,roi_heads}.py override or call these Detectron2
    # ROI-head methods by name; if one is renamed or takes other arguments, re-check them.
    from detectron2.modeling import roi_heads

    function = getattr(getattr(roi_heads, cls_name), method, None)
    assert function is not None, f"Detectron2's {cls_name}.{method} is gone"
    got = list(inspect.signature(function).parameters)[1:]
    assert got == params, f"Detectron2's {cls_name}.{method} now takes {got}, not {params}"
    if method == "_sample_proposals":
        # label_and_sample_proposals must still go through the hook OHEM replaces.
        source = inspect.getsource(roi_heads.ROIHeads.label_and_sample_proposals)
        assert "self._sample_proposals(" in source
