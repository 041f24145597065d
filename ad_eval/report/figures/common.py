"""What the figures share: a pyplot-free Figure, one colour per backbone, the legend/title/save ending."""

from __future__ import annotations

from collections.abc import Sequence

BACKBONE_COLORS = {"ImageNet": "tab:blue", "Fractals": "tab:red"}  # the paper's figures 4-6
OTHER_COLORS = ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
DPI = 150
TITLE_CHARS_PER_INCH = 9  # the suptitle's font (12 pt) averages ~7 pt a character; with a margin


def backbone_colors(backbones: Sequence[str]) -> dict[str, str]:
    """ImageNet blue, Fractals red (the paper's figures 4-6); other labels get the remaining colours."""
    others = iter(OTHER_COLORS * (len(backbones) // len(OTHER_COLORS) + 1))
    return {b: BACKBONE_COLORS.get(b) or next(others) for b in backbones}


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    # Figure without pyplot: no global backend state; savefig renders PNG with Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def finish_figure(fig, ax, title: str, path, ncols: int) -> None:
    """The panel figures' common end: the last panel's legend below the panels, the title, a PNG at DPI."""
    legend_and_title(fig, ax, title, ncols)
    fig.savefig(path, dpi=DPI)


def legend_and_title(fig, ax, title: str, ncols: int) -> None:
    """The last panel's legend below the panels (in up to ``ncols`` columns: as many as fit the figure's width)
    and the figure's title (``finish_figure`` without the PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    handles, labels = ax.get_legend_handles_labels()
    renderer = FigureCanvasAgg(fig).get_renderer()  # the PNG's canvas: measures the legend as it will be drawn
    for columns in range(max(1, ncols), 0, -1):  # one row of five backbones was cut at both ends
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=columns)
        if columns == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            break
        legend.remove()
    wrapped_title(fig, title)


def wrapped_title(fig, title: str) -> None:
    """The figure's title, wrapped to the figure's width: a one-panel figure (one method with a layer study, one
    backbone's spider) is narrower than its title, and the layout engine does not shrink a suptitle (it was cut
    at both ends)."""
    import textwrap

    fig.suptitle(textwrap.fill(title, max(20, int(fig.get_figwidth() * TITLE_CHARS_PER_INCH))))
