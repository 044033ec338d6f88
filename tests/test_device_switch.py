"""OHEM_D2_TEST_DEVICE (tests/helpers.py): the device of the tests' models, read from the
environment; a device this machine lacks stops the session before any test, saying so."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, NO_GPU_ENV, REPO, ZOO_SMALL, toy_model


def _run(args, **env):
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "tests"), **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_helper_models_are_on_the_tests_device():
    model, cfg = toy_model()
    assert cfg.MODEL.DEVICE == DEVICE
    assert model.device.type == torch.device(DEVICE).type  # "cuda" is cuda:0 once used
    assert ZOO_SMALL[ZOO_SMALL.index("MODEL.DEVICE") + 1] == DEVICE


def test_the_device_is_read_from_the_environment():
    code = "import helpers; print(helpers.DEVICE, helpers.toy_model()[1].MODEL.DEVICE)"
    result = _run(["-c", code], OHEM_D2_TEST_DEVICE="cpu", PYTHONWARNINGS="ignore")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["cpu", "cpu"]
    # Read as given: no GPU is needed to name one.
    result = _run(["-c", "import helpers; print(helpers.DEVICE)"], OHEM_D2_TEST_DEVICE="cuda:1")
    assert result.stdout.split() == ["cuda:1"], result.stderr[-2000:]


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "OHEM_D2_TEST_DEVICE=cuda but torch sees 0 usable CUDA device(s)"),
        ("gpu", "OHEM_D2_TEST_DEVICE='gpu': give cpu or cuda (or cuda:N)"),
    ],
)
def test_a_device_this_machine_lacks_stops_the_session_saying_so(device, message):
    # The GPUs hidden: a machine without CUDA, also where the tests run on one.
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_box_voting.py"]
    result = _run(args, OHEM_D2_TEST_DEVICE=device, **NO_GPU_ENV)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "passed" not in result.stdout
