"""Training and evaluation of LazyConfig (``.py``) configs, as Detectron2's
``tools/lazyconfig_train_net.py`` does, with this project's safe checkpoint loading and a DDP
wrapper that also works for CPU models. ``train_net.py`` calls :func:`lazy_main` for ``.py``
config files.

A LazyConfig has Detectron2's ``common/train.py`` fields: ``model``, ``dataloader`` (``train``,
``test`` and ``evaluator``), ``optimizer``, ``lr_multiplier`` and ``train``.

Evaluation is Detectron2's single-scale inference: the paper's M and B (the YAML keys
``TEST.AUG``, ``TEST.ITERATIVE_BBOX_REG``, ``TEST.BOX_VOTING``; docs/options.md) are not
applied to a LazyConfig.
"""

import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..model_zoo import ConfigKindError
from .checkpoint import SafeDetectionCheckpointer, warn_if_from_scratch
from .trainer import ddp_device_ids

__all__ = ["LAZY_FIELDS", "do_test", "do_train", "lazy_main", "load_lazy_config"]

logger = logging.getLogger("ohem_d2")
LAZY_FIELDS = ("model", "dataloader", "optimizer", "lr_multiplier", "train")


def load_lazy_config(path, overrides=()):
    """``LazyConfig.load`` plus ``key=value`` overrides; a file without the fields of a
    training config raises :class:`ConfigKindError` naming what is missing."""
    cfg = LazyConfig.load(path)
    missing = [k for k in LAZY_FIELDS if k not in cfg]
    if missing:
        raise ConfigKindError(
            f"{path} lacks {', '.join(missing)}: a LazyConfig for train_net.py defines "
            f"{', '.join(LAZY_FIELDS)} (as Detectron2's common/train.py configs do)"
        )
    return LazyConfig.apply_overrides(cfg, list(overrides))


def _build_model(cfg):
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    return model


def do_test(cfg, model):
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``, with
    the model's own inference (no M, no B: those are YAML configs' keys)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(cfg, resume=False):
    """Train as Detectron2's lazyconfig_train_net does: SimpleTrainer (AMPTrainer with
    ``train.amp.enabled``), LR schedule, periodic checkpoints, evaluation and writers."""
    model = _build_model(cfg)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp, device_ids=ddp_device_ids(model))
    trainer_cls = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
    trainer = trainer_cls(model, train_loader, optimizer)
    checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    main = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main
            else None,
        ]
    )
    if main:
        warn_if_from_scratch(
            checkpointer, cfg.train.init_checkpoint, resume=resume, key="train.init_checkpoint"
        )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def lazy_main(args):
    """The per-process main of ``train_net.py`` for a LazyConfig file."""
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = _build_model(cfg)
        model = create_ddp_model(model, device_ids=ddp_device_ids(model))
        SafeDetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(cfg, resume=args.resume)
    return None
