"""Export a trained model for deployment: Detectron2's ``tools/deploy/export_model.py`` for
the project's models (that script is not installed with Detectron2's wheel).

Usage::

    python -m ohem_d2.export --config-file configs/toy/ohem.yaml --output output/export \\
        [--format torchscript|onnx] [--export-method tracing|scripting] \\
        [--sample-image IMG [--sample-proposals FILE.npz]] MODEL.WEIGHTS model_final.pth

Models with their own proposal generator (RPN; e.g. configs/faster_rcnn_R_50_FPN_ohem.yaml)
export as Detectron2 exports them: the traced model takes the image alone, the scripted one
a tuple of ``{"image": ...}`` dicts.

Fast R-CNN models (``META_ARCHITECTURE: FastRCNN``) take precomputed proposals as an input:
only tracing applies, and the exported model is called as ``model(image, proposal_boxes)``:

- ``image``: (3, H, W) in ``INPUT.FORMAT``, resized as the test mapper resizes it
  (``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``);
- ``proposal_boxes``: (R, 4) float32 XYXY boxes in the resized image's pixels (the original
  boxes times the resize factor), best first. The model keeps the first
  ``DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST`` after dropping boxes with a side at most
  ``MODEL.PROPOSAL_GENERATOR.MIN_SIZE`` and exact duplicates, as in evaluation.

Either kind returns ``(pred_boxes, pred_classes, scores, image_size)`` (the log prints the
schema): boxes in the resized image's pixels, as Detectron2 exports them (no final resize).

The trace needs a sample input: ``--sample-image`` (with its proposals from
``--sample-proposals``, an ``.npz`` proposal file naming the image by its file name without
extension, or else from selective search on the fly), or the first image of the config's
first test dataset (with the config's test proposal file). Files written to ``--output``:
``model.ts`` (TorchScript, with Detectron2's IR dumps) or ``model.onnx``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image, transform_proposals
from detectron2.export import (
    STABLE_ONNX_OPSET_VERSION,
    TracingAdapter,
    dump_torchscript_IR,
    scripting_with_instances,
)
from detectron2.layers.wrappers import shapes_to_tensor
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger
from torch import Tensor, nn

import ohem_d2  # noqa: F401  (registers the project's model parts)
from ohem_d2.config import add_ohem_config
from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer
from ohem_d2.model_zoo import merge_config_file
from ohem_d2.modeling.meta_arch import FastRCNN

__all__ = ["export_scripting", "export_tracing", "get_sample_inputs", "main", "setup_cfg"]

FORMATS = ("torchscript", "onnx")
METHODS = ("tracing", "scripting")
# Detectron2's other format and method: they need Caffe2, which PyTorch no longer ships.
CAFFE2 = ("caffe2", "caffe2_tracing")

# The Instances fields export_model.py declares for scripting.
SCRIPT_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": Tensor,
    "pred_boxes": Boxes,
    "scores": Tensor,
    "pred_classes": Tensor,
    "pred_masks": Tensor,
    "pred_keypoints": Tensor,
    "pred_keypoint_heatmaps": Tensor,
}

logger = logging.getLogger("ohem_d2.export")


class ExportError(ValueError):
    """The model cannot be exported as asked (the message says what can)."""


def setup_cfg(args):
    cfg = get_cfg()
    add_ohem_config(cfg)
    merge_config_file(cfg, args.config_file)
    # As export_model.py: no worker processes for the one sample batch.
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def build_export_model(cfg):
    """The model in eval mode with MODEL.WEIGHTS loaded (a local file: nothing is
    downloaded; strict shapes: a skipped predictor would export a random one)."""
    weights = cfg.MODEL.WEIGHTS
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights!r} is not a local file")
    model = build_model(cfg)
    if weights:
        SafeDetectionCheckpointer(model, skip_mismatched_init=False).resume_or_load(
            weights, resume=False
        )
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting an untrained model.")
    return model.eval()


def takes_proposals(model) -> bool:
    return isinstance(model, FastRCNN)


def _fast_rcnn_inference(model, image, proposal_boxes):
    """FastRCNN's inference on one image and its proposals, as tensors. The image size is
    taken from the image as a tensor, so that the traced model clips its boxes to each
    input's size, not the sample's; the objectness logits are not used at test time."""
    proposals = Instances(shapes_to_tensor(image.shape[-2:]))
    proposals.proposal_boxes = Boxes(proposal_boxes)
    proposals.objectness_logits = torch.zeros_like(proposal_boxes[:, 0])
    inputs = [{"image": image, "proposals": proposals}]
    # do_postprocess=False as export_model.py: the final resize is the caller's.
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def _rcnn_inference(model, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def tracing_adapter(model, sample):
    """Detectron2's TracingAdapter of `model` on one mapped input `sample`, and the tuple of
    tensors to trace it with: (image, proposal boxes) for FastRCNN, (image,) otherwise."""
    image = sample["image"]
    if takes_proposals(model):
        boxes = sample["proposals"].proposal_boxes.tensor.to(torch.float32)
        return TracingAdapter(model, (image, boxes), _fast_rcnn_inference), (image, boxes)
    inference = _rcnn_inference if isinstance(model, GeneralizedRCNN) else None
    # Other keys (height, width, file_name) would not flatten to tensors.
    return TracingAdapter(model, [{"image": image}], inference), (image,)


def export_tracing(model, sample, output_format: str, output_dir: str) -> str:
    adapter, inputs = tracing_adapter(model, sample)
    if output_format == "torchscript":
        traced = torch.jit.trace(adapter, inputs)
        path = os.path.join(output_dir, "model.ts")
        with PathManager.open(path, "wb") as f:
            torch.jit.save(traced, f)
        dump_torchscript_IR(traced, output_dir)
    else:
        path = os.path.join(output_dir, "model.onnx")
        names = ["image", "proposal_boxes"][: len(inputs)]
        # Image sides and the proposal count vary per input.
        dynamic = {"image": {1: "height", 2: "width"}, "proposal_boxes": {0: "proposals"}}
        with PathManager.open(path, "wb") as f:
            torch.onnx.export(
                adapter,
                inputs,
                f,
                opset_version=STABLE_ONNX_OPSET_VERSION,
                dynamo=False,
                input_names=names,
                dynamic_axes={n: dynamic[n] for n in names},
            )
    logger.info("Inputs schema: " + str(adapter.inputs_schema))
    logger.info("Outputs schema: " + str(adapter.outputs_schema))
    return path


class _ScriptableAdapter(nn.Module):
    """What export_model.py scripts: the model's inference, with Instances as dicts."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, inputs: tuple[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        instances = self.model.inference(inputs, do_postprocess=False)
        return [i.get_fields() for i in instances]


def export_scripting(model, output_dir: str) -> str:
    if takes_proposals(model):
        raise ExportError(
            "FastRCNN takes its proposals as an input, which scripting's "
            "tuple of {'image': ...} dicts cannot carry: use --export-method tracing "
            "(the traced model is called as model(image, proposal_boxes))."
        )
    if not isinstance(model, GeneralizedRCNN):
        raise ExportError(f"scripting supports GeneralizedRCNN models, not {type(model).__name__}")
    scripted = scripting_with_instances(_ScriptableAdapter(model), SCRIPT_FIELDS)
    path = os.path.join(output_dir, "model.ts")
    with PathManager.open(path, "wb") as f:
        torch.jit.save(scripted, f)
    dump_torchscript_IR(scripted, output_dir)
    return path


def _sample_proposals(args, image, image_rgb):
    """XYXY proposals (best first) and scores of the original --sample-image."""
    from ohem_d2.proposals.search import DEFAULT_MIN_SIZE
    from ohem_d2.visualize import _FileProposals, _SelectiveSearchProposals

    height, width = image.shape[:2]
    image_id = os.path.splitext(os.path.basename(args.sample_image))[0]
    if args.sample_proposals:
        source = _FileProposals(args.sample_proposals)
    else:
        logger.info("No --sample-proposals: selective search on %s", args.sample_image)
        source = _SelectiveSearchProposals("fast", DEFAULT_MIN_SIZE)
    return source(image_id, args.sample_image, height, width, image_rgb)


def get_sample_inputs(cfg, args, model) -> list[dict]:
    """One mapped input, as the test loader gives it: the --sample-image resized as
    DefaultPredictor does, or the first image of the first test dataset."""
    if args.sample_image is None:
        from ohem_d2.engine import register_project_datasets
        from ohem_d2.engine.loaders import build_test_loader_with_proposals

        try:
            register_project_datasets()
        except ValueError as e:  # already registered for another root (e.g. by a test)
            logger.debug("Project datasets not re-registered: %s", e)
        dataset = cfg.DATASETS.TEST[0]
        if takes_proposals(model):
            loader = build_test_loader_with_proposals(cfg, dataset)
        else:
            loader = build_detection_test_loader(cfg, dataset)
        return next(iter(loader))
    from detectron2.data.detection_utils import convert_image_to_rgb

    original = read_image(args.sample_image, format=cfg.INPUT.FORMAT)
    height, width = original.shape[:2]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    transform = aug.get_transform(original)
    resized = transform.apply_image(original)
    sample = {
        "image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)),
        "height": height,
        "width": width,
    }
    if takes_proposals(model):
        boxes, scores = _sample_proposals(
            args, original, convert_image_to_rgb(original, cfg.INPUT.FORMAT)
        )
        sample.update(
            proposal_boxes=boxes,
            proposal_objectness_logits=scores,
            proposal_bbox_mode=BoxMode.XYXY_ABS,
        )
        transform_proposals(
            sample, resized.shape[:2], T.TransformList([transform]), proposal_topk=sys.maxsize
        )
    return [sample]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ohem_d2.export",
        description="Export a model for deployment (Detectron2's export_model.py for the "
        "project's models). Fast R-CNN models export by tracing only, as "
        "model(image, proposal_boxes): see the module's docstring.",
    )
    parser.add_argument(
        "--format", choices=[*FORMATS, "caffe2"], default="torchscript", help="output format"
    )
    parser.add_argument(
        "--export-method",
        choices=[*METHODS, "caffe2_tracing"],
        default="tracing",
        help="how to export (scripting: torchscript only, not for Fast R-CNN models)",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--sample-image",
        default=None,
        help="sample image for tracing; default: the first image of DATASETS.TEST[0]",
    )
    parser.add_argument(
        "--sample-proposals",
        default=None,
        metavar="FILE.npz",
        help="Fast R-CNN models: proposal file with the sample image's proposals (its id: "
        "the file name without extension); default: selective search on the fly",
    )
    parser.add_argument("--output", required=True, help="output directory for the exported model")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs, at the end"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="detectron2")
    setup_logger(name="ohem_d2")
    logger.info("Command line arguments: " + str(args))
    if args.format == "caffe2" or args.export_method == "caffe2_tracing":
        print(
            "error: Caffe2 export is not available (PyTorch no longer ships Caffe2): use "
            "--format torchscript or onnx with --export-method tracing or scripting",
            file=sys.stderr,
        )
        return 2
    if args.export_method == "scripting" and args.format != "torchscript":
        print("error: scripting exports the torchscript format only", file=sys.stderr)
        return 2
    PathManager.mkdirs(args.output)
    cfg = setup_cfg(args)
    try:
        model = build_export_model(cfg)
        if args.export_method == "scripting":
            path = export_scripting(model, args.output)
        else:
            sample = get_sample_inputs(cfg, args, model)[0]
            path = export_tracing(model, sample, args.format, args.output)
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logger.info("Success.")
    print(f"exported {type(model).__name__} ({args.export_method}, {args.format}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
