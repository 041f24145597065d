"""The ad_eval tests run with one torch thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny inputs gain nothing from threads, and OpenMP's spin-waiting made 2-thread runs 10-80x slower
    when another process shared the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

