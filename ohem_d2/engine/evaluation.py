"""Evaluators that follow the dataset: PASCAL VOC and/or COCO metrics."""

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    PascalVOCDetectionEvaluator,
)


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


def build_detection_evaluator(dataset_name: str, output_dir: str) -> DatasetEvaluator:
    """VOC metrics ("voc_bbox": AP, AP50, AP75) for VOC-style datasets, COCO metrics
    ("bbox": AP, AP50, AP75, APs, APm, APl) for every dataset, COCO-style ones included."""
    meta = MetadataCatalog.get(dataset_name)
    evaluators = []
    # register_pascal_voc() sets no evaluator_type (Detectron2's builtin registration adds
    # it afterwards), so a VOC-layout dataset is also recognised by its VOC metadata.
    voc_metadata = all(meta.get(k, None) is not None for k in ("dirname", "year", "split"))
    if meta.get("evaluator_type", None) == "pascal_voc" or voc_metadata:
        evaluators.append(
            RenamedEvaluator(PascalVOCDetectionEvaluator(dataset_name), {"bbox": "voc_bbox"})
        )
    # COCOEvaluator converts any registered detection dataset to COCO json when needed.
    evaluators.append(
        COCOEvaluator(
            dataset_name,
            tasks=("bbox",),
            distributed=True,
            output_dir=os.path.join(output_dir, "inference", dataset_name),
        )
    )
    return DatasetEvaluators(evaluators)
