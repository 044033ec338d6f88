"""The resumable store of a proposal run: finished images kept in ``<out>.partial/``.

Chunks of finished images are written atomically in the safe ``.npz`` format, next to a
``meta.json`` that records what the run computes (settings, OpenCV version, the images), so
that a later run with the same signature takes them over and any other run refuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import cv2
import numpy as np

from ..data.proposal_io import ProposalFileError, read_proposal_file, save_proposals_npz
from ..fileio import write_atomic
from ..proposal_rules import rank_scores
from .search import ALGORITHM_VERSION

__all__ = ["ChunkWriter", "StalePartialError", "load_partial", "partial_dir", "run_signature"]

logger = logging.getLogger(__name__)

_PARTIAL_META = "meta.json"


def partial_dir(out_path: str) -> str:
    """The folder that keeps the finished images of the run that writes ``out_path``."""
    return out_path + ".partial"


def run_signature(images, mode, min_size, max_boxes) -> dict:
    """What a run computes: two runs with the same signature compute the same boxes."""
    digest = hashlib.sha256()
    for image_id, path in images:
        digest.update(f"{image_id}\0{os.path.abspath(path)}\n".encode())
    return {
        "algorithm_version": ALGORITHM_VERSION,
        "opencv": cv2.__version__,
        "mode": mode,
        "min_size": int(min_size),
        "max_boxes": None if max_boxes is None else int(max_boxes),
        "num_images": len(images),
        "images_sha256": digest.hexdigest(),
    }


class StalePartialError(RuntimeError):
    """The partial results were computed with other settings or images."""


def load_partial(partial: str, signature: dict) -> dict[str, np.ndarray]:
    """Boxes of the images finished by an earlier run with the same signature."""
    meta_path = os.path.join(partial, _PARTIAL_META)
    if not os.path.isfile(meta_path):
        return {}
    with open(meta_path) as f:
        meta = json.load(f)
    if meta != signature:
        changed = sorted(k for k in signature if meta.get(k) != signature[k])
        raise StalePartialError(
            f"The partial results in {partial!r} were computed with other settings or images "
            f"({', '.join(changed)} differ). Delete that directory to start afresh."
        )
    done = {}
    for name in sorted(os.listdir(partial)):
        if not (name.startswith("chunk-") and name.endswith(".npz")):
            continue
        try:
            chunk = read_proposal_file(os.path.join(partial, name))
        except ProposalFileError as e:
            logger.warning("Ignoring an unreadable partial chunk: %s", e)
            continue
        done.update(zip(chunk.ids, chunk.boxes))
    return done


class ChunkWriter:
    """Writes finished images to numbered chunk files of the partial directory."""

    def __init__(self, partial: str, signature: dict):
        os.makedirs(partial, exist_ok=True)
        meta_path = os.path.join(partial, _PARTIAL_META)
        if not os.path.isfile(meta_path):
            write_atomic(
                meta_path,
                lambda f: json.dump(signature, f, indent=1, sort_keys=True),
                binary=False,
            )
        numbers = [
            int(n[len("chunk-") : -len(".npz")])
            for n in os.listdir(partial)
            if n.startswith("chunk-") and n.endswith(".npz")
        ]
        self._partial = partial
        self._next = max(numbers, default=-1) + 1
        self._ids: list[str] = []
        self._boxes: list[np.ndarray] = []

    def add(self, image_id: str, boxes: np.ndarray) -> None:
        self._ids.append(image_id)
        self._boxes.append(boxes)

    def __len__(self) -> int:
        return len(self._ids)

    def flush(self) -> None:
        if not self._ids:
            return
        path = os.path.join(self._partial, f"chunk-{self._next:06d}.npz")
        save_proposals_npz(path, self._ids, self._boxes, [rank_scores(b) for b in self._boxes])
        self._next += 1
        self._ids, self._boxes = [], []
