"""A non-editable install (the container's `pip install /opt/fractal`) ships only the package data pyproject.toml
names: every source file the packages read at run time must be listed there."""

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI's); the package itself supports 3.10

REPO = Path(__file__).resolve().parents[1]
RUNTIME_SOURCES = {".cpp", ".cu", ".cuh", ".h"}  # compiled on first use (g++, NVRTC, the emulator)


def test_every_runtime_source_file_is_package_data():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    missing = []
    for package in ("fractal_pretrain", "ad_eval"):
        for path in sorted((REPO / package).rglob("*")):
            if path.suffix not in RUNTIME_SOURCES:
                continue
            owner = path.parent
            while owner != REPO and ".".join(owner.relative_to(REPO).parts) not in package_data:
                owner = owner.parent
            patterns = package_data.get(".".join(owner.relative_to(REPO).parts), [])
            if not any(fnmatch.fnmatch(path.relative_to(owner).as_posix(), p) for p in patterns):
                missing.append(path.relative_to(REPO).as_posix())
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
