"""One evaluation cell: method x dataset x category x backbone x layer set x seed (x shots) -> one JSON record.

``run_cell`` looks the method up in the registry (``ad_eval.methods``), checks the dataset layout and
loads the backbone before building any model, fits the method on the cell's train images (all, or
the few-shot choice of ``ad_eval.fewshot``), computes the metrics itself (``ad_eval.metrics``) and
writes ``<out>/<cell_id>.json`` atomically. A failure writes ``<cell_id>.failed.json`` (error and
traceback) instead and never touches other cells' records.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ad_eval.methods import get_method, list_methods
from ad_eval.methods.base import check_layers, layer_set_label
from fractal_pretrain.atomic import atomic_write
from fractal_pretrain.config import ConfigError, check_range
from fractal_pretrain.config import check_device as check_device_named

DATASETS = ("mvtec", "visa")
FAILED_SUFFIX = ".failed.json"
MAPS_DIR = "maps"  # keep_maps: <out>/maps/<cell_id>.npz (the report finds it through the record's "maps" path)


@dataclass(frozen=True)
class Cell:
    """Everything that defines one result; ``cell_id`` is a stable name derived from all of it."""

    method: str
    dataset: str
    root: str
    category: str
    backbone: str  # the spec: a backbone.pt path, imagenet:/path.pth or random
    backbone_name: str = ""  # the label reports use (ImageNet, Fractals, ...); default derived from the spec
    arch: str | None = None
    layers: tuple[str, ...] | None = None
    size: int = 256
    crop: int | None = None
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)  # the method's overrides
    shots: int | None = None  # train on this many normal images (ad_eval.fewshot); None: all of them
    projector: str | None = None  # a projector.pt (fractal-pretrain adapt): the method sees projected residuals
    projector_shots: int | None = None  # its K references; None: the projector's own ``shots``
    bn_stats: str = "source"  # BatchNorm statistics: the backbone's own, or "train": AdaBN on the train images

    def __post_init__(self):
        try:
            spec = get_method(self.method)
        except ConfigError as err:
            raise ConfigError(f"method={self.method!r}: {err}") from None
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r}: must be one of {', '.join(DATASETS)}")
        if self.layers is not None:
            spec.resolve_layers(self.layers)  # an unknown layer or a set the method does not allow
            object.__setattr__(self, "layers", check_layers(self.layers))
        spec.make_config(self.config)  # unknown keys and bad values fail here, before anything runs
        if self.shots is not None and (isinstance(self.shots, bool) or not isinstance(self.shots, int)
                                       or self.shots < 1):
            raise ConfigError(f"shots={self.shots!r}: must be an integer >= 1 (or all)")
        named = bool(self.backbone_name)
        if not named:
            object.__setattr__(self, "backbone_name", default_backbone_name(self.backbone, self.arch))
        check_label(self.backbone_name, projector=self.projector, bn_stats=self.bn_stats, derived=not named)
        if self.projector is not None:
            if not spec.accepts_projector:
                raise ConfigError(f"method={self.method!r} does not accept a projector (only "
                                  f"{', '.join(m for m in list_methods() if get_method(m).accepts_projector)})")
            from ad_eval.projection import projected_label

            object.__setattr__(self, "backbone_name", projected_label(self.backbone_name))
        elif self.projector_shots is not None:
            raise ConfigError("projector_shots: needs a projector")
        if self.projector_shots is not None and (isinstance(self.projector_shots, bool)
                                                 or not isinstance(self.projector_shots, int)
                                                 or self.projector_shots < 1):
            raise ConfigError(f"projector_shots={self.projector_shots!r}: must be an integer >= 1")
        if self.bn_stats != "source":
            self._check_bn_stats()
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"size={self.size!r}: must be an integer >= 8")
        if self.crop is not None:  # as the grid checks it: a bad crop must not reach the method (failure record)
            check_range("crop", self.crop, 8, self.size, integer=True)

    def _check_bn_stats(self) -> None:
        from ad_eval.adabn import BN_STATS, PROJECTOR_NEEDS_SOURCE_STATS, adabn_label

        if self.bn_stats not in BN_STATS:
            raise ConfigError(f"bn_stats={self.bn_stats!r}: must be one of {', '.join(BN_STATS)}")
        if self.projector is not None:
            raise ConfigError(PROJECTOR_NEEDS_SOURCE_STATS)
        object.__setattr__(self, "backbone_name", adabn_label(self.backbone_name))

    @property
    def cell_id(self) -> str:
        layers = layer_set_label(self.layers) if self.layers else "default"
        shots = "" if self.shots is None else f"_k{self.shots}"
        readable = f"{self.method}_{self.dataset}_{self.category}_{self.backbone_name}_L{layers}_s{self.seed}{shots}"
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", readable) + "_" + digest

    def to_dict(self) -> dict[str, Any]:
        """The cell as JSON data; ``shots`` only when set, so full-data cells keep their ids and records."""
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers) if self.layers else None
        for key in ("shots", "projector", "projector_shots"):  # unset: ids and records as before they existed
            if data[key] is None:
                del data[key]
        if data["bn_stats"] == "source":
            del data["bn_stats"]
        return data


def check_label(name: str, *, projector: str | None, bn_stats: str, derived: bool = False) -> None:
    """A backbone name that claims a projector or AdaBN its cells do not have would mislabel every report row.

    ``derived``: the name was taken from the backbone's path, not given (the error then says how to give one).
    """
    if "+" not in name:
        return
    from ad_eval.adabn import LABEL_SUFFIX as ADABN_SUFFIX
    from ad_eval.projection import LABEL_SUFFIX as ADAPT_SUFFIX

    for suffix, option, given in ((ADAPT_SUFFIX, "a projector", projector is not None),
                                  (ADABN_SUFFIX, "bn_stats='train'", bn_stats != "source")):
        if re.search(re.escape(suffix) + r"(?![A-Za-z0-9])", name) and not given:  # +adapt, not +adaptive
            fix = "name it with --name" if derived else "rename it"
            raise ConfigError(f"backbone name {name!r}{' (from its path)' if derived else ''}: {suffix!r} marks cells "
                              f"run with {option}, and these are not ({fix})")


def default_backbone_name(spec: str, arch: str | None) -> str:
    """The label of a backbone given without a name: runs/fractalA/backbone.pt and runs/fractalA are "fractalA".

    A spec is a folder (holding backbone.pt) when its name has no suffix or it is a folder on disk (run.v2):
    decided from the text where possible, so the name, and the cell id, do not depend on the host.
    """
    if spec == "random":
        return f"random-{arch}"
    if spec.startswith("imagenet:"):
        return f"imagenet-{arch}"
    path = Path(spec).expanduser()
    if path.name and (not path.suffix or path.is_dir()):
        return path.name
    return path.parent.name or path.stem


def record_path(out_dir: Path, cell: Cell) -> Path:
    return Path(out_dir) / f"{cell.cell_id}.json"


def read_record(path: Path) -> dict | None:
    """A finished cell's record, or None when absent or unreadable (the cell is then run again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "image_AUROC" in record else None


def is_done(cell: Cell, out_dir: Path, keep_maps: bool = False) -> bool:
    """Whether ``cell`` has a finished record in ``out_dir`` with what this run asks for: with ``keep_maps``, its
    anomaly maps too (a grid first run without keep_maps is run again for them) unless its method gives none."""
    record = read_record(record_path(out_dir, cell))
    if record is None:
        return False
    return "maps" in record or not keep_maps or not get_method(cell.method).pixel_maps


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def check_device(device: str) -> str:
    """``device`` if it is auto, cpu, cuda or cuda:N (available or not), else a one-line ConfigError."""
    return check_device_named("device", device)


def resolve_device(device: str) -> str:
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is visible")
    return device


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "anomalib", "lightning", "numpy"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def reset_peak_memory(device: str) -> str:
    """Starts counting the cell's peak memory; returns what ``peak_memory_mb`` will measure (``peak_memory_of``).

    CUDA: the allocator's peak on the cell's device ("cell"). CPU on Linux: the process's peak resident set
    (VmHWM), reset to the current one by writing 5 to /proc/self/clear_refs ("cell", though what the process
    held before the cell is part of it). Where that is not possible (not Linux, no permission) it is
    ``ru_maxrss``, the peak since the process started: with several cells in one process (``run_cells``) a later
    cell's value can be an earlier one's ("process").
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        return "cell"
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return "process"
    return "cell" if _vm_hwm_kib() is not None else "process"


def _vm_hwm_kib() -> int | None:
    """The process's peak resident set (KiB) from /proc/self/status, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _device_name(device: str) -> str:
    """The record's ``device``: the cell's GPU's name (cuda:1's, not the current GPU's), or the CPU cores."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores)"


def _peak_memory_mb(device: str, of: str = "cell") -> float:
    """The peak counted since ``reset_peak_memory`` returned ``of`` (see there), in MiB."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    hwm = _vm_hwm_kib() if of == "cell" else None
    if hwm is not None:
        return hwm / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Makes glibc serve allocations of ``threshold`` bytes and more with mmap, so freeing returns them.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB); blocks below it
    come from a heap that can fragment instead of reusing them. PatchCore's coreset loop frees a ~10 MB
    temporary per iteration, and on CPU a 64 px resnet18 cell on layers 1+2 grew to 12 GB resident
    (1.1 GB with this). Returns False where there is no glibc (nothing to do there).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        return False


def preflight(cell: Cell) -> None:
    """Checks the cell's dataset layout, few-shot images and backbone files without reading any weights.

    ``ad-eval run`` calls it first, so bad input is one line and writes nothing (not even a failure record).
    """
    from ad_eval.backbones import check_spec

    spec = get_method(cell.method)
    layers = spec.resolve_layers(cell.layers)
    cell_split(cell, spec, spec.make_config(cell.config), layers)
    check_spec(cell.backbone, cell.arch)
    if cell.projector is not None:  # reads the backbone weights for the digest: a mismatch is one line here
        from ad_eval.backbones import load_backbone

        projection = cell_projection(cell, load_backbone(cell.backbone, cell.arch, seed=cell.seed))
        projection.check_layers(layers, cell.method)


def cell_projection(cell: Cell, backbone):
    """The cell's projector checked against ``backbone``; its references are train images of the cell (a few-shot
    cell's among its K, see ``load_projection``)."""
    from ad_eval.datasets import scan
    from ad_eval.projection import load_projection

    train = scan(cell.dataset, cell.root, cell.category).train
    return load_projection(cell.projector, backbone, train, seed=cell.seed, category=cell.category,
                           shots=cell.projector_shots, cell_shots=cell.shots)


def cell_split(cell: Cell, spec, config, layers):
    """The cell's dataset split, its train images reduced to the few-shot choice, checked against the method."""
    from ad_eval.datasets import Split, scan
    from ad_eval.fewshot import select_shots

    split = scan(cell.dataset, cell.root, cell.category)
    if cell.shots is None:  # too few images for the method (or its batches) is one line, not a mid-fit crash
        spec.check_train_images(len(split.train), config, layers, cell.crop or cell.size)
        return split
    train = select_shots(split.train, cell.shots, seed=cell.seed, category=cell.category)
    spec.check_train_images(len(train), config, layers, cell.crop or cell.size, shots=cell.shots)
    return Split(train=train, test=split.test)


def compute_scores(cell: Cell, device: str, work_dir: Path):
    """Fits the cell's method; returns its MethodScores and the record fields the run adds.

    The dataset and the backbone are checked before any model is built. The added fields: the
    backbone's pre-training (``backbone_recipe``, ``backbone_seed``, ``backbone_steps`` for our
    backbone.pt files), for a few-shot cell the names of its ``train_images``, and with ``bn_stats='train'``
    the number of images the BatchNorm statistics were estimated on (``bn_images``: the cell's train images).
    """
    from ad_eval.backbones import load_backbone, provenance

    spec = get_method(cell.method)
    config = spec.make_config(cell.config)
    layers = spec.resolve_layers(cell.layers)
    split = cell_split(cell, spec, config, layers)
    extra: dict[str, Any] = {}
    if cell.shots is not None:
        extra["train_images"] = [sample.path.name for sample in split.train]
    backbone = load_backbone(cell.backbone, cell.arch, seed=cell.seed)
    extra.update(provenance(backbone))
    if cell.bn_stats == "train":
        from ad_eval.adabn import recalibrated

        backbone = recalibrated(backbone, split.train, size=cell.size, crop=cell.crop, device=device)
        extra["bn_images"] = len(split.train)
    if cell.projector is not None:
        from ad_eval.projection import attach

        projection = cell_projection(cell, backbone)
        projection.check_layers(layers, cell.method)
        extra.update(projection.record_fields())
        backbone = attach(backbone, projection)
    scores = spec.run(backbone, split, layers=layers, size=cell.size, crop=cell.crop, config=config, device=device,
                      seed=cell.seed, work_dir=work_dir)
    return scores, extra


def run_cell(cell: Cell, out_dir: str | Path, device: str = "auto", keep_maps: bool = False) -> dict:
    """Evaluates one cell and writes its record; returns the record (raises after writing a failure record).

    The record's ``peak_memory_mb`` is the cell's peak (GPU: allocated on its device; CPU: resident set) when
    ``peak_memory_of`` is "cell", and the whole process's peak so far when it is "process" (``reset_peak_memory``).
    """
    import numpy as np

    from ad_eval.metrics import compute_all

    out_dir = Path(out_dir)
    failed = out_dir / f"{cell.cell_id}{FAILED_SUFFIX}"
    start = time.perf_counter()
    return_large_frees_to_the_os()
    try:
        device = resolve_device(device)
        memory_of = reset_peak_memory(device)
        with tempfile.TemporaryDirectory(prefix="ad_eval_") as work:
            scores, extra = compute_scores(cell, device, Path(work))
        metrics = compute_all(scores.image_scores, scores.image_labels, scores.anomaly_maps, scores.masks)
        record = {
            "cell_id": cell.cell_id, **cell.to_dict(), "backbone_spec": cell.backbone, "backbone": cell.backbone_name,
            **extra, **metrics, "num_test": int(len(scores.image_labels)),
            "wall_time_s": round(time.perf_counter() - start, 3),
            "peak_memory_mb": round(_peak_memory_mb(device, memory_of), 1), "peak_memory_of": memory_of,
            "device": _device_name(device),
            "versions": _versions(), "host": platform.node(),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record.pop("backbone_name", None)
        if keep_maps and scores.anomaly_maps is not None:
            maps = out_dir / MAPS_DIR / f"{cell.cell_id}.npz"
            maps.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(maps, anomaly_maps=scores.anomaly_maps.astype(np.float16), masks=scores.masks,
                                image_scores=scores.image_scores, image_labels=scores.image_labels)
            record["maps"] = str(maps)
        write_json_atomic(record_path(out_dir, cell), record)
        failed.unlink(missing_ok=True)
        return record
    except Exception as err:
        write_json_atomic(failed, {
            "cell_id": cell.cell_id, **cell.to_dict(), "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(), "wall_time_s": round(time.perf_counter() - start, 3),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        raise


def run_cells(cells: list[Cell], out_dir: str | Path, device: str = "auto", keep_maps: bool = False) -> list[str]:
    """Runs several cells in one process (one array task): imports and CUDA init are paid once.

    A failing cell is recorded and the next one runs; returns one status line per cell.
    """
    status = []
    for cell in cells:
        if is_done(cell, Path(out_dir), keep_maps):
            status.append(f"{cell.cell_id}: already done")
            continue
        try:
            record = run_cell(cell, out_dir, device=device, keep_maps=keep_maps)
            status.append(f"{cell.cell_id}: image_AUROC {record['image_AUROC']:.4f} in {record['wall_time_s']:.1f}s")
        except Exception as err:  # recorded in <cell_id>.failed.json; the others go on
            status.append(f"{cell.cell_id}: FAILED {type(err).__name__}: {err}")
    return status
