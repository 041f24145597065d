"""Figures 4-6: per method with two or more layer sets, bars per layer set and backbone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ad_eval.report.figures.common import backbone_colors, finish_figure, new_figure
from ad_eval.report.order import METRIC_NAMES, dataset_name, order_categories, order_methods
from ad_eval.report.records import method_label
from ad_eval.report.stats import complete_mean, layer_sort_key


def layers_figure(long: pd.DataFrame, records: pd.DataFrame, dataset: str, metric: str, backbones: Sequence[str],
                  path: Path) -> tuple[bool, list[str]]:
    """Bars of the mean over categories, per layer set and backbone, one panel per method.

    All bars of a method average the same categories: those with a value for every layer set and backbone (a
    layer study may cover fewer categories than the main runs); the notes say when that is not all of them.
    ``long`` and ``records`` are those of one shots value. Returns (written, notes).
    """
    sel = long[(long["dataset"] == dataset) & (long["metric"] == metric) & long["mean"].notna()]
    methods = [m for m in order_methods(sel["method"]) if sel.loc[sel["method"] == m, "layer_set"].nunique() > 1]
    if not methods:
        return False, ["no method has two or more layer sets with values"]
    colors, notes, plots = backbone_colors(backbones), [], []
    for method in methods:
        run = set(records.loc[(records["dataset"] == dataset) & (records["method"] == method), "category"])
        sets = sorted(set(sel.loc[sel["method"] == method, "layer_set"]), key=layer_sort_key)
        values = {(r.category, r.layer_set, r.backbone): r.mean for r in sel[sel["method"] == method].itertuples()}
        cats = sorted(c for c in run if all((c, s, b) in values for s in sets for b in backbones))
        name = method_label(method)
        if not cats:
            notes.append(f"{name} left out: no category has a value for every layer set and backbone")
        else:
            plots.append((method, sets, values, cats))
            if len(cats) < len(run):
                notes.append(f"{name}: bars average the {len(cats)} of {len(run)} categories with a value for every "
                             f"layer set and backbone ({', '.join(order_categories(dataset, cats))})")
    if not plots:
        return False, notes
    fig = new_figure(max(4.0, 3.2 * len(plots)), 3.6)
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
        ax.set_title(f"{method_label(method)} ({len(cats)} categor{'y' if len(cats) == 1 else 'ies'})")
        ax.set_ylim(0, 105)
        if i == 0:
            ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
    title = f"{dataset_name(dataset)}: average {METRIC_NAMES[metric]} per layer set"
    finish_figure(fig, ax, title, path, ncols=len(backbones))
    return True, notes
