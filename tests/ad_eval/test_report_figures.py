"""The spider figure's method labels (ad_eval.report.figures.spider), measured as the Agg renderer draws them.

Run: ``python -m pytest -q tests/ad_eval/test_report_figures.py``
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from ad_eval.datasets import CATEGORY_GROUPS
from ad_eval.report.figures.common import DPI
from ad_eval.report.figures.spider import MIN_SPOKES, spider_chart, spider_figure
from ad_eval.report.records import method_label

METHODS = ("patchcore", "padim", "fastflow", "cflow", "rd", "stfpm", "panda", "cutpaste")
BACKBONES = ("ImageNet", "Fractals")
CATEGORIES = [c for cats in CATEGORY_GROUPS["mvtec"].values() for c in cats]


def values(methods):
    """Means spread over 0.6..1.0, a different polygon per group and backbone."""
    keys = [(c, m, b) for c in CATEGORIES for m in methods for b in BACKBONES]
    return {key: 0.6 + 0.04 * (i * 7 % 11) for i, key in enumerate(keys)}


def drawn(fig):
    """The renderer after drawing ``fig`` as savefig does (Agg at DPI), and every visible non-empty Text."""
    fig.set_dpi(DPI)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return canvas.get_renderer(), texts


@pytest.mark.parametrize("n", range(2, len(METHODS) + 1))
def test_spider_method_labels_are_readable(n):
    """Each method label lies inside the figure, clear of every other text and of its panel's circle (two methods
    put theirs centred on the circle's rim, one cut by the figure's edge)."""
    methods = METHODS[:n]
    fig, notes = spider_chart(values(methods), "mvtec", "image_AUROC", CATEGORIES, methods, BACKBONES)
    assert notes == [] and len(fig.axes) == len(BACKBONES)
    assert all((ax.name == "polar") == (n >= MIN_SPOKES) for ax in fig.axes)  # fewer spokes: bars
    renderer, texts = drawn(fig)
    labels = [(ax, t) for ax in fig.axes for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
    assert sorted(t.get_text() for _, t in labels) == sorted(method_label(m) for m in methods for _ in BACKBONES)
    for ax, label in labels:
        box = label.get_window_extent(renderer)
        name = label.get_text()
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, name
        crossed = [t.get_text() for t in texts if t is not label and box.overlaps(t.get_window_extent(renderer))]
        assert not crossed, f"{name} overlaps {crossed}"
        if ax.name == "polar":  # the box's nearest point to the centre lies outside the circle
            centre = ax.transAxes.transform((0.5, 0.5))
            radius = ax.transAxes.transform((1.0, 0.5))[0] - centre[0]
            nearest = np.clip(centre, [box.x0, box.y0], [box.x1, box.y1])
            assert np.hypot(*(nearest - centre)) >= radius, f"{name} crosses the circle"


def test_spider_figure_writes_a_png(tmp_path):
    path = tmp_path / "spider.png"
    assert spider_figure(values(METHODS[:2]), "mvtec", "image_AUROC", CATEGORIES, METHODS[:2], BACKBONES, path)[0]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
