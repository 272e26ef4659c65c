"""Every test that takes ``queue`` runs once on each working OpenCL device."""

import os
import zlib

import numpy as np
import pyopencl as cl
import pytest

from pysparsecl import runtime

#: Work-group limit for the tile configurations the tests sample (devices with a lower
#: limit skip the larger ones).
SAMPLE_WG_LIMIT = 256


def _device_id(device):
    return f"{device.platform.name.strip()}:{device.name.strip()}".replace(" ", "_")


#: The base seed under CI=true, so that CI runs are reproducible.
CI_SEED = 20261204


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="property tests with 5,000 examples per op instead of 200")
    parser.addoption("--seed", type=int, default=None,
                     help="base seed of the tests' random data (default: "
                          "$PYSPARSECL_TEST_SEED; fixed under CI=true; else fresh each run)")


def _base_seed(config) -> int:
    seed = config.getoption("--seed")
    if seed is None and os.environ.get("PYSPARSECL_TEST_SEED"):
        seed = int(os.environ["PYSPARSECL_TEST_SEED"])
    if seed is None and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        seed = CI_SEED
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    return seed


def pytest_configure(config):
    if config.getoption("--slow"):
        os.environ["HYPOTHESIS_PROFILE"] = "slow"   # read by tests/test_properties.py
    config.pscl_seed = _base_seed(config)
    # The property tests draw from the same seed, unless --hypothesis-seed names another.
    try:
        from hypothesis import core
    except ImportError:
        return
    if config.getoption("--hypothesis-seed", default=None) is None:
        core.global_force_seed = config.pscl_seed


def pytest_report_header(config):
    return f"pysparsecl test seed: {config.pscl_seed} (rerun with --seed {config.pscl_seed})"


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
def count_instances(monkeypatch):
    """``count_instances(owner, name)`` replaces the class ``owner.name`` with a subclass
    that records each instance made, for this test; returns the list of records."""
    def count(owner, name):
        made = []
        base = getattr(owner, name)

        class Counted(base):
            def __init__(self, *args, **kwargs):
                made.append(1)
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(owner, name, Counted)
        return made
    return count


@pytest.fixture
def rng(request):
    """Random data from the run's base seed (printed in the header) and the test's id, so
    that a test's data depends neither on which other tests run nor on their order."""
    base = request.config.pscl_seed
    request.node.user_properties.append(("seed", base))
    print(f"rng seed {base} (rerun with --seed {base})")
    return np.random.default_rng([base, zlib.crc32(request.node.nodeid.encode())])
