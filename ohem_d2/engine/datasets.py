"""Registration of the project's datasets, and of the user's own, for a training run."""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES
from detectron2.data.datasets.pascal_voc import register_pascal_voc

from ..data.bccd import register_bccd
from ..data.registration import is_registered_as
from ..data.toy import (
    TOY_DATASET_NAMES,
    default_toy_root,
    register_toy_dataset,
    toy_proposal_file,
)
from ..proposals.toy import generate_toy_dataset


def register_project_datasets():
    """Register the project's datasets, the toy ``ohem_toy_*`` and the shipped ``bccd_*``
    (Detectron2 registers VOC and COCO itself)."""
    register_toy_dataset()
    register_bccd()


class DatasetRegistrationError(ValueError):
    """A dataset given on the command line cannot be registered as asked."""


def add_dataset_registration_arguments(parser):
    """``--register-coco NAME JSON IMAGE_ROOT`` and ``--register-voc NAME DIRNAME SPLIT
    CLASSES`` (repeatable; ``args.register_coco`` / ``args.register_voc``, lists of tuples to
    pass to :func:`register_user_datasets`): the options of ``train_net.py`` and of the
    proposal command lines."""
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    parser.add_argument(
        "--register-voc",
        nargs=4,
        action="append",
        default=[],
        metavar=("NAME", "DIRNAME", "SPLIT", "CLASSES"),
        help="register a PASCAL VOC-layout dataset under NAME; CLASSES: comma-separated class "
        "names, or 'voc' for the 20 PASCAL classes (repeatable)",
    )


def register_user_datasets(coco=(), voc=()):
    """Register the user's own datasets, so that a config can name them in DATASETS.TRAIN /
    DATASETS.TEST without editing any script (``train_net.py --register-coco / --register-voc``).

    Args:
        coco: (name, json_file, image_root) triples: COCO-format instance annotations
            (boxes, and masks or keypoints when the file has them), registered with
            Detectron2's ``register_coco_instances``.
        voc: (name, dirname, split, classes) tuples: a PASCAL VOC layout (``Annotations/``,
            ``JPEGImages/``, ``ImageSets/Main/<split>.txt``) registered with Detectron2's
            ``register_pascal_voc``; ``classes`` is a comma-separated list of class names, or
            "voc" for the 20 PASCAL classes.

    Returns:
        The names, in order. A name registered again for the same files is left as it is;
        a name registered for other files, a missing file or folder, or an empty class list
        raises :class:`DatasetRegistrationError`.
    """
    names = []
    for name, json_file, image_root in coco:
        names.append(name)
        if _registered_as(name, json_file=json_file, image_root=image_root):
            continue
        _check_exists(json_file, "COCO annotation file", name)
        _check_exists(image_root, "image folder", name)
        register_coco_instances(name, {}, json_file, image_root)
    for name, dirname, split, classes in voc:
        names.append(name)
        if _registered_as(name, dirname=dirname, split=split):
            continue
        image_set = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
        _check_exists(image_set, "VOC image set", name)
        if classes == "voc":
            class_names = list(VOC_CLASS_NAMES)
        else:
            class_names = [c.strip() for c in classes.split(",") if c.strip()]
        if not class_names:
            raise DatasetRegistrationError(f"dataset {name!r}: no class names in {classes!r}")
        # The year only selects VOC07's 11-point AP (2007) or the all-point AP (2012).
        register_pascal_voc(name, dirname, split, 2012, class_names)
    return names


REGISTER_OPTIONS = (
    "--register-coco NAME JSON IMAGE_ROOT (COCO format) or --register-voc NAME DIRNAME SPLIT "
    "CLASSES (PASCAL VOC layout)"
)
# Metadata of Detectron2's COCO and VOC registrations (and the project's) naming the files.
_DATASET_FILES = (
    ("json_file", "annotation file"),
    ("image_root", "image folder"),
    ("dirname", "folder"),
)


def check_datasets(names_by_key):
    """Raise :class:`DatasetRegistrationError` if a dataset named by a config is not
    registered, or is registered for files that are not there.

    Detectron2 resolves a name only when a data loader is built: DATASETS.TEST's after
    training has ended, so a wrong test set (e.g. a zoo config's ``coco_2017_val`` left in
    place when training on one's own data) would fail only then.

    Args:
        names_by_key: {config key: dataset names}, e.g. {"DATASETS.TEST": ("my_val",)}.
    """
    registered = set(DatasetCatalog.list())
    for key, names in names_by_key.items():
        for name in names:
            if name not in registered:
                raise DatasetRegistrationError(
                    f"{key} names dataset {name!r}, which is not registered. Register your "
                    f"own with train_net.py {REGISTER_OPTIONS}, or name a registered one "
                    "(Detectron2's builtin ones, ohem_toy_*, bccd_*)."
                )
            meta = MetadataCatalog.get(name)
            for field, what in _DATASET_FILES:
                path = meta.get(field, None)
                if isinstance(path, str) and not os.path.exists(path):
                    raise DatasetRegistrationError(
                        f"{key} names dataset {name!r}, whose {what} {path} does not exist "
                        "(Detectron2's builtin datasets are looked for under "
                        "$DETECTRON2_DATASETS, default ./datasets). To use your own data, "
                        f"register it with {REGISTER_OPTIONS} and name it in {key}."
                    )


def _registered_as(name, **metadata):
    """True if ``name`` is registered with this metadata already (a second call in the same
    process); raise if it is registered as something else."""
    return is_registered_as(
        name,
        metadata,
        lambda _: DatasetRegistrationError(
            f"dataset {name!r} is already registered for other files (Detectron2's builtin "
            "datasets and the project's own are registered); choose another name"
        ),
    )


def _check_exists(path, what, name):
    if not os.path.exists(path):
        raise DatasetRegistrationError(f"dataset {name!r}: {what} {path} does not exist")


def prepare_toy_dataset(cfg):
    """Generate the toy dataset and its proposals if `cfg` uses it and none is there.

    An existing one is kept as it is, whatever parameters made it (tests make small ones).
    """
    if not set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST) & set(TOY_DATASET_NAMES):
        return
    root = default_toy_root()
    if not all(os.path.exists(toy_proposal_file(root, s)) for s in ("trainval", "test")):
        generate_toy_dataset(root)
