"""Few-shot curves: AUROC (or any metric) against the number K of normal training images, one panel per
method, one line per backbone; "all" (every training image) is the last point, after a gap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ad_eval.report.figures.common import backbone_colors, finish_figure, new_figure
from ad_eval.report.order import METRIC_NAMES, dataset_name, order_categories, order_methods
from ad_eval.report.records import ALL_SHOTS, method_label, shots_label
from ad_eval.report.stats import average_stat, cell_stats


def fewshot_figure(records: pd.DataFrame, dataset: str, metric: str, backbones: Sequence[str],
                   path: Path) -> tuple[bool, list[str]]:
    """``records``: the tables' layer set of each method, every shots value. Each point is the mean over the
    categories that have a value at every K and for every backbone (so a curve never mixes category sets),
    with the sd between seeds of that average as an error bar when there are several seeds.
    Returns (written, notes)."""
    sel = records[(records["dataset"] == dataset) & records[metric].notna()]
    methods = [m for m in order_methods(sel["method"])
               if (sel.loc[sel["method"] == m, "shots"] != ALL_SHOTS).any()]
    if not methods:
        return False, ["no few-shot record with values"]
    colors, notes, plots = backbone_colors(backbones), [], []
    for method in methods:
        rows = sel[sel["method"] == method]
        shots = sorted(set(rows["shots"]) - {ALL_SHOTS}) + ([ALL_SHOTS] if (rows["shots"] == ALL_SHOTS).any() else [])
        stats = {k: cell_stats(rows[rows["shots"] == k], metric) for k in shots}
        run = set(rows["category"])
        cats = order_categories(dataset, [c for c in run
                                          if all((c, method, b) in stats[k] for k in shots for b in backbones)])
        if not cats:
            notes.append(f"{method_label(method)} left out: no category has a value for every K and backbone")
            continue
        if len(cats) < len(run):
            notes.append(f"{method_label(method)}: points average the {len(cats)} of {len(run)} categories with a "
                         f"value for every K and backbone ({', '.join(cats)})")
        plots.append((method, shots, stats, cats))
    if not plots:
        return False, notes
    fig = new_figure(max(4.5, 3.6 * len(plots)), 3.6)
    for i, (method, shots, stats, cats) in enumerate(plots):
        ax = fig.add_subplot(1, len(plots), i + 1)
        few = [k for k in shots if k != ALL_SHOTS]
        # K on a log2 axis; "all" one octave past the largest K
        x = [np.log2(k) if k != ALL_SHOTS else np.log2(max(few)) + 1 for k in shots]
        for backbone in backbones:
            points = [average_stat(stats[k], [(c, method, backbone) for c in cats]) for k in shots]
            mean = [100 * m for m, _ in points]
            sd = [100 * s.sd if np.isfinite(s.sd) else 0.0 for _, s in points]
            n = len(few)
            ax.errorbar(x[:n], mean[:n], yerr=sd[:n], fmt="o-", color=colors[backbone], label=backbone, capsize=2)
            if len(x) > n:  # "all": a dashed link, since the step to it is not one doubling
                ax.errorbar(x[n:], mean[n:], yerr=sd[n:], fmt="s", color=colors[backbone], capsize=2)
                ax.plot(x[n - 1:], mean[n - 1:], ":", color=colors[backbone])
        ax.set_xticks(x, [shots_label(k) for k in shots])
        ax.set_xlabel("normal training images K")
        ax.set_title(f"{method_label(method)} ({len(cats)} categor{'y' if len(cats) == 1 else 'ies'})")
        if i == 0:
            ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
    title = f"{dataset_name(dataset)}: {METRIC_NAMES[metric]} against K"
    finish_figure(fig, ax, title, path, ncols=len(backbones))
    return True, notes
