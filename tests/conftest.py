"""Shared pytest configuration: ``--runslow`` / ``slow`` marker, per-test seeding, CPU thread count, devices."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# One intra-op thread by default: on a small shared CI box, OpenMP with 2+ threads under contention can be
# orders of magnitude slower for these tiny tensors. Override with ADAPTKIT_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("ADAPTKIT_TEST_THREADS", "1")))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: large models or long runs (run with --runslow)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    run_slow = config.getoption("--runslow")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    """Seed torch before every test so random inputs and model initialisations are reproducible."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    """The device tests run on: CPU (GPU tests use the ``gpu`` marker and pick CUDA themselves)."""
    return torch.device("cpu")


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Floating dtypes for functional tests that should hold in both precisions."""
    return request.param
