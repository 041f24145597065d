"""Seeds into numbers: per-cell mean, sd and n, category averages, the layer set each method's tables use.

- Several seeds of one cell are averaged; their sd (ddof 1) and count go into ``results_long.csv`` and, when
  the table is a multi-seed one (``show_spread``), into the tables as "mean±sd".
- "Model Avg" of a (method, backbone) is the mean over the table's categories, only when every category has a
  value (a partial average would not be comparable with the other columns). Its sd is that of the per-seed
  averages over the seeds every category has.
- The tables use one layer set per method: the one asked for, else the set with the most (dataset, category,
  backbone) cells, ties going to the reference set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ad_eval.report.records import KEY, METRICS, layer_label, method_meta, normalize_layers


@dataclass(frozen=True)
class Stat:
    """A value over seeds: ``by_seed`` maps seed -> value (fractions); mean, sd (ddof 1, NaN below 2) and n."""

    by_seed: Mapping[int, float]

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.by_seed.values()))) if self.by_seed else np.nan

    @property
    def sd(self) -> float:
        return float(np.std(list(self.by_seed.values()), ddof=1)) if self.n > 1 else np.nan


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


def layer_sort_key(label: str) -> tuple:
    """"1+2" < "2+3" < "3+4" < "1+2+3": fewer layers first, then by layer numbers."""
    parts = label.split("+")
    return len(parts), [int(p) if p.isdigit() else math.inf for p in parts], label


def choose_layer_sets(records: pd.DataFrame, layers: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The layer set (label) the tables use per method: ``layers[method]``, else the one with the most cells."""
    chosen = {}
    for method, group in records.groupby("method"):
        if layers and method in layers:
            chosen[method] = layer_label(normalize_layers(layers[method]))
            continue
        counts = group.drop_duplicates(["dataset", "category", "backbone", "layer_set"])["layer_set"].value_counts()
        reference = layer_label(method_meta(method).default_layers)
        chosen[method] = min(counts.index, key=lambda s: (-counts[s], s != reference, layer_sort_key(s)))
    return chosen


def cell_stats(records: pd.DataFrame, metric: str) -> dict[tuple[str, str, str], Stat]:
    """(category, method, backbone) -> the seeds' values of ``metric`` (records of one table; nulls left out)."""
    values: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in records[records[metric].notna()].itertuples():
        values.setdefault((r.category, r.method, r.backbone), {})[r.seed] = getattr(r, metric)
    return {key: Stat(by_seed) for key, by_seed in values.items()}


def complete_mean(values: Mapping[tuple, float], keys: Iterable[tuple]) -> float:
    """Mean of values[k] over keys; NaN unless every key has a value (a partial mean would mislead)."""
    found = [values.get(k, np.nan) for k in keys]
    return float(np.mean(found)) if found and all(np.isfinite(found)) else np.nan


def average_stat(stats: Mapping[tuple, Stat], keys: list[tuple]) -> tuple[float, Stat]:
    """("Model Avg") the mean of the keys' means (NaN unless all have one) and the per-seed averages over the
    seeds that every key has (its sd is the spread of the average between seeds)."""
    mean = complete_mean({k: s.mean for k, s in stats.items()}, keys)
    if not np.isfinite(mean):
        return mean, Stat({})
    common = set.intersection(*(set(stats[k].by_seed) for k in keys))
    return mean, Stat({seed: float(np.mean([stats[k].by_seed[seed] for k in keys])) for seed in sorted(common)})


def show_spread(stats: Iterable[Stat]) -> bool:
    """Whether a table reports mean±sd: its values typically have two or more seeds (median n >= 2); a table
    where one cell was re-run with a second seed stays a table of means."""
    counts = [s.n for s in stats if s.n]
    return bool(counts) and float(np.median(counts)) >= 2


def typical_n(stats: Iterable[Stat]) -> int:
    """The most common seed count (the caption's n; values with another n say theirs)."""
    counts = pd.Series([s.n for s in stats if s.n])
    return int(counts.mode().min()) if len(counts) else 0
