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


def proposal_mapper(cfg, is_train):
    """Detectron2's DatasetMapper, keeping every proposal of the file.

    The mapper resizes and flips the proposals with the image; choosing which of them the
    ROI heads see (min size, de-duplication, top-k) is the proposal generator's job.
    """
    kwargs = DatasetMapper.from_config(cfg, is_train)
    kwargs["precomputed_proposal_topk"] = sys.maxsize
    return DatasetMapper(**kwargs)


def build_train_loader_with_proposals(cfg):
    dataset = dataset_dicts_with_proposals(
        cfg.DATASETS.TRAIN,
        cfg.DATASETS.PROPOSAL_FILES_TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        trusted=cfg.DATASETS.PROPOSAL_FILES_TRUSTED,
    )
    return build_detection_train_loader(cfg, dataset=dataset, mapper=proposal_mapper(cfg, True))


def build_test_loader_with_proposals(cfg, dataset_name):
    index = list(cfg.DATASETS.TEST).index(dataset_name)
    files = list(cfg.DATASETS.PROPOSAL_FILES_TEST)
    if len(files) != len(cfg.DATASETS.TEST):
        raise ValueError(
            f"DATASETS.PROPOSAL_FILES_TEST must list one proposal file per test dataset: got "
            f"{len(files)} for {list(cfg.DATASETS.TEST)}"
        )
    dataset = dataset_dicts_with_proposals(
        [dataset_name],
        [files[index]],
        filter_empty=False,
        trusted=cfg.DATASETS.PROPOSAL_FILES_TRUSTED,
    )
    return build_detection_test_loader(
        dataset=dataset, mapper=proposal_mapper(cfg, False), num_workers=cfg.DATALOADER.NUM_WORKERS
    )
