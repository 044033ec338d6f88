"""Fit an OHEM model's score calibration on a held-out dataset and save it with the model.

    python -m ohem_d2.calibrate_scores --config-file CONFIG --dataset NAME \\
        --output OUT_DIR/model_calibrated.pth MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

The model is evaluated on NAME with ``MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION`` on and its map
the identity; each kept detection is matched to the ground truth of its class at IoU 0.5
(:mod:`ohem_d2.engine.calibration`), and per class (a_c, b_c) of s' = sigmoid(a_c logit(s) +
b_c) are fitted by maximum likelihood. The checkpoint written holds the model with the fitted
``roi_heads.ohem_score_calibration``; evaluate or deploy it with
``MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION True``. Fit on data the model did not train on:
the scores of training images are more often right than those of new ones.
"""

import argparse
import json
import logging
import os
import sys
import tempfile

__all__ = ["fit_model_calibration", "main"]


def fit_model_calibration(cfg, model, dataset_name):
    """Fit ``model``'s score calibration on ``dataset_name`` in place; return its (K, 2)
    parameters. ``model`` has the option on (its map is reset to the identity first)."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    from .engine import Trainer
    from .engine.calibration import class_index, fit_platt, matched_flags

    heads = model.roi_heads
    if not getattr(heads, "score_calibration", False):
        raise ValueError("the model needs MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION True")
    heads.ohem_score_calibration.copy_(torch.tensor([[1.0, 0.0]]).repeat(heads.num_classes, 1))
    with tempfile.TemporaryDirectory(prefix="ohem_d2_calibrate_") as tmp:
        evaluator = COCOEvaluator(dataset_name, tasks=("bbox",), distributed=False, output_dir=tmp)
        inference_on_dataset(model, Trainer.build_test_loader(cfg, dataset_name), evaluator)
        with open(os.path.join(tmp, "coco_instances_results.json")) as f:
            detections = json.load(f)
    matched, _ = matched_flags(
        detections, DatasetCatalog.get(dataset_name), dataset_name=dataset_name
    )
    to_class = class_index(dataset_name)
    params = fit_platt(
        [d["score"] for d in detections],
        matched,
        [to_class(d["category_id"]) for d in detections],
        heads.num_classes,
    )
    heads.ohem_score_calibration.copy_(torch.as_tensor(params, dtype=torch.float32))
    return params


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ohem_d2.calibrate_scores",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--dataset", required=True, help="a registered held-out dataset")
    parser.add_argument("--output", required=True, help="the calibrated checkpoint (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.utils.logger import setup_logger

    from .config import add_ohem_config
    from .engine import Trainer, register_project_datasets
    from .engine.checkpoint import SafeDetectionCheckpointer
    from .model_zoo import merge_config_file

    args = parse_args(argv)
    setup_logger(name="ohem_d2")
    logger = logging.getLogger("ohem_d2")
    register_project_datasets()
    cfg = get_cfg()
    add_ohem_config(cfg)
    merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION = True
    cfg.freeze()
    model = Trainer.build_model(cfg)
    # The weights as trained; a checkpoint without the calibration buffer is expected here.
    SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    params = fit_model_calibration(cfg, model, args.dataset)
    logger.info(
        "Score calibration (a_c, b_c) per class, fitted on %s: %s", args.dataset, params.tolist()
    )
    folder, name = os.path.split(os.path.abspath(args.output))
    DetectionCheckpointer(model, save_dir=folder).save(os.path.splitext(name)[0])
    print(f"Written {args.output}: evaluate it with MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION True")
    return 0


if __name__ == "__main__":
    sys.exit(main())
