"""The control's forest plot: per metric a panel, per (method, backbone) a row, a dot at the mean difference to
the control with its 95% Student-t interval (mean ± t(0.975, n-1) se, n the seeds or categories the se is over:
with a handful of seeds the normal 1.96 would draw them 1.3-2.2x too narrow), and a line at 0 (no difference)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ad_eval.report.control import NO_SE, Comparison
from ad_eval.report.figures.common import DPI, backbone_colors, new_figure, wrapped_title
from ad_eval.report.order import METRIC_NAMES


def control_figure(comparisons: Sequence[Comparison], metrics: Sequence[str], backbones: Sequence[str], title: str,
                   path: Path) -> tuple[bool, list[str]]:
    """Draws the comparisons (``control.compare_all``) of one table, each backbone in its colour of the other
    figures (``backbones``: the report's); a metric without any difference has no panel. Returns (written, notes)."""
    panels = [m for m in metrics if any(c.metrics[m] for c in comparisons)]
    if not panels:
        return False, ["no difference to the control has a value"]
    colors = backbone_colors(backbones)
    rows = np.arange(len(comparisons))[::-1]  # the first comparison on top, as in the table
    fig = new_figure(1.6 + 2.8 * len(panels), 1.4 + 0.3 * len(comparisons))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, metric in zip(axes, panels, strict=True):
        ax.axvline(0.0, color="0.5", linewidth=0.8)
        for y, comparison in zip(rows, comparisons, strict=True):
            d = comparison.metrics[metric]
            if d is None:
                continue
            bar = comparison.t95 * 100 * d.se if np.isfinite(d.se) else None
            ax.errorbar(100 * d.mean, y, xerr=bar, fmt="o", color=colors[comparison.backbone], capsize=2)
        ax.set_xlabel(f"Δ {METRIC_NAMES[metric]} (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(rows, [c.label for c in comparisons])
    axes[0].set_ylim(-0.7, len(comparisons) - 0.3)
    wrapped_title(fig, title)
    fig.savefig(path, dpi=DPI)
    notes = [f"{c.label}: no standard error (one seed, one category)" for c in comparisons if c.over == NO_SE]
    return True, notes
