"""The evaluation grid: a YAML config expanded into cells, submitted with submitit as job arrays.

Config (``jobs/eval/*.yaml``)::

    datasets:                     # dataset -> root and categories
      mvtec: {root: /data/mvtec_anomaly_detection, categories: [bottle, cable]}
    backbones:                    # report label -> spec (a backbone.pt, imagenet:/path.pth, random)
      ImageNet: {spec: "imagenet:/weights/wide_resnet50_2-95faca4d.pth", arch: wide_resnet50_2}
      Fractals: {spec: runs/paper_wrn50/backbone.pt}
      Fractals+adabn: {spec: runs/paper_wrn50/backbone.pt, bn_stats: train}   # AdaBN (ad_eval/adabn.py)
    methods:                      # method -> layer sets, hyper-parameter overrides, resources
      patchcore: {layers: [[2, 3]], config: {}, resources: {timeout_min: 60, gpus_per_node: 1}}
    size: 256                     # image side; crop: optional centre crop
    seeds: [0]
    shots: [all]                  # few-shot axis, e.g. [1, 2, 4, 8, all]: K normal train images per cell
    cells_per_task: 4             # cells run one after another in one process (imports paid once)
    resources: {timeout_min: 120, mem_gb: 32, cpus_per_task: 8, gpus_per_node: 1, slurm_partition: null,
                slurm_array_parallelism: 32}   # defaults; a method's `resources` override them

Every block is a frozen dataclass below (``GridConfig``, ``DatasetEntry``, ``BackboneEntry``,
``MethodEntry``, ``Resources``; a comment per field); an unknown key or a bad value is a one-line
``GridError`` naming the file, the key, the value and what is allowed. A method's ``config`` block is
checked by that method's config dataclass (``ad_eval.methods``).

Each (method, resources) group becomes one job array of ``ceil(cells / cells_per_task)`` tasks.
Re-running the same command skips cells with a valid record and re-submits the rest (failed,
cancelled, never run), so a killed grid loses nothing and no cell runs twice once done. With
``keep_maps: true`` a record without maps (a run with it off) is not done: that cell runs again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ad_eval.adabn import BN_STATS, PROJECTOR_NEEDS_SOURCE_STATS
from ad_eval.cell import DATASETS, Cell, check_device, check_label, is_done, preflight, record_path, run_cells
from ad_eval.fewshot import parse_shots
from ad_eval.methods import get_method, list_methods
from ad_eval.methods.base import check_layers
from fractal_pretrain.config import ConfigError, build_checked, check_range, check_type

CLUSTERS = ("slurm", "local", "debug")


class GridError(ConfigError):
    """A bad grid config: the message names the file and the key."""


# ----------------------------------------------------------------------------- the config file


@dataclass(frozen=True)
class Resources:
    """submitit parameters of one job array (Slurm's meaning; the local cluster uses the first four)."""

    timeout_min: int = 120  # minutes a task may run before it is killed
    mem_gb: int | float = 32  # memory per task in GB (an int stays an int: Slurm reads "64GB")
    cpus_per_task: int = 8  # CPU cores per task (image decoding threads use them)
    gpus_per_node: int = 1  # GPUs per task (capped at the visible ones off Slurm)
    slurm_partition: str | None = None  # Slurm partition; None: the cluster's default
    slurm_array_parallelism: int = 32  # tasks of one array running at once
    slurm_additional_parameters: dict | None = None  # extra sbatch options, passed through
    slurm_setup: list | None = None  # shell lines run before each task, passed through

    def __post_init__(self):
        check_range("timeout_min", self.timeout_min, 1, integer=True)
        check_range("mem_gb", self.mem_gb, 0.001)
        check_range("cpus_per_task", self.cpus_per_task, 1, integer=True)
        check_range("gpus_per_node", self.gpus_per_node, 0, integer=True)
        check_range("slurm_array_parallelism", self.slurm_array_parallelism, 1, integer=True)

    def as_params(self) -> dict[str, Any]:
        """The parameters to hand submitit (unset ones left to its defaults)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the grid."""

    root: str  # dataset root (relative paths: from the working directory)
    categories: tuple[str, ...]  # the categories evaluated, in table order

    def __post_init__(self):
        check_type("root", self.root, str, "a folder path")
        if not isinstance(self.categories, tuple) or not self.categories or not all(
                isinstance(c, str) and c for c in self.categories):
            raise ConfigError(f"categories={self.categories!r}: must be a non-empty list of names")


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone of the grid; its key in ``backbones`` is the label reports use."""

    spec: str  # a backbone.pt path (or its folder), imagenet:/path/file.pth, or random
    arch: str | None = None  # architecture; required for imagenet: and random
    projector: str | None = None  # projector.pt of fractal-pretrain adapt: cells use projected residuals
    projector_shots: int | None = None  # its K references; None: the projector's own
    bn_stats: str = "source"  # BatchNorm statistics: the backbone's own, or train (AdaBN on the train images)

    def __post_init__(self):
        check_type("spec", self.spec, str, "a backbone.pt path, imagenet:/path/file.pth or random")
        if self.projector is not None:
            check_type("projector", self.projector, str, "a projector.pt path")
        if self.bn_stats not in BN_STATS:
            raise ConfigError(f"bn_stats={self.bn_stats!r}: must be one of {', '.join(BN_STATS)}")
        if self.bn_stats != "source" and self.projector is not None:  # named here, not by the first method's cell
            raise ConfigError(PROJECTOR_NEEDS_SOURCE_STATS)


@dataclass(frozen=True)
class MethodEntry:
    """One method of the grid."""

    layers: tuple | None = None  # layer sets to evaluate, e.g. [[2, 3], [1, 2]]; None: the method's default
    config: dict | None = None  # hyper-parameter overrides, checked by the method's config dataclass
    resources: dict | None = None  # overrides of the top-level resources for this method's job arrays

    def __post_init__(self):
        # a list of lists: `layers: [2, 3]` (one set written flat) was a TypeError traceback in expand
        if self.layers is not None and (not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(s, (list, tuple)) and s for s in self.layers)):
            raise ConfigError(f"layers={_plain(self.layers)!r}: must be a list of layer sets, e.g. [[2, 3], [1, 2, 3]]")


def _plain(value):
    """A YAML value as the user wrote it (lists, not the tuples build_checked made)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class GridConfig:
    """A grid config file (``jobs/eval/*.yaml``), checked; ``expand`` turns it into cells."""

    datasets: dict[str, DatasetEntry]  # dataset name (mvtec, visa) -> root and categories
    backbones: dict[str, BackboneEntry]  # report label -> backbone
    methods: dict[str, MethodEntry]  # registered method name -> layer sets, config, resources
    size: int = 256  # image side the cells resize to
    crop: int | None = None  # optional centre crop after resizing
    seeds: tuple[int, ...] = (0,)  # one cell per seed
    shots: tuple[int | None, ...] = (None,)  # few-shot axis: K values and/or "all" (None)
    cells_per_task: int = 4  # cells run one after another in one process (imports paid once)
    resources: dict | None = None  # submitit parameters for every method (see Resources)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    keep_maps: bool = False  # also save each cell's anomaly maps (npz) for figures

    def __post_init__(self):
        for key in ("datasets", "backbones", "methods"):
            if not getattr(self, key):
                raise ConfigError(f"'{key}' is required and must not be empty")
        check_range("size", self.size, 8, integer=True)
        if self.crop is not None:
            check_range("crop", self.crop, 8, self.size, integer=True)
        if not self.seeds:
            raise ConfigError("seeds=[]: must list at least one seed")
        for seed in self.seeds:
            check_range("seeds", seed, 0, integer=True)
        if not self.shots:
            raise ConfigError("shots=[]: must list at least one K (or all)")
        check_range("cells_per_task", self.cells_per_task, 1, integer=True)
        check_type("keep_maps", self.keep_maps, bool, "true or false")
        check_device(self.device)  # the form only: the GPUs are on the compute nodes


def parse_grid(data: Any, where: str) -> GridConfig:
    """The checked ``GridConfig`` of a parsed YAML mapping; errors start with ``where`` (the file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(data).__name__}")
    data = dict(data)
    allowed = sorted(f.name for f in dataclasses.fields(GridConfig))
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    for key, cls in (("datasets", DatasetEntry), ("backbones", BackboneEntry), ("methods", MethodEntry)):
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: must be a mapping, got {type(value).__name__}")
        if value:
            data[key] = {name: build_checked(cls, spec, f"{where}: {key}.{name}") for name, spec in value.items()}
    for name, entry in (data.get("backbones") or {}).items():
        try:
            check_label(name, projector=entry.projector, bn_stats=entry.bn_stats)
        except ConfigError as err:
            raise ConfigError(f"{where}: backbones.{name}: {err}") from None
    for dataset in data.get("datasets") or {}:
        if dataset not in DATASETS:
            raise ConfigError(f"{where}: datasets.{dataset}: unknown dataset (known: {', '.join(DATASETS)})")
    _resources(data.get("resources"), None, f"{where}: resources")
    known = list_methods()
    for method, entry in (data.get("methods") or {}).items():
        if method not in known:
            raise ConfigError(f"{where}: methods.{method}: unknown method (known: {', '.join(known)})")
        _resources(data.get("resources"), entry.resources, f"{where}: methods.{method}.resources")
    try:
        if "shots" in data:
            data["shots"] = tuple(parse_shots(k) for k in _as_list(data["shots"], "shots"))
        if "seeds" in data:
            data["seeds"] = tuple(_as_list(data["seeds"], "seeds"))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return build_checked(GridConfig, data, where)


def _as_list(value, key: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}={value!r}: must be a list")
    return list(value)


def _resources(top: dict | None, method: dict | None, where: str) -> dict[str, Any]:
    """The submitit parameters: defaults, the top-level ``resources``, then the method's."""
    for value in (top, method):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping, got {type(value).__name__}")
    return build_checked(Resources, {**(top or {}), **(method or {})}, where).as_params()


@dataclass
class Grid:
    cells: list[Cell]
    resources: dict[str, dict[str, Any]]  # method -> submitit parameters
    cells_per_task: int = 4
    device: str = "auto"
    keep_maps: bool = False
    source: str = ""
    backbone_keys: dict[str, str] = dataclasses.field(default_factory=dict)  # a cell's backbone label -> its key
    skipped: tuple[str, ...] = ()  # why cells of the product were left out (a method that cannot fit K images)

    def backbone_key(self, cell: Cell) -> str:
        """``backbones.<key>`` of the cell's backbone as the config names it (a projected cell's label adds +adapt)."""
        return f"backbones.{self.backbone_keys.get(cell.backbone_name, cell.backbone_name)}"


def load_grid(path: str | Path, base_dir: str | Path | None = None) -> Grid:
    """Reads and validates a grid config; relative dataset roots and backbone paths resolve from base_dir (cwd)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: grid config not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    try:
        config = parse_grid(data, str(path))
    except ConfigError as err:
        raise GridError(str(err)) from None
    return expand(config, Path(base_dir) if base_dir is not None else Path.cwd(), str(path))


def expand(config: GridConfig, base: Path, source: str) -> Grid:
    """Every cell of ``config``: method x dataset x backbone x layer set x seed x shots x category."""
    cells, resources, backbone_keys, skipped = [], {}, {}, {}
    _check_repeats(source, "seeds", config.seeds, "seed")
    _check_repeats(source, "shots", ["all" if k is None else k for k in config.shots], "K")
    for dataset, dspec in config.datasets.items():
        _check_repeats(source, f"datasets.{dataset}.categories", dspec.categories, "category")
    for method, entry in config.methods.items():
        resources[method] = _resources(config.resources, entry.resources, f"{source}: methods.{method}.resources")
        layer_sets = [None] if not get_method(method).takes_layers else (list(entry.layers or []) or [None])
        _check_repeats(source, f"methods.{method}.layers", [_plain(s) for s in layer_sets if s], "layer set",
                       _layer_set_or_itself)
        for (dataset, dspec), (label, bspec), layers, seed, shots in itertools.product(
                config.datasets.items(), config.backbones.items(), layer_sets, config.seeds, config.shots):
            for category in dspec.categories:
                try:
                    cell = Cell(
                        method=method, dataset=dataset, root=str((base / dspec.root).resolve()), category=category,
                        backbone=_resolve_spec(bspec.spec, base), backbone_name=label, arch=bspec.arch,
                        layers=tuple(layers) if layers else None, size=config.size, crop=config.crop,
                        seed=seed, config=dict(entry.config or {}), shots=shots,
                        projector=None if bspec.projector is None else _resolve_spec(bspec.projector, base),
                        projector_shots=bspec.projector_shots, bn_stats=bspec.bn_stats)
                except ValueError as err:
                    raise GridError(f"{source}: methods.{method}: {err}") from None
                owner = backbone_keys.setdefault(cell.backbone_name, label)
                if owner != label:  # the report would take them for one backbone and keep one record per seed
                    raise GridError(f"{source}: backbones.{owner} and backbones.{label} both give the report "
                                    f"label {cell.backbone_name!r} (+adapt: projector, +adabn: bn_stats train); "
                                    "rename one")
                reason = too_few_shots(cell)
                if reason:
                    skipped.setdefault(f"methods.{method}, shots={shots}: skipped ({reason})", None)
                else:
                    cells.append(cell)
    if not cells and skipped:
        raise GridError(f"{source}: no cell left to run: {'; '.join(skipped)}")
    return Grid(cells=cells, resources=resources, cells_per_task=config.cells_per_task, device=config.device,
                keep_maps=config.keep_maps, source=source, backbone_keys=backbone_keys, skipped=tuple(skipped))


def _check_repeats(source: str, key: str, values, what: str, same=lambda value: value) -> None:
    """Two entries of one axis that are ``same`` would give cells with one cell id, run twice (concurrently)."""
    seen = {}
    for value in values:
        norm = same(value)
        if norm in seen:
            raise GridError(f"{source}: {key}: {seen[norm]!r} and {value!r} are the same {what}: list it once "
                            "(each would run the same cells)")
        seen[norm] = value


def _layer_set_or_itself(layers: list) -> tuple | str:
    """The sorted layer names of a set ([4, 3], [layer3, layer4] -> layer3, layer4); a bad set as written (its
    cells then say what is wrong)."""
    try:
        return check_layers(layers)
    except ValueError:
        return repr(layers)


def too_few_shots(cell: Cell) -> str | None:
    """Why the cell's method cannot fit its K images whatever the data (PaDiM needs 2), or None. A grid's
    ``shots`` axis crosses every method: such cells are left out with a note, not run into a failure record
    that every re-run would retry (``ad-eval run`` with such a K is a one-line error)."""
    if cell.shots is None:
        return None
    spec = get_method(cell.method)
    try:
        spec.check_train_images(cell.shots, spec.make_config(cell.config), spec.resolve_layers(cell.layers),
                                cell.crop or cell.size, shots=cell.shots)
    except ConfigError as err:
        return str(err)
    return None


def _resolve_spec(spec: str, base: Path) -> str:
    if spec == "random":
        return spec
    if spec.startswith("imagenet:"):
        return "imagenet:" + str((base / spec[len("imagenet:"):]).resolve())
    return str((base / spec).resolve())


def pending_cells(grid: Grid, out_dir: Path) -> list[Cell]:
    """Cells without a valid record in out_dir, or, when the grid keeps maps, without their maps (``is_done``)."""
    return [cell for cell in grid.cells if not is_done(cell, out_dir, grid.keep_maps)]


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


def submit(grid: Grid, pending: list[Cell], out_dir: str | Path, cluster: str) -> list:
    """Submits the ``pending`` cells (``pending_cells``), one job array per method; returns the submitit jobs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (cluster == "local" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            and threading.current_thread() is threading.main_thread()):
        # a shell starts `ad-eval grid ... &` with SIGINT ignored, and the tasks inherit that: cancelling them
        # (SIGINT, see local_tasks_end_with_the_grid) would do nothing
        signal.signal(signal.SIGINT, signal.default_int_handler)
    jobs = []
    for method in grid.resources:
        cells = [c for c in pending if c.method == method]
        if not cells:
            continue
        executor = make_executor(cluster, out_dir / "submitit", grid.resources[method])
        log = out_dir / "submitit" / CONTROLLER_LOG
        quiet = children_stderr_to(log) if cluster == "local" else contextlib.nullcontext()
        with quiet, executor.batch():  # the batch starts the local controllers when it ends, inside `quiet`
            for chunk in _chunks(cells, grid.cells_per_task):
                jobs.append(executor.submit(run_cells, chunk, str(out_dir), grid.device, grid.keep_maps))
    return jobs


CONTROLLER_LOG = "controllers.err"  # in <out>/submitit: what submitit's local controllers write to stderr


@contextlib.contextmanager
def children_stderr_to(path: Path):
    """Processes started inside the block write their stderr to ``path``; this process's stderr is restored after.

    submitit starts a local task's controller with the grid's stderr (fd 2) and cancels it with SIGINT, so each
    cancel printed the controller's KeyboardInterrupt traceback on the terminal, after the grid's own line. The
    tasks themselves already write to their log files in the same folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("a") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


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
    # closed also when a stop unwinds through here: the "grid stopped" line then starts a line of its own
    with tqdm(total=total, desc="cells", unit="cell", disable=not progress) as bar:
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


def check_backbones(grid: Grid, cells: list[Cell]) -> None:
    """``check_spec`` (files exist, backbone.json valid) of each backbone of ``cells`` before anything is submitted:
    a missing file was a failure record per cell, and a corrected path would not reuse them (a cell's id holds
    its spec). Off Slurm only, like ``check_datasets``: a cluster's weights may be on its compute nodes only."""
    from ad_eval.backbones import check_spec

    for key, spec, arch in dict.fromkeys((grid.backbone_key(c), c.backbone, c.arch) for c in cells):
        try:
            check_spec(spec, arch)
        except ValueError as err:
            raise GridError(f"{grid.source}: {key}: {err}") from None


def check_projectors(grid: Grid, cells: list[Cell]) -> None:
    """``preflight`` of one cell per (backbone weights, projector) pair before anything is submitted: a
    projector made for other weights (a random backbone is other weights for every seed) or other layers
    fails every cell of the pair, and re-running would not help. Off Slurm (its train images may be on the
    compute nodes only)."""
    seen = set()
    for cell in cells:
        key = (cell.backbone, cell.arch, cell.seed if cell.backbone == "random" else None, cell.projector)
        if cell.projector is None or key in seen:
            continue
        seen.add(key)
        try:
            preflight(cell)
        except ConfigError as err:
            raise GridError(f"{grid.source}: {grid.backbone_key(cell)} (seed {cell.seed}): {err}") from None


def check_datasets(grid: Grid) -> None:
    """Scans each (dataset, root, category) of the grid once, before anything is submitted.

    A typo in a root or a category is then one line, not a failure record per cell (which a corrected config
    would not reuse: a cell's id holds its root). Off Slurm only: a cluster's data may be visible only on its
    compute nodes (staged by ``slurm_setup``), so there each cell checks its own.
    """
    from ad_eval.datasets import scan

    for dataset, root, category in dict.fromkeys((c.dataset, c.root, c.category) for c in grid.cells):
        try:
            scan(dataset, root, category)
        except ValueError as err:
            raise GridError(f"{grid.source}: datasets.{dataset}: {err}") from None


@contextlib.contextmanager
def local_tasks_end_with_the_grid(jobs: list, cluster: str):
    """On ``local`` the tasks are processes of this machine: a SIGTERM (or Ctrl-C) of the grid cancels them.

    They used to run on as orphans after ``kill <grid pid>``, and re-running the grid (as documented) started
    their unfinished cells a second time beside them. Slurm jobs outlive the submitting process, as they should.
    Either signal ends the grid with one line and the shell's status (143, 130), not a KeyboardInterrupt traceback.
    """
    if cluster != "local" or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)  # unwinds to the cancel below; the shell's status for the signal

    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except BaseException as stop:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cancel short
        running = [job for job in jobs if not job.done()]
        if isinstance(stop, SystemExit) and stop.code == 128 + signal.SIGINT:
            # A terminal's Ctrl-C reaches the controllers too (one process group) and they stop their tasks: a
            # second SIGINT would cut short the 1 s a controller waits before its SIGKILL, and a task that took
            # the first one as Lightning's "graceful shutdown" ran on. A plain `kill -INT <grid>` waits this long.
            _wait_until_done(running, CONTROLLER_STOP_S)
        for job in running:
            if not job.done():
                job.cancel()  # SIGINT to submitit's controller, which stops its task (SIGKILL after 1 s)
        print(f"grid stopped: {len(running)} running task(s) cancelled; re-run the same command to continue",
              file=sys.stderr, flush=True)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


CONTROLLER_STOP_S = 2.0  # a local controller stops its task within ~1 s of a SIGINT (SIGINT, 1 s, SIGKILL)


def _wait_until_done(jobs: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(not job.done() for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.05)


def run_grid(config: str | Path, out_dir: str | Path, cluster: str = "local", progress: bool = True) -> dict:
    """Submit pending cells, wait, and summarise; re-running continues where the last run stopped."""
    grid = load_grid(config)
    out_dir = Path(out_dir)
    pending = pending_cells(grid, out_dir) if out_dir.exists() else list(grid.cells)  # one scan of the records
    if cluster != "slurm":  # a cluster's data and weights may be visible on its compute nodes only: there each
        check_datasets(grid)  # cell checks its own dataset, backbone and projector (whose references are train images)
        check_backbones(grid, pending)
        check_projectors(grid, pending)
    for note in grid.skipped:
        print(f"warning: {grid.source}: {note}", file=sys.stderr, flush=True)
    jobs = submit(grid, pending, out_dir, cluster)
    before = len(grid.cells) - len(pending)
    print(f"{len(grid.cells)} cells: {before} already done, {len(pending)} submitted "
          f"in {len(jobs)} task(s) on {cluster}", flush=True)
    with local_tasks_end_with_the_grid(jobs, cluster):
        wait(jobs, out_dir, grid, progress=progress, lost=LostJobs() if cluster == "slurm" else None)
    missing = pending_cells(grid, out_dir)
    return {"cells": len(grid.cells), "done": len(grid.cells) - len(missing), "missing": [c.cell_id for c in missing]}
