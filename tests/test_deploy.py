"""A model with an OHEM head deploys as the same model with the stock head does, through
Detectron2's export routes (tools/deploy/export_model.py): scripting (OHEMROIHeads,
OHEMRes5ROIHeads; Detectron2's CascadeROIHeads is not scriptable), tracing and ONNX.

Each model is built twice from a Detectron2 model-zoo config with random weights, stock head
then OHEM head with the stock model's weights, and the two exports must agree exactly.
"""

import inspect
import io
import typing

import onnx
import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import CascadeROIHeads, Res5ROIHeads, StandardROIHeads
from helpers import DEVICE, ZOO_SMALL
from torch import Tensor, nn

from ohem_d2.config import add_ohem_config
from ohem_d2.export import SCRIPT_FIELDS  # the fields Detectron2's export_model.py declares
from ohem_d2.modeling.ohem import OHEMCascadeROIHeads, OHEMRes5ROIHeads, OHEMROIHeads

# Tracing Detectron2's models warns wherever a shape becomes a Python value; the outputs are
# compared instead.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

# name: (Detectron2 model-zoo config, the OHEM head replacing its ROI head)
MODELS = {
    "mask_fpn": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", "OHEMROIHeads"),
    "keypoint_fpn": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", "OHEMROIHeads"),
    "mask_c4": ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml", "OHEMRes5ROIHeads"),
    "cascade": ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", "OHEMCascadeROIHeads"),
}

# Narrow networks and a few RoIs; score threshold 0 so that random weights still detect,
# and the mask and keypoint heads run. Unit-scale pixels: on raw ones, random weights give
# keypoint logits in the thousands, which overflow Detectron2's heatmap decoding.
SMALL = [*map(str, ZOO_SMALL), "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(16,)"]


def _cfg(name, *opts):
    config_file, _ = MODELS[name]
    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(config_file))
    cfg.merge_from_list([*SMALL, *opts])
    return cfg


def _build_pair(name):
    """(stock model, OHEM model with the stock model's weights), both in eval mode."""
    torch.manual_seed(0)
    stock = build_model(_cfg(name)).eval()
    ohem = build_model(_cfg(name, "MODEL.ROI_HEADS.NAME", MODELS[name][1])).eval()
    ohem.load_state_dict(stock.state_dict())
    assert type(ohem.roi_heads).__name__ == MODELS[name][1]
    return stock, ohem


pytestmark = pytest.mark.usefixtures("one_thread")


def _cached(build):
    built = {}

    def get(name):
        if name not in built:
            built[name] = build(name)
        return built[name]

    return get


@pytest.fixture(scope="module")
def pairs():
    return _cached(_build_pair)


@pytest.fixture(scope="module")
def image():
    """The exported models' input, on their device (ZOO_SMALL's MODEL.DEVICE)."""
    return (torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255).to(DEVICE)


def _inference(model, inputs):
    # As export_model.py: no final resize, so masks stay per-RoI.
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


@pytest.fixture(scope="module")
def traces(pairs, image):
    """name -> ([eager outputs], [traced model]) of the stock then the OHEM model, flattened
    and traced as export_model.py does (TracingAdapter + torch.jit.trace)."""

    def trace(name):
        eager, traced = [], []
        for model in pairs(name):
            adapter = TracingAdapter(model, [{"image": image}], _inference)
            with torch.no_grad():
                eager.append(adapter(image))
                # check_trace would only trace again: the tests compare the outputs.
                traced.append(torch.jit.trace(adapter, (image,), check_trace=False))
        return eager, traced

    return _cached(trace)


class _ScriptableModel(nn.Module):
    """What export_model.py scripts: the model's inference, with Instances as dicts."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs: tuple[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        return [x.get_fields() for x in self.model.inference(inputs, do_postprocess=False)]


def _script(model):
    return scripting_with_instances(_ScriptableModel(model).eval(), SCRIPT_FIELDS)


def _assert_equal_tensors(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def _finals(cls):
    return {
        name
        for name, annotation in inspect.get_annotations(cls).items()
        if typing.get_origin(annotation) is typing.Final
    }


@pytest.mark.parametrize(
    "ohem_cls, parent",
    [
        (OHEMROIHeads, StandardROIHeads),
        (OHEMRes5ROIHeads, Res5ROIHeads),
        (OHEMCascadeROIHeads, CascadeROIHeads),
    ],
)
def test_scripting_constants_are_the_parents(ohem_cls, parent):
    # detectron2.export (imported above) declares these on Detectron2's heads; a subclass
    # does not inherit class annotations, so the OHEM heads declare the same set. `training`
    # is frozen by scripting_with_instances itself, for every class alike.
    inherited = set().union(*(_finals(c) for c in parent.__mro__)) - {"training"}
    assert _finals(ohem_cls) - {"training"} == inherited


@pytest.mark.parametrize("name", ["mask_fpn", "keypoint_fpn", "mask_c4"])
def test_scripted_model_equals_the_scripted_stock_model(pairs, image, name):
    stock, ohem = pairs(name)
    inputs = ({"image": image},)
    with torch.no_grad():
        (expected,) = _script(stock)(inputs)
        (outputs,) = _script(ohem)(inputs)
    assert expected["scores"].numel() > 0
    assert ("pred_keypoints" if name.startswith("keypoint") else "pred_masks") in expected
    assert outputs.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(outputs[key], value), key


@pytest.mark.parametrize("name", ["mask_fpn", "mask_c4", "cascade"])
def test_traced_model_equals_the_traced_stock_model_and_eager(traces, image, name, tmp_path):
    (eager_stock, eager), (traced_stock, traced) = traces(name)
    assert eager_stock[0].numel() > 0
    _assert_equal_tensors(eager, eager_stock)
    path = str(tmp_path / "model.ts")
    torch.jit.save(traced, path)
    with torch.no_grad():
        for module in (traced_stock, traced, torch.jit.load(path)):
            _assert_equal_tensors(module(image), eager_stock)


def _onnx_export(traced, image):
    f = io.BytesIO()
    torch.onnx.export(traced, (image,), f, dynamo=False, opset_version=11)
    return f.getvalue()


@pytest.mark.parametrize("name", ["mask_fpn", "mask_c4"])
def test_onnx_export_equals_the_stock_models(traces, image, name):
    expected, exported = (_onnx_export(traced, image) for traced in traces(name)[1])
    graphs = [onnx.load_model_from_string(b).graph for b in (expected, exported)]
    assert any(node.op_type == "RoiAlign" for node in graphs[1].node)
    # The nodes first, for a readable failure; then the whole file, weights included.
    assert [(n.op_type, list(n.input), list(n.output)) for n in graphs[1].node] == [
        (n.op_type, list(n.input), list(n.output)) for n in graphs[0].node
    ]
    assert exported == expected


def test_prior_correction_refuses_scripting_naming_it_and_traces(image):
    cfg = _cfg("mask_fpn", "MODEL.ROI_HEADS.NAME", "OHEMROIHeads")
    cfg.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION = True
    model = build_model(cfg).eval()
    # Counts as training leaves them: the hard sets hold far less background than all RoIs.
    model.roi_heads.ohem_class_counts_all.copy_(torch.tensor([50, 30, 20, 900]))
    model.roi_heads.ohem_class_counts_hard.copy_(torch.tensor([40, 30, 20, 100]))
    with pytest.raises(RuntimeError, match="MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION"):
        _script(model)
    adapter = TracingAdapter(model, [{"image": image}], _inference)
    with torch.no_grad():
        eager = adapter(image)
        _assert_equal_tensors(torch.jit.trace(adapter, (image,), check_trace=False)(image), eager)


def test_scripting_the_cascade_head_refuses_with_tracing_as_the_way(pairs):
    _, ohem = pairs("cascade")
    with pytest.raises(RuntimeError, match="OHEMCascadeROIHeads cannot be scripted.*tracing"):
        _script(ohem)
