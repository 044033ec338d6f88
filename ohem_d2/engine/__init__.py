from .datasets import prepare_toy_dataset, register_project_datasets
from .evaluation import RenamedEvaluator, build_detection_evaluator
from .trainer import Trainer, ddp_device_ids

__all__ = [
    "RenamedEvaluator",
    "Trainer",
    "build_detection_evaluator",
    "ddp_device_ids",
    "prepare_toy_dataset",
    "register_project_datasets",
]
