"""Evaluators that follow the dataset: PASCAL VOC and/or COCO metrics."""

import json
import math
import os
import statistics
import tempfile
import xml.etree.ElementTree as ET
from collections import OrderedDict

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    PascalVOCDetectionEvaluator,
)
from detectron2.evaluation.pascal_voc_evaluation import voc_ap, voc_eval
from detectron2.utils import comm

from ..data.voc_xml import voc_annotation


class RenamedEvaluator(DatasetEvaluator):
    """Wraps an evaluator and renames its result's top-level keys (e.g. "bbox" -> "voc_bbox").

    Detectron2's VOC and COCO evaluators both report under "bbox", and DatasetEvaluators
    refuses two evaluators with the same key.
    """

    def __init__(self, evaluator: DatasetEvaluator, renames: dict):
        self.evaluator, self.renames = evaluator, dict(renames)

    def reset(self):
        self.evaluator.reset()

    def process(self, inputs, outputs):
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        results = self.evaluator.evaluate()
        if results is None:  # non-main ranks
            return None
        return {self.renames.get(k, k): v for k, v in results.items()}


def write_voc_annotations(dataset_dicts, class_names, annotations_dir, image_set_file):
    """Write Detectron2 dataset dicts (XYXY_ABS, as Detectron2's VOC loader makes them) as VOC
    XML files and an image-set file, so that Detectron2's `voc_eval` scores against them.

    The inverse of Detectron2's VOC loader: xmin, ymin + 1 (1-based inclusive pixels). No
    box is marked difficult (Detectron2's loader drops the flag).
    """
    os.makedirs(annotations_dir, exist_ok=True)
    for record in dataset_dicts:
        objects = [
            {"name": class_names[ann["category_id"]], "bbox": ann["bbox"]}
            for ann in record["annotations"]
        ]
        ET.ElementTree(voc_annotation(objects)).write(
            os.path.join(annotations_dir, f"{record['image_id']}.xml")
        )
    with open(image_set_file, "w") as f:
        f.write("".join(f"{r['image_id']}\n" for r in dataset_dicts))


class VOCDetectionEvaluator(PascalVOCDetectionEvaluator):
    """Detectron2's PASCAL VOC evaluator (its matching, `voc_eval`), reporting besides AP,
    AP50 and AP75 (in the dataset's year's metric, as Detectron2 does) the per-class AP50
    and the mAP50 under both the VOC07 11-point and the all-point (VOC2010+) metric.

    Datasets whose metadata has ``annotations_cleaned=True`` (BCCD: degenerate and duplicate
    boxes dropped when loading) are scored against their registered dataset dicts, written
    as VOC XML into a temporary folder, instead of the raw XML files on disk, so that the
    VOC and the COCO evaluators see the same ground truth.
    """

    def evaluate(self):
        # self._predictions is filled by the parent's process(); test_evaluation.py pins it.
        all_predictions = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        predictions = {}
        for per_rank in all_predictions:
            for cls_id, lines in per_rank.items():
                predictions.setdefault(cls_id, []).extend(lines)
        meta = MetadataCatalog.get(self._dataset_name)
        with tempfile.TemporaryDirectory(prefix="ohem_d2_voc_eval_") as tmp:
            anno_template, image_set = self._anno_file_template, self._image_set_path
            if meta.get("annotations_cleaned", False):
                image_set = os.path.join(tmp, "image_set.txt")
                write_voc_annotations(
                    DatasetCatalog.get(self._dataset_name),
                    self._class_names,
                    os.path.join(tmp, "annotations"),
                    image_set,
                )
                anno_template = os.path.join(tmp, "annotations", "{}.xml")
            res_template = os.path.join(tmp, "{}.txt")
            aps, ap50 = {t: [] for t in range(50, 100, 5)}, {"11point": [], "allpoint": []}
            for cls_id, cls_name in enumerate(self._class_names):
                with open(res_template.format(cls_name), "w") as f:
                    f.write("\n".join(predictions.get(cls_id, [""])))
                for thresh in aps:
                    rec, prec, ap = voc_eval(
                        res_template,
                        anno_template,
                        image_set,
                        cls_name,
                        ovthresh=thresh / 100.0,
                        use_07_metric=self._is_2007,
                    )
                    aps[thresh].append(ap * 100)
                    if thresh == 50:
                        ap50["11point"].append(voc_ap(rec, prec, True) * 100)
                        ap50["allpoint"].append(voc_ap(rec, prec, False) * 100)
        mean_ap = {t: float(np.mean(v)) for t, v in aps.items()}
        result = OrderedDict(
            AP=float(np.mean(list(mean_ap.values()))), AP50=mean_ap[50], AP75=mean_ap[75]
        )
        for metric, values in ap50.items():
            result[f"mAP50_{metric}"] = float(np.mean(values))
            for cls_name, value in zip(self._class_names, values):
                result[f"AP50_{metric}-{cls_name}"] = float(value)
        return OrderedDict(bbox=result)


def evaluation_tasks(cfg=None) -> tuple[str, ...]:
    """The COCO tasks the model predicts, as Detectron2's train_net chooses them: "bbox",
    plus "segm" with ``MODEL.MASK_ON`` and "keypoints" with ``MODEL.KEYPOINT_ON``."""
    tasks = ["bbox"]
    if cfg is not None and cfg.MODEL.MASK_ON:
        tasks.append("segm")
    if cfg is not None and cfg.MODEL.KEYPOINT_ON:
        tasks.append("keypoints")
    return tuple(tasks)


def build_detection_evaluator(dataset_name: str, output_dir: str, cfg=None) -> DatasetEvaluator:
    """VOC metrics ("voc_bbox": AP, AP50, AP75) for VOC-style datasets, COCO metrics
    ("bbox": AP, AP50, AP75, APs, APm, APl) for every dataset, COCO-style ones included, and
    COCO "segm" / "keypoints" AP when ``cfg`` is a mask / keypoint model."""
    meta = MetadataCatalog.get(dataset_name)
    evaluators = []
    # register_pascal_voc() sets no evaluator_type (Detectron2's builtin registration adds
    # it afterwards), so a VOC-layout dataset is also recognised by its VOC metadata.
    voc_metadata = all(meta.get(k, None) is not None for k in ("dirname", "year", "split"))
    if meta.get("evaluator_type", None) == "pascal_voc" or voc_metadata:
        evaluators.append(
            RenamedEvaluator(VOCDetectionEvaluator(dataset_name), {"bbox": "voc_bbox"})
        )
    # COCOEvaluator converts any registered detection dataset to COCO json when needed.
    evaluators.append(
        COCOEvaluator(
            dataset_name,
            tasks=evaluation_tasks(cfg),
            distributed=True,
            output_dir=os.path.join(output_dir, "inference", dataset_name),
            kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS if cfg is not None else (),
        )
    )
    return DatasetEvaluators(evaluators)


def cap_statistics(detections, num_images: int) -> dict:
    """What the per-image cap (``TEST.DETECTIONS_PER_IMAGE``) kept, from COCO-format
    detections (as :class:`COCOEvaluator` writes them to ``coco_instances_results.json``).

    Returns:
        ``mean_detections_per_image`` (over all ``num_images``, those without detections
        included) and ``median_lowest_kept_score``: the cap's bar, the median over images with
        detections of the lowest score an image keeps (None without any detection).
    """
    lowest = {}
    for d in detections:
        lowest[d["image_id"]] = min(d["score"], lowest.get(d["image_id"], math.inf))
    return {
        "mean_detections_per_image": len(detections) / max(num_images, 1),
        "median_lowest_kept_score": statistics.median(lowest.values()) if lowest else None,
    }


def detection_cap_statistics(results_file: str, num_images: int) -> dict:
    """:func:`cap_statistics` of the detections in a ``coco_instances_results.json``."""
    with open(results_file) as f:
        return cap_statistics(json.load(f), num_images)
