"""The ad_eval tests run with one torch thread (``one_torch_thread`` in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _ad_eval_one_torch_thread(one_torch_thread):
    yield
