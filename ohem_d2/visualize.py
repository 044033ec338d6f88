"""Draw a trained Fast R-CNN / OHEM model's detections on images.

Usage::

    python -m ohem_d2.visualize --config-file configs/toy/ohem.yaml \\
        --input img1.jpg img2.jpg [--proposals FILE.npz] [--output DIR] [--confidence 0.5] \\
        MODEL.WEIGHTS output/toy/ohem/model_final.pth

Proposals come from ``--proposals`` (an ``.npz`` proposal file; an image's id is its file
name without extension) or, without it, from selective search computed on the fly on the
original image (as the proposal files are). The image and its proposals are then resized
as Detectron2's test mapper does (``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``) and
the model's detections, mapped back to the original image, are drawn with Detectron2's
``Visualizer`` into ``<output>/<image name>.png``. Class names come from the metadata of
the config's first test dataset when it is registered.

An unreadable image (or one without proposals in the file) is reported by path and
skipped; the exit status is non-zero when no image could be drawn.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys

import numpy as np

__all__ = ["build_visualize_cfg", "main"]

logger = logging.getLogger(__name__)


def build_visualize_cfg(config_file: str, opts: list[str]):
    """get_cfg + add_ohem_config + the file + the command-line overrides, frozen."""
    from detectron2.config import get_cfg

    from ohem_d2.config import add_ohem_config

    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def _test_metadata(cfg):
    """Metadata of the first test dataset, if it is registered and fits the model; else None
    (the Visualizer then labels detections with class indices)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ohem_d2.engine import register_project_datasets

    try:
        register_project_datasets()
    except ValueError as e:  # already registered for another root (e.g. by a test)
        logger.debug("Toy dataset not re-registered: %s", e)
    if not cfg.DATASETS.TEST or cfg.DATASETS.TEST[0] not in DatasetCatalog.list():
        return None
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    classes = metadata.get("thing_classes", None)
    if classes is None or len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        logger.warning(
            "Dataset %s has classes %s but the model has %d; labelling by class index.",
            cfg.DATASETS.TEST[0],
            classes,
            cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        )
        return None
    return metadata


def _build_model(cfg):
    from detectron2.modeling import build_model

    import ohem_d2  # noqa: F401  (registers the project's model parts)
    from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer

    weights = cfg.MODEL.WEIGHTS
    # A URL or detectron2:// name would be downloaded by the checkpointer: only local files.
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights!r} is not a local file")
    model = build_model(cfg)
    model.eval()
    if weights:
        # Detectron2's DetectionCheckpointer, minus running code from the file and minus
        # silently skipping tensors whose shape does not fit the config.
        SafeDetectionCheckpointer(model).load(weights)
    else:
        logger.warning("MODEL.WEIGHTS is empty: drawing the detections of an untrained model.")
    return model


class _FileProposals:
    """Proposals of the images in an ``.npz`` file, looked up by image id (file stem)."""

    def __init__(self, path: str):
        from ohem_d2.data.proposal_io import read_proposal_file

        self.proposals = read_proposal_file(path)
        self.index = {image_id: i for i, image_id in enumerate(self.proposals.ids)}

    def __call__(self, image_id: str, image_path: str, height: int, width: int, image_rgb):
        from detectron2.structures import BoxMode

        from ohem_d2.data.proposal_io import ProposalFileError, clean_boxes

        path = self.proposals.path
        if image_id not in self.index:
            raise ProposalFileError(
                f"proposal file {path!r} has no image id {image_id!r} (the file name of "
                f"{image_path!r} without extension); it has e.g. {self.proposals.ids[:3]}"
            )
        i = self.index[image_id]
        boxes = BoxMode.convert(
            self.proposals.boxes[i].astype(np.float32), self.proposals.bbox_mode, BoxMode.XYXY_ABS
        )
        scores = self.proposals.scores[i]
        boxes, keep, _ = clean_boxes(
            boxes, height, width, scores=scores, where=f"proposal file {path!r}, {image_path!r}"
        )
        if len(boxes) == 0:
            raise ProposalFileError(f"proposal file {path!r} has no usable box for {image_id!r}")
        scores = scores[keep]
        order = np.argsort(-scores, kind="stable")
        return boxes[order], scores[order]


class _SelectiveSearchProposals:
    """Selective search on the original image, best-ranked first (score -rank)."""

    def __init__(self, mode: str, min_size: int):
        self.mode, self.min_size = mode, min_size

    def __call__(self, image_id, image_path, height, width, image_rgb):
        from ohem_d2.proposals.search import selective_search_boxes

        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        boxes = selective_search_boxes(bgr, mode=self.mode, min_size=self.min_size)
        return boxes, -np.arange(len(boxes), dtype=np.float32)


def _predict(model, cfg, image, boxes, scores):
    """Run the model on one image (in cfg.INPUT.FORMAT) and its XYXY proposals, resized as
    the test mapper does. Returns the Instances in original image coordinates (CPU)."""
    import torch
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import build_augmentation, transform_proposals
    from detectron2.structures import BoxMode

    height, width = image.shape[:2]
    aug_input = T.AugInput(image)
    transforms = T.AugmentationList(build_augmentation(cfg, is_train=False))(aug_input)
    resized = aug_input.image
    inputs = {
        "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
        "height": height,
        "width": width,
        "proposal_boxes": boxes,
        "proposal_objectness_logits": scores,
        "proposal_bbox_mode": BoxMode.XYXY_ABS,
    }
    # Every proposal is kept here, as in training/evaluation: the model's proposal
    # generator picks the top DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST.
    transform_proposals(inputs, resized.shape[:2], transforms, proposal_topk=sys.maxsize)
    with torch.no_grad():
        return model([inputs])[0]["instances"].to("cpu")


def _output_path(output_dir: str, image_path: str, used: set) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    name, n = f"{stem}.png", 1
    while name in used:  # two inputs with the same name from different directories
        name, n = f"{stem}_{n}.png", n + 1
    used.add(name)
    return os.path.join(output_dir, name)


def _parse_args(argv):
    from ohem_d2.proposals.search import DEFAULT_MIN_SIZE, MODES

    parser = argparse.ArgumentParser(
        prog="python -m ohem_d2.visualize",
        description="Draw a model's detections on images, with proposals from an .npz file "
        "or from selective search computed on the fly.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="image files")
    parser.add_argument(
        "--proposals",
        default=None,
        help=".npz proposal file with the inputs' ids (file names without extension); "
        "default: selective search on the fly",
    )
    parser.add_argument("--output", default="output/visualize", help="directory of the PNGs")
    parser.add_argument(
        "--confidence", type=float, default=0.5, help="draw detections scoring at least this"
    )
    parser.add_argument("--ss-mode", choices=MODES, default="fast", help="selective-search mode")
    parser.add_argument(
        "--ss-min-size",
        type=int,
        default=DEFAULT_MIN_SIZE,
        help=f"selective search drops boxes with a side below this (default {DEFAULT_MIN_SIZE} "
        "for VOC-sized images; the toy dataset uses 8)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs, at the end"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from detectron2.data.detection_utils import convert_image_to_rgb, read_image
    from detectron2.utils.visualizer import Visualizer

    from ohem_d2.data.proposal_io import ProposalFileError
    from ohem_d2.engine.checkpoint import CheckpointMismatchError
    from ohem_d2.modeling.proposal_generator import MissingProposalsError

    cfg = build_visualize_cfg(args.config_file, args.opts)
    try:
        model = _build_model(cfg)
        if args.proposals:
            proposals_of = _FileProposals(args.proposals)
        else:
            proposals_of = _SelectiveSearchProposals(args.ss_mode, args.ss_min_size)
    except (
        FileNotFoundError,
        ProposalFileError,
        CheckpointMismatchError,
        pickle.UnpicklingError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metadata = _test_metadata(cfg)
    os.makedirs(args.output, exist_ok=True)

    written, failed, used_names = [], [], set()
    for path in args.input:
        try:
            image = read_image(path, format=cfg.INPUT.FORMAT)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad image files
            failed.append(path)
            print(f"skipped {path}: unreadable or corrupt image ({e})", file=sys.stderr)
            continue
        image_rgb = convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        height, width = image.shape[:2]
        image_id = os.path.splitext(os.path.basename(path))[0]
        try:
            boxes, scores = proposals_of(image_id, path, height, width, image_rgb)
        except ProposalFileError as e:
            failed.append(path)
            print(f"skipped {path}: {e}", file=sys.stderr)
            continue
        try:
            instances = _predict(model, cfg, image, boxes, scores)
        except MissingProposalsError as e:  # every box below the generator's MIN_SIZE
            failed.append(path)
            print(f"skipped {path}: {e}", file=sys.stderr)
            continue
        shown = instances[instances.scores >= args.confidence]
        drawing = Visualizer(image_rgb, metadata).draw_instance_predictions(shown)
        out_path = _output_path(args.output, path, used_names)
        drawing.save(out_path)
        written.append(out_path)
        print(
            f"{path}: {len(boxes)} proposals, {len(shown)} detection(s) with score >= "
            f"{args.confidence:g} -> {out_path}"
        )
    print(
        f"wrote {len(written)} of {len(args.input)} image(s) to {args.output}; "
        f"{len(failed)} skipped"
    )
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
