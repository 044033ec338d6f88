"""The toy dataset ``ohem_toy`` generated with its selective-search proposals, once.

A stamp file records the generator version and every parameter: the data are made again
only when it is missing or differs, and an interrupted proposal run resumes. The dataset
itself (names, layout, registration) is :mod:`ohem_d2.data.toy`.

Usage: ``python -m ohem_d2.proposals.toy --root datasets/ohem_toy``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict

from ..data.toy import (
    ToyDatasetSpec,
    default_toy_root,
    toy_image_ids,
    toy_proposal_file,
)
from ..data.toy_voc import write_voc_images
from ..fileio import write_atomic
from .compute import compute_proposal_file

__all__ = ["GENERATOR_VERSION", "generate_toy_dataset", "main"]

logger = logging.getLogger(__name__)

# Bump whenever the images, annotations or proposals for the same parameters change.
GENERATOR_VERSION = 1
_IMAGES_STAMP = ".images_stamp.json"
_STAMP = ".stamp.json"
_GENERATED = ("JPEGImages", "Annotations", "ImageSets", "proposals")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path, value):
    def write(f):
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")

    write_atomic(path, write, binary=False)


def _clear_generated(root: str) -> None:
    """Remove what an earlier run generated; refuse to touch a directory it did not make."""
    if not os.path.isdir(root):
        return
    ours = os.path.isfile(os.path.join(root, _IMAGES_STAMP)) or os.path.isfile(
        os.path.join(root, _STAMP)
    )
    foreign = [n for n in os.listdir(root) if n not in (*_GENERATED, _IMAGES_STAMP, _STAMP)]
    if foreign or (not ours and os.listdir(root)):
        raise RuntimeError(
            f"{root!r} is not empty and was not made by the ohem_toy generator "
            f"(it holds {sorted(os.listdir(root))[:5]}); refusing to overwrite it."
        )
    for name in (_STAMP, _IMAGES_STAMP):
        if os.path.exists(os.path.join(root, name)):
            os.remove(os.path.join(root, name))
    for name in _GENERATED:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def generate_toy_dataset(
    root: str | None = None,
    *,
    seed: int = 0,
    num_trainval: int = ToyDatasetSpec.num_trainval,
    num_test: int = ToyDatasetSpec.num_test,
    proposals: bool = True,
    workers: int | None = None,
    progress: bool = True,
    **spec_overrides,
) -> str:
    """Generate the dataset (and its selective-search proposals) under ``root``.

    Idempotent: a stamp file records the generator version and every parameter; the data
    are regenerated only when the stamp is missing or differs. An interrupted proposal run
    resumes. Equal parameters give byte-identical files.

    Args:
        root: target directory (default :func:`.default_toy_root`). It must be empty,
            missing, or made by this function.
        seed, num_trainval, num_test, **spec_overrides: fields of
            :class:`.ToyDatasetSpec`; each split needs at least 2 images (Detectron2's
            VOC loader fails on a one-line image set).
        proposals: also compute the proposal files.
        workers: processes for selective search (default: all cores).
        progress: show progress bars.

    Returns:
        ``root``.
    """
    root = default_toy_root() if root is None else os.fspath(root)
    spec = ToyDatasetSpec(seed=seed, num_trainval=num_trainval, num_test=num_test, **spec_overrides)
    if spec.num_trainval < 2 or spec.num_test < 2:
        raise ValueError("each split of the toy dataset needs at least 2 images")
    params = {"generator_version": GENERATOR_VERSION, **asdict(spec)}
    stamp = dict(params, proposals=proposals)
    if _read_json(os.path.join(root, _STAMP)) == stamp:
        logger.info("Toy dataset in %s is up to date.", root)
        return root

    start = time.perf_counter()
    if _read_json(os.path.join(root, _IMAGES_STAMP)) != params:
        _clear_generated(root)
        os.makedirs(root, exist_ok=True)
        stats = write_voc_images(root, spec)
        _write_json(os.path.join(root, _IMAGES_STAMP), params)
        logger.info(
            "Generated %d images (%d objects, %d difficult, %d truncated; cases %s) in %s "
            "in %.1f s.",
            spec.num_trainval + spec.num_test,
            stats["objects"],
            stats["difficult"],
            stats["truncated"],
            stats["cases"],
            root,
            time.perf_counter() - start,
        )
    elif os.path.exists(os.path.join(root, _STAMP)):
        os.remove(os.path.join(root, _STAMP))
    if proposals:
        for split, ids in toy_image_ids(spec).items():
            images = [(i, os.path.join(root, "JPEGImages", f"{i}.jpg")) for i in ids]
            out = toy_proposal_file(root, split)
            if os.path.exists(out):
                os.remove(out)
            run = compute_proposal_file(
                images,
                out,
                mode=spec.ss_mode,
                min_size=spec.ss_min_size,
                workers=workers,
                progress=progress,
                discard_stale_partial=True,
            )
            if not run.complete or run.skipped:
                raise RuntimeError(f"Selective search failed on {run.skipped} in {root!r}")
    _write_json(os.path.join(root, _STAMP), stamp)
    logger.info("Toy dataset ready in %s (%.1f s).", root, time.perf_counter() - start)
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ohem_d2.proposals.toy",
        description="Generate the toy dataset ohem_toy (VOC layout) and its "
        "selective-search proposals. Does nothing if it is already up to date.",
    )
    parser.add_argument("--root", default=None, help="default: $DETECTRON2_DATASETS/ohem_toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-trainval", type=int, default=ToyDatasetSpec.num_trainval)
    parser.add_argument("--num-test", type=int, default=ToyDatasetSpec.num_test)
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    root = generate_toy_dataset(
        args.root,
        seed=args.seed,
        num_trainval=args.num_trainval,
        num_test=args.num_test,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"ohem_toy ready in {root} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
