"""Tests of ad_eval.cell's record bookkeeping (peak memory, the device it is read from), with the method's
fit replaced by a stub: no model is built, so they take well under a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ad_eval import cell as cell_module
from ad_eval.cell import Cell, run_cell
from ad_eval.methods.base import MethodScores

CELL = Cell(method="patchcore", dataset="mvtec", root="/d", category="bottle", backbone="random", arch="resnet18")


def _scores() -> MethodScores:
    labels = np.array([0, 1])
    masks = np.zeros((2, 8, 8), bool)
    masks[1, :2] = True
    return MethodScores(image_scores=np.array([0.1, 0.9]), image_labels=labels,
                        anomaly_maps=masks.astype(np.float32), masks=masks)


def _fit_allocating(megabytes: int):
    """A stand-in for compute_scores that holds ``megabytes`` of touched memory while it runs."""

    def compute_scores(cell, device, work_dir):
        held = np.ones(megabytes * 2**20 // 8)  # np.ones writes every page: they are resident
        assert held.sum() == held.size
        return _scores(), {}

    return compute_scores


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="no /proc/self/clear_refs (not Linux)")
def test_a_later_cell_in_one_process_records_its_own_cpu_peak(tmp_path, monkeypatch):
    """ru_maxrss is the process's peak since it started: run_cells' second cell recorded the first one's."""
    monkeypatch.setattr(cell_module, "compute_scores", _fit_allocating(400))
    big = run_cell(CELL, tmp_path / "a", device="cpu")
    monkeypatch.setattr(cell_module, "compute_scores", _fit_allocating(0))
    small = run_cell(CELL, tmp_path / "b", device="cpu")
    assert big["peak_memory_mb"] - small["peak_memory_mb"] > 300, (big["peak_memory_mb"], small["peak_memory_mb"])
    assert big["peak_memory_of"] == small["peak_memory_of"] == "cell"


def test_without_a_resettable_peak_the_record_says_it_is_the_process_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(cell_module, "compute_scores", _fit_allocating(0))
    monkeypatch.setattr(cell_module, "_vm_hwm_kib", lambda: None)  # not Linux
    record = run_cell(CELL, tmp_path, device="cpu")
    assert record["peak_memory_of"] == "process" and record["peak_memory_mb"] > 0


def test_gpu_memory_and_name_are_read_from_the_cells_own_device(tmp_path, monkeypatch):
    """Called without a device, torch.cuda's peak-memory and name functions read the current GPU (0): a cell
    on cuda:1 recorded GPU 0's. No GPU here: the torch.cuda functions are stand-ins that record their argument."""
    import torch

    seen = []
    monkeypatch.setattr(cell_module, "resolve_device", lambda device: device)
    monkeypatch.setattr(cell_module, "compute_scores", _fit_allocating(0))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: seen.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: seen.append(("peak", device)) or 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: seen.append(("name", device)) or "GPU 1")
    record = run_cell(CELL, tmp_path, device="cuda:1")
    assert seen == [(call, torch.device("cuda:1")) for call in ("reset", "peak", "name")]
    assert record["device"] == "GPU 1" and record["peak_memory_mb"] == 1.0
