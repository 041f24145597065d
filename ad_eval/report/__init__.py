"""Paper tables 1-6 and figures 3-7 from a folder of cell records (``ad-eval report``).

Reads every ``<cell_id>.json`` that ``ad_eval.cell.run_cell`` wrote into a results folder and writes, for
each dataset present and each metric, the table of Ugwu et al., "Fractals as Pre-training Datasets for
Anomaly Detection and Localization" (tables 1-6), as Markdown, CSV and LaTeX; the spider charts of its
section 5.2 (figure 3), the layer-hierarchy bar charts of section 5.3 (figures 4-6), the qualitative figure
(figure 7) of cells run with ``keep_maps``, and for few-shot cells per-K tables and AUROC-against-K curves;
with ``control``, every backbone's paired difference to that control, its standard error and a forest plot.

One module per step:

- ``records``: read, validate and deduplicate the records; ``method_meta`` (labels, reference layers);
- ``stats``: seeds -> mean, sd, n; category averages; the layer set of the tables;
- ``order``: display names, the paper's row and column order;
- ``tables``: Markdown, CSV, LaTeX;
- ``control``: each backbone minus the control, paired by seed (mean, se, wins/losses), and its table;
- ``figures``: ``spider``, ``layer_bars``, ``fewshot``, ``qualitative``, ``control`` (forest plot);
- ``build``: ``build_report``, ``results_long.csv`` and ``summary.md``.

Example::

    from ad_eval.report import build_report
    out = build_report("results/", "report/", backbones=["ImageNet", "Fractals"])
    print(out["summary"], out["problems"])
"""

from ad_eval.report.build import build_report
from ad_eval.report.records import load_records

__all__ = ["build_report", "load_records"]
