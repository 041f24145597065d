"""The ad_eval tests run with one torch thread (``one_torch_thread`` in tests/conftest.py); ``texture_dataset``:
a small generated MVTec-like category shared by the tests that run whole cells."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _ad_eval_one_torch_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def texture_dataset(tmp_path_factory):
    """A generated MVTec-like root with one category, texture: 6 train, 3 good and 2 defective test images, 64 px."""
    from ad_eval.cli import main as ad_eval

    root = tmp_path_factory.mktemp("synthetic")
    assert ad_eval(["synthetic", "--out", str(root), "--categories", "texture", "--size", "64", "--n-train", "6",
                    "--n-test-good", "3", "--n-test-defect", "2"]) == 0
    return root
