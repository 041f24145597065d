"""Cell records for the report: read a results folder, validate each record, drop duplicate seeds.

Rules, so that no number in a table is wrong:

- Files ``*.failed.json`` (``ad_eval.cell.FAILED_SUFFIX``) are failures, listed in ``summary.md``. A record
  that is not valid JSON, lacks a key of ``REQUIRED_KEYS``, has a wrong type or a metric outside [0, 1] (the
  paper's anomalib AUPRO of 1.21) is skipped and named in a warning and in ``summary.md``. Other files (and
  hidden files, e.g. half-written ``.<name>.tmp``) are ignored; sub-folders are not read.
- ``layers: null`` means the method's reference layer set (``method_meta(method).default_layers``), so it
  merges with records that name that set.
- ``shots``: the number K of normal training images of a few-shot cell; null or absent = all of them
  (``ALL_SHOTS`` in the ``shots`` column).
- Two records of one cell with the same seed keep the one finished last, with a warning.

Method metadata (report label, reference layers, pixel maps) comes from ``method_meta`` only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ad_eval.cell import FAILED_SUFFIX
from ad_eval.methods import get_method
from ad_eval.methods.base import check_layers, layer_set_label
from fractal_pretrain.config import ConfigError

log = logging.getLogger(__name__)

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
REQUIRED_KEYS = ("cell_id", "method", "dataset", "category", "backbone", "layers", "seed", *METRICS)
ALL_SHOTS = 0  # the ``shots`` column of a record trained on every normal image (``shots`` null or absent)
KEY = ["dataset", "category", "method", "backbone", "layer_set", "shots"]  # one cell of the evaluation, seeds aside
NO_LAYERS = "default"  # layer-set label of methods without layers (CutPaste)
COLUMNS = ["file", "cell_id", *KEY[:4], "layers", "layer_set", "shots", "seed", *METRICS, "size", "crop", "arch",
           "backbone_spec", "root", "config", "maps", "finished_at"]


@dataclass(frozen=True)
class MethodMeta:
    """What the report needs to know of a method."""

    label: str  # column header, e.g. "PatchCore"
    default_layers: tuple[str, ...] | None  # what ``layers: null`` means; None for methods without layers
    pixel_maps: bool  # gives anomaly maps (pixel metrics, qualitative figure)


def method_meta(method: str) -> MethodMeta:
    """The report's one source of method metadata: the method registry (``ad_eval.methods.get_method``); a
    method it does not know (a record of a removed or plug-in method) keeps its name and has no reference set."""
    try:
        spec = get_method(method)
    except ConfigError:
        return MethodMeta(label=method, default_layers=None, pixel_maps=True)
    return MethodMeta(label=spec.label, default_layers=spec.default_layers, pixel_maps=spec.pixel_maps)


def method_label(method: str) -> str:
    return method_meta(method).label


def layer_label(layers: Sequence[str] | None) -> str:
    """("layer1", "layer2") -> "1+2" (the paper's j in {1, 2}); None -> "default"."""
    if not layers:
        return NO_LAYERS
    return layer_set_label(layers)


def normalize_layers(layers: str | Sequence[str | int] | None) -> tuple[str, ...] | None:
    """"2,3", "2+3", [2, 3] or ["layer3", "layer2"] -> ("layer2", "layer3") (``check_layers``); None stays None."""
    if layers is None:
        return None
    return check_layers(layers.replace("+", ",") if isinstance(layers, str) else layers)


def shots_label(shots: int) -> str:
    """ALL_SHOTS -> "all", 4 -> "4"."""
    return "all" if shots == ALL_SHOTS else str(shots)


def check_record(record: Any) -> str | None:
    """Why a cell record is unusable, or None."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    for key in ("cell_id", "method", "dataset", "category", "backbone"):
        if not isinstance(record[key], str) or not record[key]:
            return f"{key}={record[key]!r}: must be a non-empty string"
    layers = record["layers"]
    if layers is not None:
        if not isinstance(layers, list) or not layers or not all(isinstance(x, str) and x for x in layers):
            return f"layers={layers!r}: must be null or a non-empty list of layer names"
        try:
            check_layers(layers)
        except ValueError as err:
            return str(err)
    for key in ("seed", "shots"):
        value = record.get(key)
        if key == "shots" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or (key == "shots" and value < 1):
            return f"{key}={value!r}: must be an integer" + (" >= 1 or null" if key == "shots" else "")
    for metric in METRICS:
        value = record[metric]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            return f"{metric}={value!r}: must be null or a number in [0, 1]"
    return None


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"not valid JSON ({' '.join(str(err).split())})"


def _failure(path: Path) -> tuple[dict, str | None]:
    """A failure record with its file name; an unreadable one becomes a stub and a problem line."""
    data, error = _read_json(path)
    if error is None and not isinstance(data, dict):
        error = f"not a JSON object ({type(data).__name__})"
    if error is not None:
        data = {"cell_id": path.name[: -len(FAILED_SUFFIX)], "error": f"(unreadable: {error})"}
        error = f"{path.name}: unreadable failure record: {error}"
    return {**data, "file": path.name}, error


def _row(name: str, data: dict) -> dict:
    """One table row of a valid record: layers resolved and labelled, null metrics NaN, shots ALL_SHOTS for null."""
    layers = normalize_layers(data["layers"]) or method_meta(data["method"]).default_layers
    return {
        "file": name, "cell_id": data["cell_id"], "dataset": data["dataset"], "category": data["category"],
        "method": data["method"], "backbone": data["backbone"], "layers": layers, "layer_set": layer_label(layers),
        "shots": data.get("shots") or ALL_SHOTS, "seed": data["seed"],
        **{m: np.nan if data[m] is None else float(data[m]) for m in METRICS},
        "size": data.get("size"), "crop": data.get("crop"), "arch": data.get("arch"),
        "backbone_spec": data.get("backbone_spec"), "root": data.get("root"),
        "config": json.dumps(data.get("config"), sort_keys=True, default=str), "maps": data.get("maps"),
        "finished_at": str(data.get("finished_at") or ""),
    }


def load_records(results_dir: str | Path) -> tuple[pd.DataFrame, list[str], list[dict]]:
    """Reads the cell records of a results folder (not its sub-folders).

    Args:
        results_dir: folder holding ``<cell_id>.json`` records and ``<cell_id>.failed.json`` failures.

    Returns:
        (records, problems, failures): one row per valid record with the columns ``COLUMNS`` (``layers`` a
        normalised tuple, null resolved to the method's reference set; ``layer_set`` its label, e.g. "2+3";
        ``shots`` K or ``ALL_SHOTS``; metrics NaN for null; ``config`` canonical JSON); one line per skipped
        file ("<name>: <reason>"); and the failure records, each with its ``file`` name added.

    Raises:
        FileNotFoundError: when ``results_dir`` is not a folder.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: results folder not found")
    rows, problems, failures = [], [], []
    for path in sorted(results_dir.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not path.name.endswith(".json"):
            continue
        if path.name.endswith(FAILED_SUFFIX):
            failure, problem = _failure(path)
            failures.append(failure)
            problems += [problem] if problem else []
            continue
        data, error = _read_json(path)
        error = error or check_record(data)
        if error is not None:
            problems.append(f"{path.name}: {error}")
            continue
        rows.append(_row(path.name, data))
    for problem in problems:
        log.warning("skipped %s", problem)
    return pd.DataFrame(rows, columns=COLUMNS), problems, failures


def deduplicate(records: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One record per (cell, seed): the one finished last; a warning names each one dropped."""
    records = records.sort_values(["finished_at", "file"], kind="stable")
    warnings = []
    for _, group in records.groupby(KEY + ["seed"], sort=False):
        warnings += [f"{name}: same cell and seed as {group['file'].iloc[-1]} (finished later), ignored (report "
                     "--grid CONFIG reports only that grid's cells)"
                     for name in group["file"].iloc[:-1]]
    return records.drop_duplicates(KEY + ["seed"], keep="last").sort_index(), sorted(warnings)


def mixed_settings(records: pd.DataFrame) -> list[str]:
    """Warnings for (dataset, method, backbone, layer set, shots) columns whose records differ in size, crop, ..."""
    warnings = []
    for key, group in records.groupby(["dataset", "method", "backbone", "layer_set", "shots"], sort=True):
        for setting in ("size", "crop", "arch", "backbone_spec", "config"):
            values = sorted({str(v) for v in group[setting]})
            if len(values) > 1:
                name = "/".join(key[:4]) + ("" if key[4] == ALL_SHOTS else f"/{key[4]} shots")
                warnings.append(f"{name}: records differ in {setting} ({', '.join(values)}); averaged anyway")
    return warnings
