"""Paper tables 1-6 and figures 3-6 from a folder of cell records (``ad-eval report``).

Reads every ``<cell_id>.json`` that ``ad_eval.cell.run_cell`` wrote into a results folder and
writes, for each dataset present and each metric, the table of Ugwu et al., "Fractals as
Pre-training Datasets for Anomaly Detection and Localization" (tables 1-6): one row per category
plus "Model Avg", one column per method, each cell "ImageNet/Fractals" in percent with one decimal
(any list of backbone labels here, e.g. "98.0/40.9" or "98.0/40.9/12.3"), as Markdown, CSV and
LaTeX. Figures (PNG): the category-group spider charts of section 5.2 (figure 3) and the
layer-hierarchy bar charts of section 5.3 (figures 4-6).

Rules, so that no number in a table is wrong:

- A missing value prints "-" (the paper does this for FastFlow/carpet AUPRO), e.g. "99.1/-".
- "Model Avg" of a (method, backbone) is the mean over the table's categories, shown only when
  every category of the table has a value for it; otherwise "-". A partial average would not be
  comparable with the other columns.
- Several seeds of one cell are averaged (their mean, std and count are in ``results_long.csv``).
  Two records with the same seed keep the one finished last, with a warning.
- ``layers: null`` in a record means the method's reference layer set (``REFERENCE_LAYERS``, the
  same as ``ad_eval.methods.anomalib_models.DEFAULT_LAYERS``), so it merges with records that name
  that set. The tables use one layer set per method: the ``layers`` argument, else the set with
  the most (dataset, category, backbone) cells, ties going to the reference set. All layer sets go
  into ``results_long.csv`` and the layer figures.
- Files ``*.failed.json`` are failures, listed in ``summary.md``. A record that is not valid JSON,
  lacks a key of ``REQUIRED_KEYS``, has a wrong type or a metric outside [0, 1] (the paper's
  anomalib AUPRO of 1.21) is skipped and named in a warning and in ``summary.md``. Other files
  (and hidden files, e.g. half-written ``.<name>.tmp``) are ignored; sub-folders are not read.

Rows follow the paper's order (MVTec textures then objects; VisA alphabetical), then unknown
categories alphabetically; columns follow the paper's order (FastFlow, C-Flow, PatchCore, PaDiM,
RD, STFPM, CutPaste, PANDA), then unknown methods. A method whose metric is null everywhere in a
dataset (PANDA and CutPaste at pixel level) has no column in that table, as in the paper.

Example::

    from ad_eval.report import build_report
    out = build_report("results/", "report/", backbones=["ImageNet", "Fractals"])
    print(out["summary"], out["problems"])
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ad_eval.methods import get_method, list_methods

log = logging.getLogger(__name__)

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
METRIC_NAMES = {"image_AUROC": "image-level AUROC", "pixel_AUROC": "pixel-level AUROC", "pixel_AUPRO": "AUPRO"}
DATASET_NAMES = {"mvtec": "MVTec", "visa": "VisA"}
METHOD_ORDER = ("fastflow", "cflow", "patchcore", "padim", "rd", "stfpm", "cutpaste", "panda")  # paper's tables
METHOD_NAMES = {"fastflow": "FastFlow", "cflow": "C-Flow", "patchcore": "PatchCore", "padim": "PaDiM", "rd": "RD",
                "stfpm": "STFPM", "cutpaste": "CutPaste", "panda": "PANDA"}
# Category groups of the paper's section 5.2; the row order of its tables is the groups' order.
CATEGORY_GROUPS = {
    "mvtec": {
        "textures": ("carpet", "grid", "leather", "tile", "wood"),
        "objects": ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
                    "transistor", "zipper"),
    },
    "visa": {
        "pcb": ("pcb1", "pcb2", "pcb3", "pcb4"),
        "multi-in": ("candle", "capsules", "macaroni1", "macaroni2"),
        "single-in": ("cashew", "chewinggum", "fryum", "pipe_fryum"),
    },
}
CATEGORY_ORDER = {
    "mvtec": CATEGORY_GROUPS["mvtec"]["textures"] + CATEGORY_GROUPS["mvtec"]["objects"],
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
             "pcb4", "pipe_fryum"),
}
REFERENCE_LAYERS = {m: get_method(m).default_layers for m in list_methods()}  # what ``layers: null`` means
REQUIRED_KEYS = ("cell_id", "method", "dataset", "category", "backbone", "layers", "seed", *METRICS)
FAILED_SUFFIX = ".failed.json"
MISSING = "-"
AVG_ROW = "Model Avg"
CLASS_COLUMN = "Class"
NO_LAYERS = "default"  # layer-set label of methods without layers (CutPaste)
SPIDER_METRICS = ("image_AUROC",)  # the paper's figure 3
BACKBONE_COLORS = {"ImageNet": "tab:blue", "Fractals": "tab:red"}  # the paper's figures 4-6
OTHER_COLORS = ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
KEY = ["dataset", "category", "method", "backbone", "layer_set"]  # one cell of the evaluation, seeds aside
LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


# ---------------------------------------------------------------- reading


def layer_label(layers: Sequence[str] | None) -> str:
    """("layer1", "layer2") -> "1+2" (the paper's j in {1, 2}); None -> "default"."""
    if not layers:
        return NO_LAYERS
    return "+".join(name[5:] if name.startswith("layer") and name[5:].isdigit() else name for name in layers)


def normalize_layers(layers: str | Sequence[str | int] | None) -> tuple[str, ...] | None:
    """"2,3", [2, 3] or ["layer3", "layer2"] -> ("layer2", "layer3"): sorted, without repeats, like check_layers."""
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [part.strip() for part in layers.replace("+", ",").split(",") if part.strip()]
    names = {f"layer{layer}" if str(layer).isdigit() else str(layer) for layer in layers}
    return tuple(sorted(names)) or None


def _check_record(record: Any) -> str | None:
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
    if layers is not None and (not isinstance(layers, list) or not layers
                               or not all(isinstance(x, str) and x for x in layers)):
        return f"layers={layers!r}: must be null or a non-empty list of layer names"
    if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
        return f"seed={record['seed']!r}: must be an integer"
    for metric in METRICS:
        value = record[metric]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            return f"{metric}={value!r}: must be null or a number in [0, 1]"
    return None


def load_records(results_dir: str | Path) -> tuple[pd.DataFrame, list[str], list[dict]]:
    """Reads the cell records of a results folder (not its sub-folders).

    Args:
        results_dir: folder holding ``<cell_id>.json`` records and ``<cell_id>.failed.json`` failures.

    Returns:
        (records, problems, failures): one row per valid record, with the columns ``file``, ``cell_id``,
        ``dataset``, ``category``, ``method``, ``backbone``, ``layers`` (normalised tuple; null resolved to the
        method's reference set), ``layer_set`` (its label, e.g. "2+3"), ``seed``, the metrics (NaN for null),
        ``size``, ``crop``, ``arch``, ``backbone_spec``, ``config`` (canonical JSON) and ``finished_at``; one line
        per skipped file ("<name>: <reason>"); and the failure records, each with its ``file`` name added.

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
        try:
            data = json.loads(path.read_text())
            error = None
        except (OSError, UnicodeDecodeError, ValueError) as err:
            data, error = None, f"not valid JSON ({' '.join(str(err).split())})"
        if path.name.endswith(FAILED_SUFFIX):
            if error is None and not isinstance(data, dict):
                error = f"not a JSON object ({type(data).__name__})"
            if error is not None:
                problems.append(f"{path.name}: unreadable failure record: {error}")
                data = {"cell_id": path.name[: -len(FAILED_SUFFIX)], "error": f"(unreadable: {error})"}
            failures.append({**data, "file": path.name})
            continue
        error = error or _check_record(data)
        if error is not None:
            problems.append(f"{path.name}: {error}")
            continue
        layers = normalize_layers(data["layers"]) or REFERENCE_LAYERS.get(data["method"])
        rows.append({
            "file": path.name, "cell_id": data["cell_id"], "dataset": data["dataset"], "category": data["category"],
            "method": data["method"], "backbone": data["backbone"], "layers": layers, "layer_set": layer_label(layers),
            "seed": data["seed"], **{m: np.nan if data[m] is None else float(data[m]) for m in METRICS},
            "size": data.get("size"), "crop": data.get("crop"), "arch": data.get("arch"),
            "backbone_spec": data.get("backbone_spec"),
            "config": json.dumps(data.get("config"), sort_keys=True, default=str),
            "finished_at": str(data.get("finished_at") or ""),
        })
    for problem in problems:
        log.warning("skipped %s", problem)
    columns = ["file", "cell_id", *KEY[:4], "layers", "layer_set", "seed", *METRICS, "size", "crop", "arch",
               "backbone_spec", "config", "finished_at"]
    return pd.DataFrame(rows, columns=columns), problems, failures


# ---------------------------------------------------------------- aggregation


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    """Known values in ``order``, then the others alphabetically."""
    values = set(values)
    return [v for v in order if v in values] + sorted(values - set(order))


def order_categories(dataset: str, categories: Iterable[str]) -> list[str]:
    return _ordered(categories, CATEGORY_ORDER.get(dataset, ()))


def order_methods(methods: Iterable[str]) -> list[str]:
    return _ordered(methods, METHOD_ORDER)


def default_backbones(labels: Iterable[str]) -> list[str]:
    """All labels sorted, "ImageNet" first (the paper's "ImageNet/Fractals")."""
    return sorted(set(labels), key=lambda label: (label != "ImageNet", label))


def _layer_sort_key(label: str) -> tuple:
    """"1+2" < "2+3" < "3+4" < "1+2+3": fewer layers first, then by layer numbers."""
    parts = label.split("+")
    return len(parts), [int(p) if p.isdigit() else math.inf for p in parts], label


def deduplicate(records: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One record per (cell, seed): the one finished last; a warning names each one dropped."""
    records = records.sort_values(["finished_at", "file"], kind="stable")
    warnings = []
    for _, group in records.groupby(KEY + ["seed"], sort=False):
        warnings += [f"{name}: same cell and seed as {group['file'].iloc[-1]} (finished later), ignored"
                     for name in group["file"].iloc[:-1]]
    return records.drop_duplicates(KEY + ["seed"], keep="last").sort_index(), sorted(warnings)


def mixed_settings(records: pd.DataFrame) -> list[str]:
    """Warnings for (dataset, method, backbone, layer set) columns whose records differ in size, crop, arch, ..."""
    warnings = []
    for key, group in records.groupby(["dataset", "method", "backbone", "layer_set"], sort=True):
        for setting in ("size", "crop", "arch", "backbone_spec", "config"):
            values = sorted({str(v) for v in group[setting]})
            if len(values) > 1:
                warnings.append(f"{'/'.join(key)}: records differ in {setting} ({', '.join(values)}); averaged anyway")
    return warnings


def aggregate(records: pd.DataFrame) -> pd.DataFrame:
    """Long format: one row per (cell, metric) with the mean, std (ddof 1) and count of its non-null seed values."""
    long = records.melt(id_vars=KEY + ["seed"], value_vars=list(METRICS), var_name="metric", value_name="value")
    rows = []
    for key, group in long.groupby(KEY + ["metric"], sort=False):
        values = group["value"].dropna()
        rows.append({**dict(zip(KEY + ["metric"], key, strict=True)), "mean": values.mean() if len(values) else np.nan,
                     "std": values.std(ddof=1) if len(values) > 1 else np.nan, "n": len(values),
                     "seeds": ",".join(str(s) for s in sorted(group.loc[group["value"].notna(), "seed"]))})
    return pd.DataFrame(rows, columns=KEY + ["metric", "mean", "std", "n", "seeds"])


def choose_layer_sets(records: pd.DataFrame, layers: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The layer set (label) the tables use per method: ``layers[method]``, else the one with the most cells."""
    chosen = {}
    for method, group in records.groupby("method"):
        if layers and method in layers:
            chosen[method] = layer_label(normalize_layers(layers[method]))
            continue
        counts = group.drop_duplicates(["dataset", "category", "backbone", "layer_set"])["layer_set"].value_counts()
        reference = layer_label(REFERENCE_LAYERS.get(method))
        chosen[method] = min(counts.index, key=lambda s: (-counts[s], s != reference, _layer_sort_key(s)))
    return chosen


# ---------------------------------------------------------------- tables


def format_value(value: float) -> str:
    """0.9812 -> "98.1"; NaN -> "-"."""
    return MISSING if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def table_values(long: pd.DataFrame, dataset: str, metric: str, categories: Sequence[str],
                 layer_sets: Mapping[str, str]) -> dict[tuple[str, str, str], float]:
    """(category, method, backbone) -> seed mean, for the tables' layer set of each method."""
    sel = long[(long["dataset"] == dataset) & (long["metric"] == metric) & long["mean"].notna()
               & long["category"].isin(categories)]
    sel = sel[sel["layer_set"] == sel["method"].map(layer_sets)]
    return {(r.category, r.method, r.backbone): r.mean for r in sel.itertuples()}


def complete_mean(values: Mapping[tuple, float], keys: Iterable[tuple]) -> float:
    """Mean of values[k] over keys; NaN unless every key has a value (a partial mean would mislead)."""
    found = [values.get(k, np.nan) for k in keys]
    return float(np.mean(found)) if found and all(np.isfinite(found)) else np.nan


def make_table(values: Mapping[tuple[str, str, str], float], categories: Sequence[str], methods: Sequence[str],
               backbones: Sequence[str]) -> pd.DataFrame:
    """Strings "a/b" per (category, method), plus the "Model Avg" row; columns are the methods' display names."""
    table = {}
    for method in methods:
        cells = ["/".join(format_value(values.get((c, method, b), np.nan)) for b in backbones) for c in categories]
        avg = "/".join(format_value(complete_mean(values, [(c, method, b) for c in categories])) for b in backbones)
        table[METHOD_NAMES.get(method, method)] = [*cells, avg]
    return pd.DataFrame(table, index=pd.Index([*categories, AVG_ROW], name=CLASS_COLUMN))


def to_markdown(table: pd.DataFrame, caption: str) -> str:
    """A padded GitHub Markdown table under a caption line; the class column left-aligned, the others right."""
    header = [table.index.name, *table.columns]
    body = [[str(idx), *row] for idx, row in zip(table.index, table.to_numpy().tolist(), strict=True)]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"
    return "\n".join([caption, "", line(header), rule, *(line(r) for r in body)]) + "\n"


def _latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in text)


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``), "Model Avg" under a rule as in the paper."""
    rows = [[str(idx), *row] for idx, row in zip(table.index, table.to_numpy().tolist(), strict=True)]
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(caption)}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule",
             " & ".join(_latex_escape(c) for c in [table.index.name, *table.columns]) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        if i == len(rows) - 1:
            lines.append(r"\midrule")
        lines.append(" & ".join(_latex_escape(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- figures


def backbone_colors(backbones: Sequence[str]) -> dict[str, str]:
    """ImageNet blue, Fractals red (the paper's figures 4-6); other labels get the remaining colours."""
    others = iter(OTHER_COLORS * (len(backbones) // len(OTHER_COLORS) + 1))
    return {b: BACKBONE_COLORS.get(b) or next(others) for b in backbones}


def _new_figure(width: float, height: float):
    # Figure without pyplot: no global backend state; savefig renders PNG with Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def spider_figure(values: Mapping[tuple[str, str, str], float], dataset: str, metric: str,
                  categories: Sequence[str], methods: Sequence[str], backbones: Sequence[str],
                  path: Path) -> tuple[bool, list[str]]:
    """Figure 3: one polar panel per backbone, one axis per method, one polygon per category group.

    A group's value is the mean over its categories that the table has; a method whose group mean is incomplete
    for some backbone is left out. Returns (written, notes).
    """
    groups = {g: [c for c in cats if c in categories] for g, cats in CATEGORY_GROUPS.get(dataset, {}).items()}
    groups = {g: cats for g, cats in groups.items() if cats}
    if not groups:
        return False, [f"no category groups known for {dataset!r}" if dataset not in CATEGORY_GROUPS
                       else "no category of its groups is in the table"]
    means = {(g, m, b): complete_mean(values, [(c, m, b) for c in cats])
             for g, cats in groups.items() for m in methods for b in backbones}
    kept = [m for m in methods if all(np.isfinite(means[g, m, b]) for g in groups for b in backbones)]
    notes = [f"{METHOD_NAMES.get(m, m)} left out (a group lacks a value for some backbone)"
             for m in methods if m not in kept]
    if not kept:
        return False, [*notes, "no method has values for every group and backbone"]
    pct = 100 * np.array([means[k] for k in means if k[1] in kept])
    low = max(0.0, 10 * math.floor((pct.min() - 5) / 10))
    angles = np.linspace(0, 2 * np.pi, len(kept), endpoint=False)
    closed = np.append(angles, angles[0])
    group_colors = dict(zip(groups, ("tab:blue", "tab:red", "tab:green", "tab:orange"), strict=False))
    fig = _new_figure(4.2 * len(backbones), 4.6)
    for i, backbone in enumerate(backbones):
        ax = fig.add_subplot(1, len(backbones), i + 1, projection="polar")
        for group in groups:
            v = [100 * means[group, m, backbone] for m in kept]
            ax.plot(closed, [*v, v[0]], "o-", color=group_colors.get(group, "tab:gray"), label=group, lw=1.5, ms=3)
            ax.fill(closed, [*v, v[0]], color=group_colors.get(group, "tab:gray"), alpha=0.15)
        ax.set_xticks(angles, [METHOD_NAMES.get(m, m) for m in kept])
        ax.set_ylim(low, 100)
        ax.set_title(backbone, pad=16)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(groups))
    fig.suptitle(f"{DATASET_NAMES.get(dataset, dataset)}: average {METRIC_NAMES[metric]} (%) by category group")
    fig.savefig(path, dpi=150)
    return True, notes


def layers_figure(long: pd.DataFrame, records: pd.DataFrame, dataset: str, metric: str, backbones: Sequence[str],
                  path: Path) -> tuple[bool, list[str]]:
    """Figures 4-6: per method with two or more layer sets, bars per layer set and backbone (mean over categories).

    All bars of a method average the same categories: those with a value for every layer set and backbone (a
    layer study may cover fewer categories than the main runs); the notes say when that is not all of them.
    Returns (written, notes).
    """
    sel = long[(long["dataset"] == dataset) & (long["metric"] == metric) & long["mean"].notna()]
    methods = [m for m in order_methods(sel["method"]) if sel.loc[sel["method"] == m, "layer_set"].nunique() > 1]
    if not methods:
        return False, ["no method has two or more layer sets with values"]
    colors, notes, plots = backbone_colors(backbones), [], []
    for method in methods:
        run = set(records.loc[(records["dataset"] == dataset) & (records["method"] == method), "category"])
        sets = sorted(set(sel.loc[sel["method"] == method, "layer_set"]), key=_layer_sort_key)
        values = {(r.category, r.layer_set, r.backbone): r.mean for r in sel[sel["method"] == method].itertuples()}
        cats = sorted(c for c in run if all((c, s, b) in values for s in sets for b in backbones))
        name = METHOD_NAMES.get(method, method)
        if not cats:
            notes.append(f"{name} left out: no category has a value for every layer set and backbone")
        else:
            plots.append((method, sets, values, cats))
            if len(cats) < len(run):
                notes.append(f"{name}: bars average the {len(cats)} of {len(run)} categories with a value for every "
                             f"layer set and backbone ({', '.join(order_categories(dataset, cats))})")
    if not plots:
        return False, notes
    fig = _new_figure(max(4.0, 3.2 * len(plots)), 3.6)
    for i, (method, sets, values, cats) in enumerate(plots):
        ax = fig.add_subplot(1, len(plots), i + 1)
        width = 0.8 / len(backbones)
        for j, backbone in enumerate(backbones):
            heights = [100 * complete_mean(values, [(c, s, backbone) for c in cats]) for s in sets]
            x = np.arange(len(sets)) + (j - (len(backbones) - 1) / 2) * width
            bars = ax.bar(x, heights, width, color=colors[backbone], label=backbone)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(np.arange(len(sets)), sets)
        ax.set_xlabel("feature hierarchy j")
        ax.set_title(f"{METHOD_NAMES.get(method, method)} ({len(cats)} categories)")
        ax.set_ylim(0, 105)
        if i == 0:
            ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(backbones))
    fig.suptitle(f"{DATASET_NAMES.get(dataset, dataset)}: average {METRIC_NAMES[metric]} per layer set")
    fig.savefig(path, dpi=150)
    return True, notes


# ---------------------------------------------------------------- report


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    """"a,b" or ["a", "b"] -> ["a", "b"] (so that a CLI can pass its strings through)."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)


def build_report(results_dir: str | Path, out_dir: str | Path, backbones: str | Sequence[str] | None = None,
                 metrics: str | Sequence[str] = METRICS, layers: Mapping[str, Any] | None = None, *,
                 spider_metrics: str | Sequence[str] = SPIDER_METRICS) -> dict[str, Any]:
    """Writes the paper's tables and figures for the records in ``results_dir`` into ``out_dir``.

    Args:
        results_dir: folder of ``<cell_id>.json`` records (see ``load_records``).
        out_dir: created if needed; gets ``table_<dataset>_<metric>.{md,csv,tex}``, ``spider_<dataset>_<metric>.png``,
            ``layers_<dataset>_<metric>.png``, ``results_long.csv`` and ``summary.md``.
        backbones: backbone labels, in the order of each cell "a/b"; a list or "ImageNet,Fractals". Default: all
            labels found, sorted, "ImageNet" first. Records of other labels are left out (and counted).
        metrics: metrics of the tables and layer figures, from ``METRICS``.
        layers: method -> layer set of the tables (e.g. ``{"padim": "1,2,3"}``); default per method: the set with
            the most cells (ties: the reference set).
        spider_metrics: metrics with a spider chart (the paper: image-level AUROC only); only those in ``metrics``.

    Returns:
        ``{"tables": [paths], "figures": [paths], "results_long": path, "summary": path, "problems": [...],
        "failures": [...], "warnings": [...], "skipped": [...], "missing": [...]}``; problems name the skipped
        record files, skipped the figures not drawn and why, missing the (dataset, method, category, backbone)
        cells without a record.
    """
    metrics = _as_list(metrics) or []
    spider_metrics = [m for m in _as_list(spider_metrics) or [] if m in metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics={unknown}: unknown (known: {', '.join(METRICS)})")
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    records, problems, failures = load_records(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_read, done_ids = len(records), set(records["cell_id"])
    found_backbones = default_backbones(records["backbone"])
    backbones = _as_list(backbones) or found_backbones
    warnings = [f"backbone {b!r} has no record" for b in backbones if b not in found_backbones]
    other = sorted(set(found_backbones) - set(backbones))
    if other:
        warnings.append(f"records of backbone(s) {', '.join(other)} left out (not requested)")
    records = records[records["backbone"].isin(backbones)]
    records, duplicates = deduplicate(records)
    warnings += duplicates + mixed_settings(records)
    long = aggregate(records)
    layer_sets = choose_layer_sets(records, layers)
    warnings += [f"layers[{m!r}] = {s}: no record of {m} with that layer set" for m, s in layer_sets.items()
                 if not ((records["method"] == m) & (records["layer_set"] == s)).any()]
    long["in_tables"] = long["layer_set"] == long["method"].map(layer_sets)
    main = records[records["layer_set"] == records["method"].map(layer_sets)]

    tables, figures, skipped, missing, nulls, notes = [], [], [], [], [], []
    datasets = _ordered(records["dataset"], tuple(DATASET_NAMES))
    for dataset in datasets:
        categories = order_categories(dataset, records.loc[records["dataset"] == dataset, "category"])
        ds_methods = order_methods(main.loc[main["dataset"] == dataset, "method"])
        ran = order_methods(records.loc[records["dataset"] == dataset, "method"])
        warnings += [f"{DATASET_NAMES.get(dataset, dataset)}: {METHOD_NAMES.get(m, m)} has records but none with "
                     f"the tables' layer set {layer_sets[m]}: no column" for m in ran if m not in ds_methods]
        done = set(main.loc[main["dataset"] == dataset, ["category", "method", "backbone"]].itertuples(index=False))
        missing += [(dataset, m, c, b) for m in ds_methods for c in categories for b in backbones
                    if (c, m, b) not in done]
        for metric in metrics:
            name, title = f"{dataset}_{metric}", f"{DATASET_NAMES.get(dataset, dataset)} {METRIC_NAMES[metric]}"
            values = table_values(long, dataset, metric, categories, layer_sets)
            methods = [m for m in ds_methods if any(k[1] == m for k in values)]
            nulls += [f"{title}: {METHOD_NAMES.get(m, m)} / {c} / {b}" for m in methods for c in categories
                      for b in backbones if (c, m, b) in done and (c, m, b) not in values]
            if not methods:
                skipped.append(f"table_{name}: no values")
                continue
            table = make_table(values, categories, methods, backbones)
            caption = f"{title} (%). Each cell carries the results for {'/'.join(backbones)}."
            for ext, text in (("md", to_markdown(table, caption)), ("tex", to_latex(table, caption, f"tab:{name}")),
                              ("csv", table.to_csv())):
                (out_dir / f"table_{name}.{ext}").write_text(text)
                tables.append(out_dir / f"table_{name}.{ext}")
            for kind in ("spider", "layers") if metric in spider_metrics else ("layers",):
                path = out_dir / f"{kind}_{name}.png"
                if kind == "spider":
                    written, why = spider_figure(values, dataset, metric, categories, methods, backbones, path)
                else:
                    written, why = layers_figure(long, records, dataset, metric, backbones, path)
                if written:
                    figures.append(path)
                    notes += [f"{path.name}: {n}" for n in why]
                else:
                    skipped.append(f"{path.name}: {'; '.join(why)}")

    long_path = out_dir / "results_long.csv"
    _sorted_long(long, datasets).to_csv(long_path, index=False)

    n_multi = long.loc[long["n"] > 1, KEY].drop_duplicates().shape[0]
    head = [f"records read: {n_read}; used: {len(records)} (after the backbone selection and duplicates)",
            f"failures: {len(failures)}", f"corrupt files skipped: {len(problems)}",
            f"backbones (order in each cell): {'/'.join(backbones)}",
            "layer sets of the tables: " + ", ".join(f"{METHOD_NAMES.get(m, m)} {layer_sets[m]}"
                                                     for m in order_methods(layer_sets)),
            f"cells averaged over several seeds: {n_multi} (mean, std, n in `results_long.csv`, in fractions; "
            "the tables are in percent)",
            'Model Avg: mean over the table\'s categories, "-" unless every one of them has a value']
    for dataset in datasets:
        present = set(records.loc[records["dataset"] == dataset, "category"])
        absent = [c for c in CATEGORY_ORDER.get(dataset, ()) if c not in present]
        if absent:
            head.append(f"{DATASET_NAMES.get(dataset, dataset)}: no record for {len(absent)} of "
                        f"{len(CATEGORY_ORDER[dataset])} categories ({', '.join(absent)}); its averages are over "
                        "the categories present only")
    sections = {
        "Corrupt files (skipped)": [f"`{p.split(': ', 1)[0]}`: {p.split(': ', 1)[1]}" for p in problems],
        "Failures": [f"`{f.get('cell_id')}` ({f['file']}): {(str(f.get('error', '')).splitlines() or [''])[0]}"
                     + (" (a result exists too)" if f.get("cell_id") in done_ids else "") for f in failures],
        "Warnings": warnings,
        "Tables written": [p.name for p in tables],
        "Figures written": [p.name for p in figures],
        "Figure notes": notes,
        "Not written": skipped,
        "Missing cells (method / category / backbone without a record)":
            [f"{DATASET_NAMES.get(d, d)}: {METHOD_NAMES.get(m, m)} / {c} / {b}" for d, m, c, b in missing],
        "Missing values (a record with a null metric)": nulls,
    }
    summary_path = out_dir / "summary.md"
    summary_path.write_text(_summary(f"Report of `{results_dir}`", head, sections))
    return {"tables": tables, "figures": figures, "results_long": long_path, "summary": summary_path,
            "problems": problems, "failures": failures, "warnings": warnings, "skipped": skipped, "missing": missing}


def _sorted_long(long: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    """Rows in the tables' order: dataset, method, category, backbone, layer set, metric."""
    methods = {m: i for i, m in enumerate(order_methods(long["method"]))}
    layer_sets = sorted(set(long["layer_set"]), key=_layer_sort_key)
    categories = {(d, c): i for d in datasets
                  for i, c in enumerate(order_categories(d, long.loc[long["dataset"] == d, "category"]))}
    keys = pd.DataFrame({
        "d": long["dataset"].map({d: i for i, d in enumerate(datasets)}), "m": long["method"].map(methods),
        "c": [categories[d, c] for d, c in zip(long["dataset"], long["category"], strict=True)],
        "b": long["backbone"], "l": long["layer_set"].map({s: i for i, s in enumerate(layer_sets)}),
        "x": long["metric"].map({m: i for i, m in enumerate(METRICS)}),
    }, index=long.index)
    return long.loc[keys.sort_values(list(keys.columns), kind="stable").index]


def _summary(title: str, head: Sequence[str], sections: Mapping[str, Sequence[str]]) -> str:
    """Markdown: a title, a bullet list, then one section per non-empty list, its count in the heading."""
    lines = [f"# {title}", "", *(f"- {line}" for line in head)]
    for heading, items in sections.items():
        if items:
            lines += ["", f"## {heading} ({len(items)})", "", *(f"- {item}" for item in items)]
    return "\n".join(lines) + "\n"
