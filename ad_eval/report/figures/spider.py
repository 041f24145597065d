"""Figure 3: category-group spider charts, one polar panel per backbone, one axis per method."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ad_eval.datasets import CATEGORY_GROUPS
from ad_eval.report.figures.common import finish_figure, new_figure
from ad_eval.report.order import METRIC_NAMES, dataset_name
from ad_eval.report.records import method_label
from ad_eval.report.stats import complete_mean

GROUP_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:orange")


def spider_figure(values: Mapping[tuple[str, str, str], float], dataset: str, metric: str,
                  categories: Sequence[str], methods: Sequence[str], backbones: Sequence[str],
                  path: Path) -> tuple[bool, list[str]]:
    """One polygon per category group (``ad_eval.datasets.CATEGORY_GROUPS``) over (category, method, backbone)
    means.

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
    notes = [f"{method_label(m)} left out (a group lacks a value for some backbone)" for m in methods if m not in kept]
    if not kept:
        return False, [*notes, "no method has values for every group and backbone"]
    pct = 100 * np.array([means[k] for k in means if k[1] in kept])
    low = max(0.0, 10 * math.floor((pct.min() - 5) / 10))
    angles = np.linspace(0, 2 * np.pi, len(kept), endpoint=False)
    closed = np.append(angles, angles[0])
    group_colors = dict(zip(groups, GROUP_COLORS, strict=False))
    fig = new_figure(4.2 * len(backbones), 4.6)
    for i, backbone in enumerate(backbones):
        ax = fig.add_subplot(1, len(backbones), i + 1, projection="polar")
        for group in groups:
            v = [100 * means[group, m, backbone] for m in kept]
            ax.plot(closed, [*v, v[0]], "o-", color=group_colors.get(group, "tab:gray"), label=group, lw=1.5, ms=3)
            ax.fill(closed, [*v, v[0]], color=group_colors.get(group, "tab:gray"), alpha=0.15)
        ax.set_xticks(angles, [method_label(m) for m in kept])
        ax.set_ylim(low, 100)
        ax.set_title(backbone, pad=16)
    title = f"{dataset_name(dataset)}: average {METRIC_NAMES[metric]} (%) by category group"
    finish_figure(fig, ax, title, path, ncols=len(groups))
    return True, notes
