#!/usr/bin/env python
"""Train or evaluate Fast R-CNN / OHEM detectors with Detectron2's trainer and launcher.

python train_net.py --config-file configs/frcn_vgg16_ohem.yaml --num-gpus 4
python train_net.py --config-file configs/frcn_vgg16_ohem.yaml --eval-only MODEL.WEIGHTS m.pth
"""

import sys

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm

import ohem_d2
from ohem_d2.engine import Trainer, prepare_embedded_dataset, register_project_datasets
from ohem_d2.engine.allocator import ALLOCATORS, allocator_in_use, relaunch_with_allocator
from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer
from ohem_d2.engine.distributed import DistributedSetupError, check_dist_url


def build_cfg(args):
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def main(args):
    cfg = build_cfg(args)
    default_setup(cfg, args)
    print(f"Memory allocator of rank {comm.get_rank()}: {allocator_in_use()}", flush=True)
    register_project_datasets()
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="auto",
        help="CPU memory allocator: jemalloc keeps long runs' memory flat (auto: when found)",
    )
    args = parser.parse_args()
    relaunch_with_allocator(args.allocator)
    print("Command Line Args:", args)
    print("Memory allocator:", allocator_in_use(), flush=True)
    # Generated once here, before any worker process starts (a no-op when present).
    prepare_embedded_dataset(build_cfg(args))
    try:
        check_dist_url(
            args.dist_url,
            world_size=args.num_gpus * args.num_machines,
            machine_rank=args.machine_rank,
        )
    except DistributedSetupError as e:
        sys.exit(f"ERROR: {e}")
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
