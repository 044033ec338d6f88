"""Keeping ``metrics.json`` consistent with the checkpoints across a crash and ``--resume``.

A run that dies between two checkpoints has logged metrics for iterations that the resumed
run does again. :func:`truncate_metrics` drops them before the resumed run appends, and
:class:`WriteMetricsAtCheckpoints` writes the metrics of every checkpointed iteration, so that
the log has a line for the iteration a run resumes after.
"""

from __future__ import annotations

import json
import logging
import os

from detectron2.engine import HookBase
from detectron2.utils.events import JSONWriter, TensorboardXWriter

__all__ = ["WriteMetricsAtCheckpoints", "truncate_metrics"]

logger = logging.getLogger(__name__)


def truncate_metrics(path: str, last_iteration: int) -> int:
    """Cut the JSON-lines file `path` before its first line about an iteration after
    `last_iteration` (or its first unreadable line, e.g. one cut short by a crash).

    Lines without an "iteration" key are kept. The file is cut in place, so that a
    :class:`~detectron2.utils.events.JSONWriter` that already has it open for appending
    keeps writing to it.

    Returns:
        the number of lines removed (0 when `path` does not exist).
    """
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        lines = f.readlines()
    keep_bytes = 0
    for i, line in enumerate(lines):
        try:
            iteration = json.loads(line).get("iteration", -1)
        except (ValueError, AttributeError):
            iteration = None
        if iteration is None or iteration > last_iteration or not line.endswith(b"\n"):
            removed = len(lines) - i
            os.truncate(path, keep_bytes)
            logger.info(
                "Removed %d line(s) after iteration %d from %s: that work is redone on resume.",
                removed,
                last_iteration,
                path,
            )
            return removed
        keep_bytes += len(line)
    return 0


class WriteMetricsAtCheckpoints(HookBase):
    """Write ``metrics.json`` (and TensorBoard events) at every iteration the periodic
    checkpointer saves, not only every 20 iterations.

    Place it after the evaluation hook (so that evaluation results of that iteration are
    included), before the checkpointer (so that a checkpoint never exists without its
    iteration's line) and before the periodic writer. Only writers that skip
    iterations they already wrote are run, so nothing is written or printed twice.
    """

    def __init__(self, writers, checkpoint_period: int):
        self.writers = [w for w in writers if isinstance(w, (JSONWriter, TensorboardXWriter))]
        self.checkpoint_period = checkpoint_period

    def after_step(self):
        if (self.trainer.iter + 1) % self.checkpoint_period == 0:
            for writer in self.writers:
                writer.write()
