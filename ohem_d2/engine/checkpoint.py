"""Checkpoint loading that cannot run code and refuses a checkpoint that does not fit the model.

Detectron2's :class:`DetectionCheckpointer` unpickles ``.pkl`` files with ``pickle.load``
(a downloaded file can run any code) and only warns when a tensor's shape differs from the
model's (a checkpoint trained for another number of classes then silently keeps a randomly
initialised predictor). :class:`SafeDetectionCheckpointer` reads ``.pth`` files with
``torch.load(..., weights_only=True)``, ``.pkl`` files with an unpickler that builds only
numpy arrays and plain containers. Initialising a model from other weights
(``resume_or_load`` without a checkpoint to resume: ``MODEL.WEIGHTS``,
``train.init_checkpoint``) skips tensors whose shape differs and logs them, as Detectron2
does, so that fine-tuning on another label set works. Resuming a run, and every direct
``load``, raise :class:`CheckpointMismatchError` on any shape mismatch instead: there a
skipped tensor is a mistake. It also writes checkpoints atomically (a temporary file, then
a rename), so that a job killed while saving leaves the previous checkpoint and a valid
``last_checkpoint``.
"""

from __future__ import annotations

import logging
import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from ..fileio import write_atomic

__all__ = [
    "CheckpointMismatchError",
    "SafeDetectionCheckpointer",
    "UnsafeCheckpointError",
    "warn_if_from_scratch",
]

logger = logging.getLogger(__name__)

# What a Detectron2 / Detectron (Caffe2) model-zoo pickle may contain: numpy arrays (also
# from numpy < 2, whose module was numpy.core), their dtypes and scalars, and the byte
# strings of Python 2 pickles. Nothing here calls user-controlled code.
_SAFE_PICKLE_GLOBALS = frozenset(
    [
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    ]
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint pickle refers to a Python object that loading would have to construct or
    call (it may run code)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not have the shapes of the model built from the config."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _SAFE_PICKLE_GLOBALS or (
            module.startswith("numpy") and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"Checkpoint {self.path!r} refers to the Python object {module}.{name}; loading "
            "it could run arbitrary code, so it is refused. Only numpy arrays, numbers, "
            "strings and plain containers are read from .pkl checkpoints; convert the file "
            "to a .pth of tensors (torch.save of a state dict) from a trusted environment."
        )


def load_pickle_arrays_only(path: str):
    """Unpickle `path`, building only numpy arrays and plain Python containers.

    Raises:
        UnsafeCheckpointError: the pickle names any other Python object.
    """
    with PathManager.open(path, "rb") as f:
        return _ArraysOnlyUnpickler(f, path).load()


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that never runs code from a checkpoint file.

    Shapes: ``resume_or_load(path, resume=...)`` initialising from `path` (nothing to resume)
    skips and logs tensors of another shape, with Detectron2's message, unless
    `skip_mismatched_init` is False (evaluation: a skipped predictor would be evaluated at
    random). Resuming a run and ``load`` raise :class:`CheckpointMismatchError` (naming the
    file, the key and both shapes).
    """

    def __init__(self, model, save_dir="", *, skip_mismatched_init=True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.skip_mismatched_init = skip_mismatched_init
        self._strict_shapes = True

    def resume_or_load(self, path, *, resume=True):
        resuming = resume and self.has_checkpoint()
        self._strict_shapes = resuming or not self.skip_mismatched_init
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._strict_shapes = True

    def save(self, name: str, **kwargs) -> None:
        if "://" in self.save_dir:  # a remote store: no rename there
            return super().save(name, **kwargs)
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        write_atomic(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        write_atomic(path, lambda f: f.write(last_filename_basename.encode()))

    # Loading goes through three hooks of DetectionCheckpointer.load:
    # - _load_file (the one fvcore documents as overridable) reads .pkl files here;
    # - _torch_load, which Detectron2's _load_file calls for every other file but .pyth;
    # - _load_model, whose result fvcore's load() would only log.
    # The last two are private: tests/test_upstream_seams.py fails if load() stops calling
    # them (a code-running .pth loads, or a wrong shape is skipped with a warning).

    def _load_file(self, filename):
        self._loading = filename
        if filename.endswith(".pkl"):
            data = load_pickle_arrays_only(filename)
            # The same interpretation as DetectionCheckpointer._load_file.
            if "model" in data and "__author__" in data:
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f):
        # Explicit, whatever the torch version's default: tensors and plain containers only.
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if incompatible.incorrect_shapes and self._strict_shapes:
            raise _mismatch_error(self._loading, incompatible.incorrect_shapes)
        # Otherwise fvcore's load() logs each skipped key, as Detectron2 does.
        return incompatible


def warn_if_from_scratch(checkpointer, path: str, *, resume: bool, key: str) -> bool:
    """Log a warning, and return True, if ``checkpointer.resume_or_load(path, resume=resume)``
    would leave the model as initialised: no checkpoint to resume and an empty `path` (the
    config key `key`). fvcore says so only at INFO level ("No checkpoint found.
    Initializing model from scratch"), easily missed when a run was meant to fine-tune."""
    if path or (resume and checkpointer.has_checkpoint()):
        return False
    logging.getLogger("detectron2.trainer").warning(
        "%s is empty: training starts from random initialisation, with no pretrained "
        "weights. Set %s to a checkpoint, e.g. ImageNet weights converted with "
        "python -m ohem_d2.convert_weights, or a Detectron2 model-zoo .pkl.",
        key,
        key,
    )
    return True


def _mismatch_error(path: str, incorrect_shapes) -> CheckpointMismatchError:
    """The error for the (key, shape in checkpoint, shape in model) triples of fvcore's
    ``incorrect_shapes``, naming `path`, the first key and both of its shapes."""
    key, shape_checkpoint, shape_model = incorrect_shapes[0]
    others = [k for k, _, _ in incorrect_shapes[1:]]
    hint = ""
    if "box_predictor" in key:
        hint = (
            " The box predictor's shapes follow MODEL.ROI_HEADS.NUM_CLASSES (cls_score "
            "has NUM_CLASSES + 1 rows): the checkpoint was trained for another number "
            "of classes than the config says."
        )
    return CheckpointMismatchError(
        f"Checkpoint {path!r} does not fit the model built from the config: "
        f"{key!r} has shape {tuple(shape_checkpoint)} in the checkpoint but "
        f"{tuple(shape_model)} in the model"
        + (f" (and {len(others)} more key(s): {others})" if others else "")
        + "."
        + hint
        + " Initialising a new run from it (MODEL.WEIGHTS / train.init_checkpoint, without "
        "--resume) skips these keys and trains them from scratch."
    )
