"""Shared fixtures: a small toy dataset generated once per test session."""

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from ohem_d2.data.toy import TOY_DATASET_NAMES, register_toy_dataset
from ohem_d2.proposals.toy import generate_toy_dataset


@pytest.fixture(scope="session")
def small_toy_root(tmp_path_factory):
    """A 24 + 12 image version of the toy dataset, with its proposals."""
    root = str(tmp_path_factory.mktemp("datasets") / "ohem_toy")
    return generate_toy_dataset(root, num_trainval=24, num_test=12, progress=False)


@pytest.fixture
def small_toy_registered(small_toy_root):
    """The toy dataset's names registered for `small_toy_root`, unregistered afterwards."""
    register_toy_dataset(small_toy_root)
    yield small_toy_root
    for name in TOY_DATASET_NAMES:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
