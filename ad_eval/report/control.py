"""Every backbone against a control (``ad-eval report --control LABEL``): paired differences with their
standard error, as ``control_<dataset>[_<K>shot].{md,csv}``.

The project judges a backbone against a control (a random-init one, or the backbone before a change), so the
difference and its uncertainty belong in the report, computed as "Model Avg" is (``stats.average_stat``):

- a pair is the same (method, dataset, category, layer set, shots, seed) in the backbone and the control; the
  layer set is the tables' one (``stats.choose_layer_sets``);
- the categories are those with records in both; a seed counts only if every one of them has a pair there;
- per seed, the mean over the categories of (backbone - control); the row's difference is the mean over seeds;
- its standard error: the sd of the per-seed differences / sqrt(n seeds) with two or more seeds, else (one
  seed) the sd over categories / sqrt(n categories);
- wins / losses: the paired (category, seed) cells of those seeds where the backbone is above / below.

A metric that is null in any of those pairs (pixel metrics of a method without maps) has no difference ("-").
A random control (``ad-eval run --backbone random``) takes the cell seed as its init seed, so a pair shares the
training images and differs in the random init, as intended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ad_eval.report.order import METRIC_NAMES, order_methods
from ad_eval.report.records import method_label
from ad_eval.report.tables import MISSING, to_markdown

OVER_SEEDS, OVER_CATEGORIES, NO_SE = "seeds", "categories", "-"  # what a row's standard error is taken over
ROW_COLUMN = "Method · backbone"


@dataclass(frozen=True)
class MetricDifference:
    """One metric of a comparison: mean difference (fractions), its standard error (NaN when none), wins, losses."""

    mean: float
    se: float
    wins: int
    losses: int


@dataclass(frozen=True)
class Comparison:
    """One (method, backbone) against the control: the seeds and categories paired, per metric its difference
    (None when a pair has a null value)."""

    method: str
    backbone: str
    seeds: tuple[int, ...]
    categories: tuple[str, ...]
    metrics: dict[str, MetricDifference | None]

    @property
    def over(self) -> str:
        """What the standard error is taken over: seeds (2+), categories (one seed, 2+ categories), or nothing."""
        if len(self.seeds) > 1:
            return OVER_SEEDS
        return OVER_CATEGORIES if len(self.categories) > 1 else NO_SE

    @property
    def units(self) -> int:
        """How many values the standard error is taken over (seeds or categories; 1: no standard error)."""
        return {OVER_SEEDS: len(self.seeds), OVER_CATEGORIES: len(self.categories)}.get(self.over, 1)

    @property
    def t95(self) -> float:
        """Half-width factor of a two-sided 95% Student-t interval on ``units - 1`` degrees of freedom (NaN
        without a standard error): with 3 seeds 4.30, with 6 2.57; the normal 1.96 would overstate certainty."""
        from scipy.stats import t

        return float(t.ppf(0.975, self.units - 1)) if self.units > 1 else float("nan")

    @property
    def label(self) -> str:
        return f"{method_label(self.method)} · {self.backbone}"


def compare(records: pd.DataFrame, method: str, backbone: str, control: str,
            metrics: Sequence[str]) -> Comparison | str:
    """``backbone`` minus ``control`` for ``method`` on ``records`` (one dataset, one shots value, the tables'
    layer sets); a string says why there is no comparison."""
    of_method = records[records["method"] == method]
    own, ref = (of_method[of_method["backbone"] == b].set_index(["category", "seed"])[list(metrics)]
                for b in (backbone, control))
    categories = sorted(set(own.index.get_level_values("category")) & set(ref.index.get_level_values("category")))
    pairs = own.index.intersection(ref.index)
    if pairs.empty:
        return f"no (category, seed) pair with {control}"
    per_seed = pd.Series(pairs.get_level_values("category")).groupby(pairs.get_level_values("seed")).nunique()
    seeds = tuple(int(s) for s in per_seed.index[per_seed == len(categories)])
    if not seeds:
        return f"no seed has a pair with {control} in every category both have ({', '.join(categories)})"
    kept = [(c, s) for c, s in pairs if s in seeds]
    diff = own.loc[kept] - ref.loc[kept]
    return Comparison(method=method, backbone=backbone, seeds=seeds, categories=tuple(categories),
                      metrics={m: _difference(diff[m]) for m in metrics})


def _difference(diff: pd.Series) -> MetricDifference | None:
    """``diff`` indexed by (category, seed): mean over seeds of the per-seed category means, and its se."""
    if diff.isna().any():
        return None
    per_seed = diff.groupby(level="seed").mean()
    if len(per_seed) > 1:
        se = per_seed.std(ddof=1) / math.sqrt(len(per_seed))
    else:
        se = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else np.nan
    return MetricDifference(mean=float(per_seed.mean()), se=float(se), wins=int((diff > 0).sum()),
                            losses=int((diff < 0).sum()))


def compare_all(records: pd.DataFrame, backbones: Sequence[str], control: str,
                metrics: Sequence[str]) -> tuple[list[Comparison], list[tuple[str, str, str]]]:
    """Each (method, backbone other than the control) with records: (comparisons, (method, backbone, why) of
    those left out), methods in the paper's order, backbones in ``backbones``' order."""
    comparisons, left_out = [], []
    for method in order_methods(records["method"]):
        present = set(records.loc[records["method"] == method, "backbone"])
        for backbone in [b for b in backbones if b != control and b in present]:
            result = compare(records, method, backbone, control, metrics)
            if isinstance(result, str):
                left_out.append((method, backbone, result))
            else:
                comparisons.append(result)
    return comparisons, left_out


def points(value: float, sign: bool = False) -> str:
    """0.1351 -> "13.5" (percentage points), with ``sign`` "+13.5"; NaN -> "-"."""
    if not np.isfinite(value):
        return MISSING
    return f"{100 * value:{'+' if sign else ''}.1f}"


def markdown_table(comparisons: Sequence[Comparison], metrics: Sequence[str]) -> pd.DataFrame:
    """Per row "Method · backbone", per metric "Δ ± se" (points) and "W/L", then seeds, categories, se over."""
    rows = {}
    for comparison in comparisons:
        cells = {}
        for metric in metrics:
            d = comparison.metrics[metric]
            name = METRIC_NAMES[metric]
            if d is None:
                cells[f"{name} Δ ± se"], cells[f"{name} W/L"] = MISSING, MISSING
                continue
            cells[f"{name} Δ ± se"] = points(d.mean, sign=True) + (f" ± {points(d.se)}" if np.isfinite(d.se) else "")
            cells[f"{name} W/L"] = f"{d.wins}/{d.losses}"
        rows[comparison.label] = {**cells, "seeds": str(len(comparison.seeds)),
                                  "categories": str(len(comparison.categories)), "se over": comparison.over}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(ROW_COLUMN)


def csv_table(comparisons: Sequence[Comparison], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per comparison: method, backbone, n_seeds, n_categories, se_over, then per metric its mean
    difference and se (fractions), wins and losses; "-" for a metric without a difference."""
    rows = []
    for c in comparisons:
        row = {"method": c.method, "backbone": c.backbone, "n_seeds": len(c.seeds),
               "n_categories": len(c.categories), "se_over": c.over}
        for metric in metrics:
            d = c.metrics[metric]
            row.update({f"{metric}_diff": d.mean, f"{metric}_se": d.se if np.isfinite(d.se) else None,
                        f"{metric}_wins": d.wins, f"{metric}_losses": d.losses} if d else
                       dict.fromkeys((f"{metric}_{k}" for k in ("diff", "se", "wins", "losses")), None))
        rows.append(row)
    return pd.DataFrame(rows, dtype=object)  # object: counts stay integers beside a "-"


def caption(where: str, control: str, comparisons: Sequence[Comparison], random_control: bool) -> str:
    """What the numbers are: paired by seed, the difference's unit, what its se is taken over, and n."""
    overs = {(c.over, len(c.seeds), len(c.categories)) for c in comparisons}
    if len(overs) == 1:
        over, n_seeds, n_categories = next(iter(overs))
        spread = {OVER_SEEDS: f"standard error over n={n_seeds} seeds (sd of the per-seed differences / "
                              f"sqrt({n_seeds})), {n_categories} categories",
                  OVER_CATEGORIES: f"one seed: standard error over n={n_categories} categories (sd / "
                                   f"sqrt({n_categories}))",
                  NO_SE: "one seed and one category: no standard error"}[over]
    else:
        spread = ("standard error over seeds (sd of the per-seed differences / sqrt(n seeds)) where a row has "
                  "2+ seeds, else over categories; n per row")
    text = (f"{where}: difference to the control {control} (backbone - {control}, percentage points), paired by "
            "seed: same method, category, layer set, training images and seed in both. Mean over seeds of the "
            f"per-seed mean over categories (seeds with a pair in every category), ± its {spread}. W/L: paired "
            f"(category, seed) cells where the backbone is above/below {control}.")
    if random_control:
        text += (f" {control} is a random init whose init seed is the cell seed: a pair shares the training images, "
                 "not the init.")
    return text


def write_control_table(comparisons: Sequence[Comparison], metrics: Sequence[str], text: str, out_dir: Path,
                        name: str) -> list[Path]:
    """``<name>.md`` (the caption, then the table in points) and ``<name>.csv`` (fractions); returns the paths."""
    md, csv = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    md.write_text(to_markdown(markdown_table(comparisons, metrics), text))
    csv_table(comparisons, metrics).to_csv(csv, index=False, na_rep=MISSING)
    return [md, csv]
