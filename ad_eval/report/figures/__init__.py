"""The report's figures (PNG), one module each: the paper's spider charts (figure 3) and layer bar charts
(figures 4-6), few-shot curves, the qualitative figure (figure 7), and the forest plot against a control."""

from ad_eval.report.figures.control import control_figure
from ad_eval.report.figures.fewshot import fewshot_figure
from ad_eval.report.figures.layer_bars import layers_figure
from ad_eval.report.figures.qualitative import qualitative_figure
from ad_eval.report.figures.spider import spider_figure

__all__ = ["control_figure", "fewshot_figure", "layers_figure", "qualitative_figure", "spider_figure"]
