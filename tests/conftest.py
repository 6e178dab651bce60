"""Shared fixtures and the markers of the suite (see pyproject.toml)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

FASHION_ENV = "MPSDATA_FASHION_MNIST"

# Property tests explore new random examples on every run; CI (.ci/run sets MPSDATA_HYPOTHESIS_PROFILE=ci)
# replays a fixed set instead, so a merge is never decided by which examples a run happened to draw.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("MPSDATA_HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "needs_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The real Fashion-MNIST idx files; the tests that use them skip when the variable is unset."""
    path = os.environ.get(FASHION_ENV)
    if not path:
        pytest.skip(f"{FASHION_ENV} is not set (.ci/run sets it to ../shared/datasets/fashion-mnist)")
    if not Path(path, "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{FASHION_ENV}={path} holds no train-images-idx3-ubyte.gz")
    return Path(path)


@pytest.fixture(scope="session")
def fashion_images(fashion_dir: Path) -> torch.Tensor:
    """The first 512 real Fashion-MNIST training images, uint8 (512, 28, 28)."""
    with gzip.open(fashion_dir / "train-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return torch.from_numpy(data[:512].copy())
