#!/usr/bin/env python
"""Train or evaluate Fast R-CNN / OHEM detectors with Detectron2's trainer and launcher.

python train_net.py --config-file configs/frcn_vgg16_ohem.yaml --num-gpus 4
python train_net.py --config-file configs/frcn_vgg16_ohem.yaml --eval-only MODEL.WEIGHTS m.pth
python train_net.py --config-file configs/lazy/mask_rcnn_fpn_ohem.py train.device=cpu

YAML configs take ``KEY VALUE`` overrides, LazyConfig ``.py`` files ``path.key=value`` ones.
``--register-coco`` / ``--register-voc`` register one's own datasets for DATASETS.TRAIN/TEST
(or a LazyConfig's ``dataloader.*.dataset.names``) without editing this script.
"""

import sys

import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.utils import comm

import ohem_d2
from ohem_d2.engine import Trainer, prepare_toy_dataset, register_project_datasets
from ohem_d2.engine.allocator import ALLOCATORS, allocator_in_use, relaunch_with_allocator
from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer
from ohem_d2.engine.datasets import (
    DatasetRegistrationError,
    add_dataset_registration_arguments,
    check_datasets,
    register_user_datasets,
)
from ohem_d2.engine.distributed import DistributedSetupError, check_devices, check_dist_url
from ohem_d2.model_zoo import ConfigKindError, is_lazy_config, merge_config_file


def build_cfg(args):
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def register_datasets(args):
    register_project_datasets()
    register_user_datasets(coco=args.register_coco, voc=args.register_voc)


def main(args):
    register_datasets(args)
    if is_lazy_config(args.config_file):
        from ohem_d2.engine.lazy import lazy_main

        return lazy_main(args)
    cfg = build_cfg(args)
    default_setup(cfg, args)
    print(f"Memory allocator of rank {comm.get_rank()}: {allocator_in_use()}", flush=True)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # Strict shapes: a model evaluated with a skipped predictor would score at random.
        SafeDetectionCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, skip_mismatched_init=False
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def scaled_batch(cfg, world_size):
    """SOLVER.IMS_PER_BATCH after Detectron2's auto_scale_workers for `world_size` processes
    (DistributedSetupError where the scaling itself cannot be done)."""
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if reference and cfg.SOLVER.IMS_PER_BATCH % reference:
        raise DistributedSetupError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by "
            f"SOLVER.REFERENCE_WORLD_SIZE ({reference}), the processes it was set for."
        )
    return DefaultTrainer.auto_scale_workers(cfg, world_size).SOLVER.IMS_PER_BATCH


def check_setup(args):
    """Fail before the launch, with a message naming the option, where the workers would
    fail; return the line that says which processes will run."""
    # Registered here too, so that a bad dataset argument fails before the launch.
    register_datasets(args)
    world_size = args.num_gpus * args.num_machines
    if is_lazy_config(args.config_file):
        from ohem_d2.engine.lazy import load_lazy_config

        lazy = load_lazy_config(args.config_file, args.opts)
        device, ims_per_batch, cfg = lazy.train.device, lazy.dataloader.train.total_batch_size, None
        device_key, batch_key, hint = "train.device", "dataloader.train.total_batch_size", ""
        train_sets, test_sets = (
            (f"dataloader.{split}.dataset.names", _lazy_dataset_names(lazy, split))
            for split in ("train", "test")
        )
    else:
        cfg = build_cfg(args)
        device, device_key, batch_key = cfg.MODEL.DEVICE, "MODEL.DEVICE", "SOLVER.IMS_PER_BATCH"
        # The batch the workers will split: Trainer scales it first (auto_scale_workers).
        ims_per_batch = scaled_batch(cfg, world_size)
        hint = (
            " Or set SOLVER.REFERENCE_WORLD_SIZE to the number of processes the batch and "
            "schedule were set for: Detectron2 then scales them to this run's."
        )
        train_sets, test_sets = (
            ("DATASETS.TRAIN", cfg.DATASETS.TRAIN),
            ("DATASETS.TEST", cfg.DATASETS.TEST),
        )
    processes = check_devices(
        device,
        num_processes=args.num_gpus,
        world_size=world_size,
        ims_per_batch=ims_per_batch,
        cuda_available=torch.cuda.is_available(),
        cuda_device_count=torch.cuda.device_count(),
        device_key=device_key,
        batch_key=batch_key,
        hint=hint,
    )
    check_dist_url(args.dist_url, world_size=world_size, machine_rank=args.machine_rank)
    if cfg is not None:
        # Generated once here, before any worker process starts (a no-op when present).
        prepare_toy_dataset(cfg)
    # Detectron2 looks a dataset up when its loader is built: the test set's only after
    # training has ended. Evaluation reads no training set.
    check_datasets(dict([test_sets] if args.eval_only else [train_sets, test_sets]))
    return processes


def _lazy_dataset_names(lazy, split):
    """The dataset names of a LazyConfig's ``dataloader.<split>`` (Detectron2's
    ``get_detection_dataset_dicts(names=...)``), () where it has none."""
    try:
        names = lazy.dataloader[split].dataset.names
    except (AttributeError, KeyError):
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def parse_args():
    parser = default_argument_parser()
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="auto",
        help="CPU memory allocator: jemalloc keeps long runs' memory flat (auto: when found)",
    )
    add_dataset_registration_arguments(parser)
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    relaunch_with_allocator(args.allocator)
    print("Command Line Args:", args)
    print("Memory allocator:", allocator_in_use(), flush=True)
    try:
        print("Processes on this machine:", check_setup(args), flush=True)
    except (ConfigKindError, DatasetRegistrationError, DistributedSetupError) as e:
        sys.exit(f"ERROR: {e}")
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
