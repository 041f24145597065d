"""Suite-wide pytest hooks and fixtures: tests marked ``gpu`` skip unless CuPy sees a CUDA device; ``realdata``
(the real MVTec AD samples, skipping without them); ``one_torch_thread``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Real MVTec AD samples (hazelnut_reduced, transistor_reduced), beside the repository, read in place.
REALDATA = (Path(__file__).resolve().parents[1].parent / "shared" / "realdata").resolve()


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``REALDATA``; the test is skipped where it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real MVTec AD samples not found at {REALDATA}")
    return REALDATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's tests: tiny inputs gain nothing from threads, and OpenMP's
    spin-waiting made 2-thread runs 2-80x slower when other processes shared the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cuda_device_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # not installed, no driver, no device: all mean "no GPU here"
        return 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or _cuda_device_count() > 0:  # import cupy only when a gpu test is collected
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU and CuPy: cupy not importable or "
        "cupy.cuda.runtime.getDeviceCount() == 0"
    )
    for item in gpu_items:
        item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    # Banks built by tests go to a throw-away cache, never the user's ~/.cache (subprocesses inherit it).
    if "FRACTAL_PRETRAIN_CACHE" not in os.environ:
        os.environ["FRACTAL_PRETRAIN_CACHE"] = tempfile.mkdtemp(prefix="fractal-pretrain-test-cache-")
