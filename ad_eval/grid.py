"""The evaluation grid: a YAML config expanded into cells, submitted with submitit as job arrays.

Config (``jobs/eval/*.yaml``)::

    datasets:                     # dataset -> root and categories
      mvtec: {root: /data/mvtec_anomaly_detection, categories: [bottle, cable]}
    backbones:                    # report label -> spec (a backbone.pt, imagenet:/path.pth, random)
      ImageNet: {spec: "imagenet:/weights/wide_resnet50_2-95faca4d.pth", arch: wide_resnet50_2}
      Fractals: {spec: runs/paper_wrn50/backbone.pt}
    methods:                      # method -> layer sets, hyper-parameter overrides, resources
      patchcore: {layers: [[2, 3]], config: {}, resources: {timeout_min: 60, gpus_per_node: 1}}
    size: 256                     # image side; crop: optional centre crop
    seeds: [0]
    cells_per_task: 4             # cells run one after another in one process (imports paid once)
    resources: {timeout_min: 120, mem_gb: 32, cpus_per_task: 8, gpus_per_node: 1, slurm_partition: null,
                slurm_array_parallelism: 32}   # defaults; a method's `resources` override them

Each (method, resources) group becomes one job array of ``ceil(cells / cells_per_task)`` tasks.
Re-running the same command skips cells with a valid record and re-submits the rest (failed,
cancelled, never run), so a killed grid loses nothing and no cell runs twice once done.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ad_eval.cell import DATASETS, Cell, read_record, record_path, run_cells
from ad_eval.methods import get_method, list_methods

TOP_KEYS = {"datasets", "backbones", "methods", "size", "crop", "seeds", "cells_per_task", "resources", "device",
            "keep_maps"}
METHOD_KEYS = {"layers", "config", "resources"}
BACKBONE_KEYS = {"spec", "arch"}
DATASET_KEYS = {"root", "categories"}
RESOURCE_KEYS = {"timeout_min", "mem_gb", "cpus_per_task", "gpus_per_node", "slurm_partition",
                 "slurm_array_parallelism", "slurm_additional_parameters", "slurm_setup"}
DEFAULT_RESOURCES = {"timeout_min": 120, "mem_gb": 32, "cpus_per_task": 8, "gpus_per_node": 1,
                     "slurm_array_parallelism": 32}
CLUSTERS = ("slurm", "local", "debug")


class GridError(ValueError):
    """A bad grid config: the message names the file and the key."""


@dataclass
class Grid:
    cells: list[Cell]
    resources: dict[str, dict[str, Any]]  # method -> submitit parameters
    cells_per_task: int = 4
    device: str = "auto"
    keep_maps: bool = False
    source: str = ""


def _check_keys(where: str, mapping: Any, allowed: set[str]) -> dict:
    if not isinstance(mapping, dict):
        raise GridError(f"{where}: must be a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise GridError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return mapping


def load_grid(path: str | Path, base_dir: str | Path | None = None) -> Grid:
    """Reads and validates a grid config; relative dataset roots and backbone paths resolve from base_dir (cwd)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: grid config not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    data = _check_keys(str(path), data, TOP_KEYS)
    for key in ("datasets", "backbones", "methods"):
        if not data.get(key):
            raise GridError(f"{path}: '{key}' is required and must not be empty")
    defaults = {**DEFAULT_RESOURCES, **_check_keys(f"{path}: resources", data.get("resources") or {}, RESOURCE_KEYS)}
    seeds = data.get("seeds", [0])
    cells, resources = [], {}
    for method, spec in data["methods"].items():
        if method not in list_methods():
            raise GridError(f"{path}: methods.{method}: unknown method (known: {', '.join(list_methods())})")
        spec = _check_keys(f"{path}: methods.{method}", spec or {}, METHOD_KEYS)
        extra = _check_keys(f"{path}: methods.{method}.resources", spec.get("resources") or {}, RESOURCE_KEYS)
        resources[method] = {**defaults, **extra}
        layer_sets = [None] if not get_method(method).takes_layers else (spec.get("layers") or [None])
        for (dataset, dspec), (label, bspec), layers, seed in itertools.product(
                data["datasets"].items(), data["backbones"].items(), layer_sets, seeds):
            if dataset not in DATASETS:
                raise GridError(f"{path}: datasets.{dataset}: unknown dataset (known: {', '.join(DATASETS)})")
            dspec = _check_keys(f"{path}: datasets.{dataset}", dspec, DATASET_KEYS)
            bspec = _check_keys(f"{path}: backbones.{label}", bspec, BACKBONE_KEYS)
            if "root" not in dspec or not dspec.get("categories"):
                raise GridError(f"{path}: datasets.{dataset}: needs 'root' and a non-empty 'categories' list")
            if "spec" not in bspec:
                raise GridError(f"{path}: backbones.{label}: needs 'spec' (backbone.pt path, imagenet:/file, random)")
            for category in dspec["categories"]:
                try:
                    cells.append(Cell(
                        method=method, dataset=dataset, root=str((base / dspec["root"]).resolve()), category=category,
                        backbone=_resolve_spec(bspec["spec"], base), backbone_name=label, arch=bspec.get("arch"),
                        layers=tuple(layers) if layers else None, size=data.get("size", 256), crop=data.get("crop"),
                        seed=seed, config=dict(spec.get("config") or {})))
                except ValueError as err:
                    raise GridError(f"{path}: methods.{method}: {err}") from None
    cells_per_task = data.get("cells_per_task", 4)
    if not isinstance(cells_per_task, int) or cells_per_task < 1:
        raise GridError(f"{path}: cells_per_task={cells_per_task!r}: must be an integer >= 1")
    return Grid(cells=cells, resources=resources, cells_per_task=cells_per_task, device=data.get("device", "auto"),
                keep_maps=bool(data.get("keep_maps", False)), source=str(path))


def _resolve_spec(spec: str, base: Path) -> str:
    if spec == "random":
        return spec
    if spec.startswith("imagenet:"):
        return "imagenet:" + str((base / spec[len("imagenet:"):]).resolve())
    return str((base / spec).resolve())


def pending_cells(grid: Grid, out_dir: Path) -> list[Cell]:
    """Cells without a valid record in out_dir."""
    return [cell for cell in grid.cells if read_record(record_path(out_dir, cell)) is None]


def _count_written(grid: Grid, out_dir: Path) -> int:
    """Cells with a record file, from one directory listing (the progress bar; records are written atomically)."""
    names = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    return sum(record_path(out_dir, cell).name in names for cell in grid.cells)


def _chunks(cells: list[Cell], size: int) -> list[list[Cell]]:
    return [cells[i:i + size] for i in range(0, len(cells), size)]


def make_executor(cluster: str, folder: Path, resources: dict[str, Any]):
    import submitit

    if cluster not in CLUSTERS:
        raise GridError(f"cluster={cluster!r}: must be one of {', '.join(CLUSTERS)}")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = dict(resources)
    if cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        params["gpus_per_node"] = min(params.get("gpus_per_node", 0), _visible_gpus())
    executor.update_parameters(name="ad-eval", **params)
    return executor


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def submit(grid: Grid, out_dir: str | Path, cluster: str) -> list:
    """Submits every pending cell, one job array per method; returns the submitit jobs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = pending_cells(grid, out_dir)
    jobs = []
    for method in grid.resources:
        cells = [c for c in pending if c.method == method]
        if not cells:
            continue
        executor = make_executor(cluster, out_dir / "submitit", grid.resources[method])
        with executor.batch():
            for chunk in _chunks(cells, grid.cells_per_task):
                jobs.append(executor.submit(run_cells, chunk, str(out_dir), grid.device, grid.keep_maps))
    return jobs


LOST_AFTER_S = 60.0  # a job gone from squeue this long without a result file is lost


def slurm_queue() -> set[str] | None:
    """Job ids Slurm still holds (array tasks expanded), or None when squeue cannot be asked."""
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(done.stdout.split()) if done.returncode == 0 else None


class LostJobs:
    """Finds jobs that left the queue without a result file.

    submitit learns that a job ended from ``sacct``; on a Slurm without accounting it never does, so
    a cancelled or killed task would be waited for forever. The same happens when a compute node
    writes the result where this machine cannot see it.
    """

    def __init__(self, queue=slurm_queue, lost_after_s: float = LOST_AFTER_S, clock=time.monotonic):
        self.queue, self.lost_after_s, self.clock = queue, lost_after_s, clock
        self._gone_since: dict[str, float] = {}

    def check(self, jobs: list) -> list:
        queued = self.queue()
        if queued is None:
            return []
        now, lost = self.clock(), []
        for job in jobs:
            if job.job_id in queued:
                self._gone_since.pop(job.job_id, None)
            elif now - self._gone_since.setdefault(job.job_id, now) >= self.lost_after_s:
                lost.append(job)
        return lost


def wait(jobs: list, out_dir: Path, grid: Grid, poll_s: float = 2.0, progress: bool = True,
         lost: LostJobs | None = None) -> None:
    """Waits for the jobs with a progress bar of finished cells; job failures are reported, not raised."""
    from tqdm import tqdm

    total = len(grid.cells)
    bar = tqdm(total=total, desc="cells", unit="cell", disable=not progress)
    interactive = sys.stderr.isatty()
    open_jobs = list(jobs)
    while open_jobs:
        for job in [j for j in open_jobs if j.done()]:
            open_jobs.remove(job)
            try:
                for line in job.result():
                    tqdm.write(line)
            except Exception as err:  # a crashed or cancelled task: its cells stay pending
                tqdm.write(f"job {job.job_id}: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
        for job in lost.check(open_jobs) if lost and open_jobs else []:
            open_jobs.remove(job)
            tqdm.write(f"job {job.job_id}: left the Slurm queue without a result file (cancelled or killed, and "
                       f"no accounting to say so; or {out_dir} is not on a filesystem the compute nodes share)")
        done = _count_written(grid, out_dir)
        if done != bar.n:
            bar.update(done - bar.n)
        elif interactive:
            bar.refresh()  # the clock ticks on a terminal; a log file gets a line only when a cell finishes
        if open_jobs:
            time.sleep(poll_s)
    bar.close()


def run_grid(config: str | Path, out_dir: str | Path, cluster: str = "local", progress: bool = True) -> dict:
    """Submit pending cells, wait, and summarise; re-running continues where the last run stopped."""
    grid = load_grid(config)
    out_dir = Path(out_dir)
    before = len(grid.cells) - len(pending_cells(grid, out_dir)) if out_dir.exists() else 0
    jobs = submit(grid, out_dir, cluster)
    print(f"{len(grid.cells)} cells: {before} already done, {len(grid.cells) - before} submitted "
          f"in {len(jobs)} task(s) on {cluster}", flush=True)
    wait(jobs, out_dir, grid, progress=progress, lost=LostJobs() if cluster == "slurm" else None)
    missing = pending_cells(grid, out_dir)
    return {"cells": len(grid.cells), "done": len(grid.cells) - len(missing), "missing": [c.cell_id for c in missing]}
