"""Shared fixtures: a small toy dataset generated once per test session; the test device
(OHEM_D2_TEST_DEVICE, tests/helpers.py) checked before any test runs."""

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import DEVICE

from ohem_d2.data.toy import TOY_DATASET_NAMES, register_toy_dataset
from ohem_d2.proposals.toy import generate_toy_dataset


def pytest_configure(config):
    """OHEM_D2_TEST_DEVICE names a device this machine has, or the session stops here."""
    try:
        device = torch.device(DEVICE)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"OHEM_D2_TEST_DEVICE={DEVICE!r}: give cpu or cuda (or cuda:N)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise pytest.UsageError(
            f"OHEM_D2_TEST_DEVICE={DEVICE} but torch sees {count} usable CUDA device(s) on "
            "this machine; unset it (or set it to cpu) to run the tests on the CPU"
        )


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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: tensors this small gain nothing from threads,
    which only wait on each other (several times slower on a busy machine)."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture
def catalog_restored():
    """Datasets registered during the test removed after it (train_net's pre-launch check
    registers the project's, the toy set at its default root), so that later tests can
    register theirs."""
    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
