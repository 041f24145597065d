"""Suite-wide pytest hooks: tests marked ``gpu`` skip unless CuPy sees a CUDA device."""

from __future__ import annotations

import os
import tempfile

import pytest


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
