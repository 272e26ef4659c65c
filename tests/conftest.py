"""Every test that takes ``queue`` runs once on each working OpenCL device."""

import os

import numpy as np
import pyopencl as cl
import pytest

from pysparsecl import runtime

#: Work-group limit for the tile configurations the tests sample (devices with a lower
#: limit skip the larger ones).
SAMPLE_WG_LIMIT = 256


def _device_id(device):
    return f"{device.platform.name.strip()}:{device.name.strip()}".replace(" ", "_")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="property tests with 5,000 examples per op instead of 200")


def pytest_configure(config):
    if config.getoption("--slow"):
        os.environ["HYPOTHESIS_PROFILE"] = "slow"   # read by tests/test_properties.py


def pytest_generate_tests(metafunc):
    if "queue" in metafunc.fixturenames:
        devices = runtime.working_devices(warn=True)
        if not devices:
            pytest.fail("no working OpenCL device: run `make install` (it installs PoCL's CPU "
                        "device) or see README 'Installing'", pytrace=False)
        metafunc.parametrize("device", devices, ids=[_device_id(d) for d in devices],
                             scope="session")


@pytest.fixture(scope="session")
def queue(device):
    ctx = cl.Context([device])
    return cl.CommandQueue(ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)


@pytest.fixture
def rng(request):
    # Fresh data every run, but reproducible from the printed seed when a test fails.
    seed = np.random.SeedSequence().entropy % 2**32
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
