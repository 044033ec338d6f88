"""Detectron2's DefaultTrainer with proposal-aware data loaders, dataset-following
evaluators, a DDP wrapper that also works for CPU models, safe and strict checkpoint loading,
and a ``metrics.json`` that stays consistent across a crash and ``--resume``."""

import logging
import os
import weakref
from collections import OrderedDict

from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.hooks import PeriodicCheckpointer
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..modeling.iterative_box_regression import (
    BoxRefinementSettings,
    IterativeBoxRegressionWithVoting,
)
from ..modeling.multiscale import MultiScaleRCNN
from .checkpoint import SafeDetectionCheckpointer, warn_if_from_scratch
from .evaluation import build_detection_evaluator
from .loaders import (
    build_multiscale_test_loader,
    build_test_loader_with_proposals,
    build_train_loader_with_proposals,
)
from .resume import WriteMetricsAtCheckpoints, truncate_metrics


def ddp_device_ids(model):
    """DDP's `device_ids`: this rank's GPU for a CUDA model, None for a CPU model (DDP
    refuses device ids for CPU modules, which Detectron2's create_ddp_model always passes)."""
    device = next(model.parameters()).device
    return [comm.get_local_rank()] if device.type == "cuda" else None


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__ with the two changes it offers no seam for: the DDP
        # wrapper's device ids (create_ddp_model's default [local_rank] fails for a CPU
        # model) and the checkpointer's class. tests/test_upstream_seams.py compares the two
        # bodies step by step: it fails when Detectron2's changes.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=ddp_device_ids(model))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        if comm.is_main_process():
            warn_if_from_scratch(
                self.checkpointer, self.cfg.MODEL.WEIGHTS, resume=resume, key="MODEL.WEIGHTS"
            )
        super().resume_or_load(resume=resume)
        if resume and comm.is_main_process():
            # Metrics logged after the checkpoint describe work that is lost and redone now.
            truncate_metrics(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter - 1)
            final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
            if self.start_iter >= self.max_iter and not os.path.exists(final):
                # Killed after the last iteration's checkpoint but before model_final.pth:
                # there is nothing left to train, so write the final checkpoint from it.
                self.checkpointer.save("model_final", iteration=self.start_iter - 1)

    def build_writers(self):
        self._metric_writers = super().build_writers()
        return self._metric_writers

    def build_hooks(self):
        hooks = super().build_hooks()
        if comm.is_main_process():
            # Order at a checkpointed iteration: evaluation, its metrics line, the checkpoint.
            # A run killed in between then resumes from a checkpoint whose metrics line is
            # on disk (Detectron2 checkpoints before evaluating and writing, so a kill right
            # after the checkpoint would lose that iteration's line for good).
            (checkpointer,) = [h for h in hooks if isinstance(h, PeriodicCheckpointer)]
            hooks.remove(checkpointer)
            at_checkpoints = WriteMetricsAtCheckpoints(
                self._metric_writers, self.cfg.SOLVER.CHECKPOINT_PERIOD
            )
            # Before the periodic writer, the last hook.
            hooks[-1:-1] = [at_checkpoints, checkpointer]
        return hooks

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.MODEL.LOAD_PROPOSALS:
            return build_train_loader_with_proposals(cfg)
        return super().build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if cfg.MODEL.LOAD_PROPOSALS:
            return build_test_loader_with_proposals(cfg, dataset_name)
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        return build_detection_evaluator(dataset_name, cfg.OUTPUT_DIR, cfg)

    @staticmethod
    def with_box_refinement(cfg, model):
        """`model` for single-scale inference: wrapped in
        :class:`IterativeBoxRegressionWithVoting` when TEST.ITERATIVE_BBOX_REG or
        TEST.BOX_VOTING is on, else as it is."""
        settings = BoxRefinementSettings.from_config(cfg)
        return IterativeBoxRegressionWithVoting(model, settings) if settings.enabled else model

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's single-scale evaluation, with B when it is on
        (:meth:`with_box_refinement`)."""
        return super().test(cfg, cls.with_box_refinement(cfg, model), evaluators)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Multi-scale testing (TEST.AUG.*, with B if on) of ``model`` on every test dataset,
        as Detectron2's tools/train_net.py runs its test-time augmentation: results under
        ``<dataset>_TTA``, evaluator outputs under ``OUTPUT_DIR/inference_TTA``."""
        logger = logging.getLogger("detectron2.trainer")
        logger.info(
            "Multi-scale testing at scales %s (longer side <= %d)",
            list(cfg.TEST.AUG.MIN_SIZES),
            cfg.TEST.AUG.MAX_SIZE,
        )
        model = MultiScaleRCNN(cfg, model)
        results = OrderedDict()
        for name in cfg.DATASETS.TEST:
            evaluator = build_detection_evaluator(
                name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA"), cfg
            )
            results[name + "_TTA"] = inference_on_dataset(
                model, build_multiscale_test_loader(cfg, name), evaluator
            )
            if comm.is_main_process():
                logger.info("Evaluation results for %s (multi-scale) in csv format:", name)
                print_csv_format(results[name + "_TTA"])
        return results


__all__ = ["Trainer", "ddp_device_ids"]
