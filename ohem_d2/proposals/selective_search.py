"""Command line: selective-search proposals of a registered dataset into a safe ``.npz``.

Usage::

    python -m ohem_d2.proposals.selective_search --dataset voc_2007_test \\
        --out datasets/proposals/ss_voc_2007_test.npz [--mode fast|quality] [--workers N]
    python -m ohem_d2.proposals.selective_search --dataset my_train \\
        --register-coco my_train /data/my/train.json /data/my/images --out ss_my_train.npz

``--register-coco`` / ``--register-voc`` register one's own dataset as ``train_net.py``'s do.

The boxes: :mod:`.search`; the run over many images, resumable: :mod:`.compute`.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures.process import BrokenProcessPool

from ..data.catalog import dataset_images
from ..engine.datasets import (
    REGISTER_OPTIONS,
    DatasetRegistrationError,
    add_dataset_registration_arguments,
    register_user_datasets,
)
from .cli import add_output_arguments, parse_command
from .compute import compute_proposal_file
from .partial import partial_dir
from .search import DEFAULT_MIN_SIZE, MODES

__all__ = ["main"]


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m ohem_d2.proposals.selective_search",
        description="Compute selective-search proposals of a Detectron2 dataset into a safe "
        ".npz proposal file. Interrupt at will: rerunning the same command resumes.",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="Detectron2 dataset name: a builtin or project one, or one registered with "
        "--register-coco / --register-voc",
    )
    add_dataset_registration_arguments(parser)
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes (default: all available cores)"
    )
    parser.add_argument(
        "--max-boxes", type=int, default=None, help="keep the K best-ranked boxes (default: all)"
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=DEFAULT_MIN_SIZE,
        help=f"drop boxes with a side below this many pixels (default {DEFAULT_MIN_SIZE}, "
        "as for Fast R-CNN's VOC boxes)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="compute at most N images in this run, then stop (a later run resumes)",
    )
    add_output_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = parse_command(_parser(), argv)
    if args is None:
        return 1
    try:
        register_user_datasets(coco=args.register_coco, voc=args.register_voc)
        images = dataset_images(args.dataset, toy_root=args.toy_root)
    except DatasetRegistrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyError as e:
        print(f"error: {e.args[0]}. Register your own with {REGISTER_OPTIONS}.", file=sys.stderr)
        return 1
    try:
        run = compute_proposal_file(
            images,
            args.out,
            mode=args.mode,
            min_size=args.min_size,
            max_boxes=args.max_boxes,
            workers=args.workers,
            stop_after=args.stop_after,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        return 130
    except BrokenProcessPool as e:
        print(
            f"A worker process died ({e}); out of memory, or OpenCV crashed on an image? "
            "Finished images are kept: run the same command again to resume.",
            file=sys.stderr,
        )
        return 1
    for image_id, path, reason in run.skipped:
        print(f"skipped {image_id}: {path}: {reason}", file=sys.stderr)
    done = run.computed + run.reused
    if run.complete:
        print(
            f"wrote {args.out}: {done} images ({run.computed} computed, {run.reused} resumed), "
            f"{run.boxes_per_image():.0f} boxes/image, {run.seconds:.1f} s; "
            f"{len(run.skipped)} unreadable image(s) skipped"
        )
        return 0
    print(
        f"stopped after {run.computed} images; {done}/{len(images)} done and kept in "
        f"{partial_dir(args.out)}; run the same command again to continue"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
