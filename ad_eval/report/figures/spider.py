"""Figure 3: category-group spider charts, one polar panel per backbone, one axis per method.

A polygon needs three axes: with one or two methods each panel is a grouped bar chart of the same values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ad_eval.datasets import CATEGORY_GROUPS
from ad_eval.report.figures.common import DPI, legend_and_title, new_figure
from ad_eval.report.order import METRIC_NAMES, dataset_name
from ad_eval.report.records import method_label
from ad_eval.report.stats import complete_mean

GROUP_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:orange")
MIN_SPOKES = 3  # fewer methods: bars (two spokes were one line across the circle, labels on its rim)
CENTRED_WITHIN = 0.2  # |sin| or |cos| of a spoke's angle below this: its label is centred on that axis


def spider_figure(values: Mapping[tuple[str, str, str], float], dataset: str, metric: str,
                  categories: Sequence[str], methods: Sequence[str], backbones: Sequence[str],
                  path: Path) -> tuple[bool, list[str]]:
    """``spider_chart`` saved as a PNG at ``path``. Returns (written, notes)."""
    fig, notes = spider_chart(values, dataset, metric, categories, methods, backbones)
    if fig is not None:
        fig.savefig(path, dpi=DPI)
    return fig is not None, notes


def spider_chart(values: Mapping[tuple[str, str, str], float], dataset: str, metric: str,
                 categories: Sequence[str], methods: Sequence[str], backbones: Sequence[str]):
    """One polygon per category group (``ad_eval.datasets.CATEGORY_GROUPS``) over (category, method, backbone)
    means; one bar per group and method with fewer than ``MIN_SPOKES`` methods.

    A group's value is the mean over its categories that the table has; a method whose group mean is incomplete
    for some backbone is left out. Returns (the Figure, or None when there is nothing to draw; notes).
    """
    groups = {g: [c for c in cats if c in categories] for g, cats in CATEGORY_GROUPS.get(dataset, {}).items()}
    groups = {g: cats for g, cats in groups.items() if cats}
    if not groups:
        return None, [f"no category groups known for {dataset!r}" if dataset not in CATEGORY_GROUPS
                      else "no category of its groups is in the table"]
    means = {(g, m, b): complete_mean(values, [(c, m, b) for c in cats])
             for g, cats in groups.items() for m in methods for b in backbones}
    kept = [m for m in methods if all(np.isfinite(means[g, m, b]) for g in groups for b in backbones)]
    notes = [f"{method_label(m)} left out (a group lacks a value for some backbone)" for m in methods if m not in kept]
    if not kept:
        return None, [*notes, "no method has values for every group and backbone"]
    pct = {k: 100 * v for k, v in means.items() if k[1] in kept}
    low = max(0.0, 10 * math.floor((min(pct.values()) - 5) / 10))
    colors = dict(zip(groups, GROUP_COLORS, strict=False))
    draw = _spider_panel if len(kept) >= MIN_SPOKES else _bar_panel
    fig = new_figure(4.2 * len(backbones), 4.6)
    if draw is _spider_panel:
        fig.get_layout_engine().set(w_pad=0.1)  # inches: a gap between side labels of neighbouring panels
    for i, backbone in enumerate(backbones):
        ax = draw(fig, (1, len(backbones), i + 1), {g: [pct[g, m, backbone] for m in kept] for g in groups},
                  [method_label(m) for m in kept], colors, low)
        ax.set_title(backbone, pad=16 if draw is _spider_panel else None)  # clear of the top spoke's label
    legend_and_title(fig, ax, f"{dataset_name(dataset)}: average {METRIC_NAMES[metric]} (%) by category group",
                     ncols=len(groups))
    return fig, notes


def _spider_panel(fig, where, values: dict[str, list[float]], labels: list[str], colors: dict[str, str], low: float):
    """A polar panel: the first method on top, the others clockwise; each label outside the circle, aligned
    away from it by its spoke's angle (centred labels ran into the circle and, on the sides, the next panel)."""
    ax = fig.add_subplot(*where, projection="polar")
    ax.set_theta_zero_location("N")
    ax.set_theta_direction(-1)
    angles = np.linspace(0, 2 * np.pi, len(labels), endpoint=False)
    closed = np.append(angles, angles[0])
    for group, v in values.items():
        ax.plot(closed, [*v, v[0]], "o-", color=colors.get(group, "tab:gray"), label=group, lw=1.5, ms=3)
        ax.fill(closed, [*v, v[0]], color=colors.get(group, "tab:gray"), alpha=0.15)
    ax.set_xticks(angles, labels)
    for label, angle in zip(ax.get_xticklabels(), angles, strict=True):  # on screen x = sin, y = cos (N, clockwise)
        label.set_horizontalalignment(_away(np.sin(angle), "left", "right"))
        label.set_verticalalignment(_away(np.cos(angle), "bottom", "top"))
    ax.set_ylim(low, 100)
    ax.set_rlabel_position(180 / len(labels))  # radial ticks between the first two spokes, off every label
    ax.tick_params(axis="y", labelsize="small")
    return ax


def _away(component: float, positive: str, negative: str) -> str:
    return "center" if abs(component) < CENTRED_WITHIN else positive if component > 0 else negative


def _bar_panel(fig, where, values: dict[str, list[float]], labels: list[str], colors: dict[str, str], low: float):
    """Grouped bars, one group of bars per method (fewer than ``MIN_SPOKES`` methods)."""
    ax = fig.add_subplot(*where)
    x = np.arange(len(labels))
    width = 0.8 / len(values)
    for j, (group, v) in enumerate(values.items()):
        ax.bar(x + (j - (len(values) - 1) / 2) * width, v, width, color=colors.get(group, "tab:gray"), label=group)
    ax.set_xticks(x, labels)
    ax.set_ylim(low, 100)
    ax.grid(axis="y", alpha=0.3)
    return ax
