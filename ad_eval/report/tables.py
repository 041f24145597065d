"""The paper's tables 1-6: one row per category plus "Model Avg", one column per method, each cell the
values of the backbones joined by "/" ("ImageNet/Fractals", e.g. "98.0/40.9"), in percent with one decimal;
written as Markdown, CSV and LaTeX (booktabs).

A missing value prints "-" (the paper does this for FastFlow/carpet AUPRO), e.g. "99.1/-". In a multi-seed
table (``stats.show_spread``) each value is "mean±sd" ("98.4±0.4/65.4±1.2"); the caption gives the usual
number of seeds n and a value over another number of seeds adds its own, e.g. "97.0 (n=1)".

As the paper marks the best result of each row (red for ImageNet, blue for Fractals), the Markdown and LaTeX
tables print in bold, per row and backbone, the value(s) with the highest mean at the printed precision (ties
all bold), when the table has two or more methods; the CSV stays plain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ad_eval.report.records import method_label
from ad_eval.report.stats import Stat, average_stat, show_spread, typical_n

MISSING = "-"
AVG_ROW = "Model Avg"
BEST = "best"  # table.attrs key: the (row, column, backbone index) cells printed in bold
BEST_NOTE = " Bold: the best value of its row per backbone."
CLASS_COLUMN = "Class"
LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "±": r"$\pm$"}


def format_value(value: float | None) -> str:
    """0.9812 -> "98.1"; NaN -> "-"."""
    return MISSING if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def format_stat(mean: float, stat: Stat, spread: bool, usual_n: int) -> str:
    """One backbone's value: "98.1", or with ``spread`` "98.1±0.4" (sd only over 2+ seeds) and " (n=k)" when
    its number of seeds k is not the table's usual one."""
    text = format_value(mean)
    if not spread or text == MISSING:
        return text
    if stat.n > 1:
        text += "±" + format_value(stat.sd)
    return text if stat.n == usual_n else f"{text} (n={stat.n})"


def make_table(stats: Mapping[tuple[str, str, str], Stat], categories: Sequence[str], methods: Sequence[str],
               backbones: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """Strings per (category, method), plus "Model Avg"; columns are the methods' labels.

    Returns (table, note): the note is the caption's seed clause ("" for a table of means) and, when some
    value is bold (``table.attrs[BEST]``, two or more methods), ``BEST_NOTE``.
    """
    spread, usual_n = show_spread(stats.values()), typical_n(stats.values())
    rows = [*categories, AVG_ROW]
    table, means = {}, {}
    for method in methods:
        column = [[(s.mean, s) for s in (stats.get((c, method, b), Stat({})) for b in backbones)] for c in categories]
        column.append([average_stat(stats, [(c, method, b) for c in categories]) for b in backbones])
        label = method_label(method)
        table[label] = ["/".join(format_stat(mean, s, spread, usual_n) for mean, s in cell) for cell in column]
        means.update({(row, label): [mean for mean, _ in cell] for row, cell in zip(rows, column, strict=True)})
    frame = pd.DataFrame(table, index=pd.Index(rows, name=CLASS_COLUMN))
    frame.attrs[BEST] = best_cells(means, rows, list(table), len(backbones)) if len(table) > 1 else frozenset()
    note = f" Mean±sd over n={usual_n} seeds." if spread else ""
    return frame, note + (BEST_NOTE if frame.attrs[BEST] else "")


def best_cells(means: Mapping[tuple[str, str], Sequence[float]], rows: Sequence[str], columns: Sequence[str],
               n_backbones: int) -> frozenset[tuple[str, str, int]]:
    """(row, column, backbone index) of the highest mean of each row and backbone, compared as printed
    (one decimal, so that a tie looks like one); missing values never win."""
    best = set()
    for row in rows:
        for j in range(n_backbones):
            printed = {col: format_value(means[row, col][j]) for col in columns}
            values = {col: float(text) for col, text in printed.items() if text != MISSING}
            if values:
                top = max(values.values())
                best.update((row, col, j) for col, value in values.items() if value == top)
    return frozenset(best)


def marked_rows(table: pd.DataFrame, escape, bold) -> list[list[str]]:
    """The table's rows as strings, the class first: each cell's parts ("a/b") through ``escape`` and the best
    ones (``table.attrs[BEST]``) through ``bold``."""
    best = table.attrs.get(BEST, frozenset())
    rows = []
    for row, cells in zip(table.index, table.to_numpy().tolist(), strict=True):
        out = [escape(str(row))]
        for column, cell in zip(table.columns, cells, strict=True):
            parts = [escape(p) for p in cell.split("/")]
            out.append("/".join(bold(p) if (row, column, j) in best else p for j, p in enumerate(parts)))
        rows.append(out)
    return rows


def to_markdown(table: pd.DataFrame, caption: str) -> str:
    """A padded GitHub Markdown table under a caption line; the class column left-aligned, the others right."""
    header = [table.index.name, *table.columns]
    body = marked_rows(table, str, lambda text: f"**{text}**")
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"
    return "\n".join([caption, "", line(header), rule, *(line(r) for r in body)]) + "\n"


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in text)


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``), "Model Avg" under a rule as in the paper."""
    rows = marked_rows(table, latex_escape, lambda text: rf"\textbf{{{text}}}")
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in [table.index.name, *table.columns]) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        if i == len(rows) - 1:
            lines.append(r"\midrule")
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, caption: str, out_dir: Path, name: str) -> list[Path]:
    """``table_<name>.{md,tex,csv}`` in ``out_dir``; returns their paths."""
    paths = []
    for ext, text in (("md", to_markdown(table, caption)), ("tex", to_latex(table, caption, f"tab:{name}")),
                      ("csv", table.to_csv())):
        path = out_dir / f"table_{name}.{ext}"
        path.write_text(text)
        paths.append(path)
    return paths
