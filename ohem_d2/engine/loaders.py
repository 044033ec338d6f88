"""Data loaders that attach precomputed proposals to Detectron2's dataset dicts."""

import itertools
import logging
import sys

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.build import (
    filter_images_with_only_crowd_annotations,
    print_instances_class_histogram,
)
from detectron2.data.detection_utils import check_metadata_consistency

from ..data.proposal_io import load_proposals_into_dataset_dicts

logger = logging.getLogger(__name__)


def dataset_dicts_with_proposals(names, proposal_files, *, filter_empty, trusted):
    """Load datasets `names` and attach each one's proposal file (one file per dataset).

    Returns the concatenated list of dataset dicts; with `filter_empty`, images without
    (non-crowd) annotations are dropped and counted in the log, as Detectron2 does.
    """
    names, proposal_files = list(names), list(proposal_files)
    if not names:
        raise ValueError("No dataset given (DATASETS.TRAIN / DATASETS.TEST is empty)")
    if len(proposal_files) != len(names):
        raise ValueError(
            f"DATASETS.PROPOSAL_FILES_* must list one proposal file per dataset: got "
            f"{len(proposal_files)} file(s) {proposal_files} for dataset(s) {names}"
        )
    per_dataset = []
    for name, proposal_file in zip(names, proposal_files):
        if name not in DatasetCatalog:
            raise KeyError(
                f"Dataset {name!r} is not registered. Registered: {sorted(DatasetCatalog)}"
            )
        dicts = DatasetCatalog.get(name)
        if len(dicts) == 0:
            raise ValueError(f"Dataset {name!r} is empty: no image to train or test on")
        per_dataset.append(load_proposals_into_dataset_dicts(dicts, proposal_file, trusted=trusted))
    if len(names) > 1:
        check_metadata_consistency("thing_classes", names)
    dataset = list(itertools.chain.from_iterable(per_dataset))
    if filter_empty and "annotations" in dataset[0]:
        dataset = filter_images_with_only_crowd_annotations(dataset)
        if not dataset:
            raise ValueError(f"Datasets {names} have no image with annotations")
        classes = MetadataCatalog.get(names[0]).get("thing_classes", None)
        if classes is not None:
            print_instances_class_histogram(dataset, classes)
    return dataset


def proposal_mapper(cfg, is_train, *, max_consecutive_unreadable=50):
    """Detectron2's DatasetMapper, keeping every proposal of the file, wrapped so that an
    image that cannot be read is skipped in training and named in the error at test time.

    The mapper resizes and flips the proposals with the image; choosing which of them the
    ROI heads see (min size, de-duplication, top-k) is the proposal generator's job.
    """
    kwargs = DatasetMapper.from_config(cfg, is_train)
    kwargs["precomputed_proposal_topk"] = sys.maxsize
    return UnreadableImageGuard(
        DatasetMapper(**kwargs), skip=is_train, max_consecutive=max_consecutive_unreadable
    )


class UnreadableImageError(OSError):
    """An image file of the dataset is missing, corrupt or truncated."""


class UnreadableImageGuard:
    """Wraps a dataset mapper; handles images that cannot be read (OSError while decoding).

    With ``skip`` (training), such an image is logged with its path and a running count and
    the mapper returns None, on which Detectron2's MapDataset maps another random image
    instead: a bad file costs one warning, not a crash hours into a run. After
    ``max_consecutive`` unreadable images in a row it raises, since then the dataset (not an
    image) is broken; give at most the dataset's size, since MapDataset fails with an unclear
    error once it has no readable image left to try. Without ``skip`` (evaluation, where
    every image must be scored), it raises :class:`UnreadableImageError` naming the file.
    """

    def __init__(self, mapper, *, skip: bool, max_consecutive: int = 50):
        self.mapper, self.skip, self.max_consecutive = mapper, skip, max_consecutive
        self.skipped: set[str] = set()
        self.consecutive = 0

    def __call__(self, dataset_dict):
        path = dataset_dict.get("file_name", "<no file_name>")
        try:
            mapped = self.mapper(dataset_dict)
        except OSError as e:
            message = f"Cannot read image {path!r}: {type(e).__name__}: {e}"
            if not self.skip:
                raise UnreadableImageError(message) from e
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                raise UnreadableImageError(
                    f"{self.consecutive} images in a row could not be read; last: {message}"
                ) from e
            if path not in self.skipped:
                self.skipped.add(path)
                logger.warning(
                    "%s. Skipped; training uses another image instead "
                    "(%d unreadable image(s) skipped so far in this process).",
                    message,
                    len(self.skipped),
                )
            return None
        self.consecutive = 0
        return mapped


def build_train_loader_with_proposals(cfg):
    dataset = dataset_dicts_with_proposals(
        cfg.DATASETS.TRAIN,
        cfg.DATASETS.PROPOSAL_FILES_TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        trusted=cfg.DATASETS.PROPOSAL_FILES_TRUSTED,
    )
    mapper = proposal_mapper(cfg, True, max_consecutive_unreadable=min(50, len(dataset)))
    return build_detection_train_loader(cfg, dataset=dataset, mapper=mapper)


def _test_dataset_with_proposals(cfg, dataset_name):
    index = list(cfg.DATASETS.TEST).index(dataset_name)
    files = list(cfg.DATASETS.PROPOSAL_FILES_TEST)
    if len(files) != len(cfg.DATASETS.TEST):
        raise ValueError(
            f"DATASETS.PROPOSAL_FILES_TEST must list one proposal file per test dataset: got "
            f"{len(files)} for {list(cfg.DATASETS.TEST)}"
        )
    return dataset_dicts_with_proposals(
        [dataset_name],
        [files[index]],
        filter_empty=False,
        trusted=cfg.DATASETS.PROPOSAL_FILES_TRUSTED,
    )


def build_test_loader_with_proposals(cfg, dataset_name):
    return build_detection_test_loader(
        dataset=_test_dataset_with_proposals(cfg, dataset_name),
        mapper=proposal_mapper(cfg, False),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def multiscale_test_mapper(cfg):
    """Detectron2's test DatasetMapper without its resize and without touching the
    proposals: the original image with the proposal file's boxes, from which multi-scale
    testing (``ohem_d2.modeling.multiscale``) resizes both at every scale."""
    kwargs = DatasetMapper.from_config(cfg, False)
    kwargs["augmentations"] = []
    kwargs["precomputed_proposal_topk"] = None
    return UnreadableImageGuard(DatasetMapper(**kwargs), skip=False)


def build_multiscale_test_loader(cfg, dataset_name):
    """The test loader of multi-scale testing: original images (and their proposal files'
    boxes when ``MODEL.LOAD_PROPOSALS``), one per batch."""
    mapper = multiscale_test_mapper(cfg)
    if cfg.MODEL.LOAD_PROPOSALS:
        dataset = _test_dataset_with_proposals(cfg, dataset_name)
        return build_detection_test_loader(
            dataset=dataset, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
        )
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
