"""Shared fixtures: a small embedded dataset generated once per test session."""

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from ohem_d2.data.embedded import EMBEDDED_DATASET_NAMES, register_embedded_dataset
from ohem_d2.proposals.embedded import generate_embedded_dataset


@pytest.fixture(scope="session")
def small_toy_root(tmp_path_factory):
    """A 24 + 12 image version of the embedded dataset, with its proposals."""
    root = str(tmp_path_factory.mktemp("datasets") / "ohem_toy")
    return generate_embedded_dataset(root, num_trainval=24, num_test=12, progress=False)


@pytest.fixture
def small_toy_registered(small_toy_root):
    """The embedded dataset names registered for `small_toy_root`, unregistered afterwards."""
    register_embedded_dataset(small_toy_root)
    yield small_toy_root
    for name in EMBEDDED_DATASET_NAMES:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
