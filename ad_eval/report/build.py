"""``build_report``: a results folder in, the paper's tables and figures and a summary out.

Per dataset present: ``table_<dataset>_<metric>.{md,csv,tex}`` (all training images), per few-shot K
``table_<dataset>_<metric>_<K>shot.*``; figures ``spider_*``, ``layers_*``, ``fewshot_<dataset>_<metric>.png``
and, for categories run with ``keep_maps``, ``qualitative_<dataset>_<category>.png``; then
``results_long.csv`` (every cell, layer set and shots value: mean, std, n, seeds) and ``summary.md``
(what was read, skipped, failed, missing, and why a figure was not drawn). With a ``control`` backbone, per
dataset and shots value ``control_<dataset>[_<K>shot].{md,csv}`` and ``.png`` (``ad_eval.report.control``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ad_eval.report.control import caption as control_caption
from ad_eval.report.control import compare_all, write_control_table
from ad_eval.report.figures import control_figure, fewshot_figure, layers_figure, qualitative_figure, spider_figure
from ad_eval.report.order import (
    CATEGORY_ORDER,
    DATASET_NAMES,
    METHOD_ORDER,
    METRIC_NAMES,
    dataset_name,
    default_backbones,
    order_categories,
    order_methods,
    ordered,
)
from ad_eval.report.records import (
    ALL_SHOTS,
    KEY,
    METRICS,
    deduplicate,
    load_records,
    method_label,
    mixed_settings,
    shots_label,
)
from ad_eval.report.stats import aggregate, cell_stats, choose_layer_sets, layer_sort_key
from ad_eval.report.tables import make_table, write_table

SPIDER_METRICS = ("image_AUROC",)  # the paper's figure 3


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    """"a,b" or ["a", "b"] -> ["a", "b"] (so that a CLI can pass its strings through)."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)


def select_backbones(records: pd.DataFrame, wanted: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(backbones in cell order, warnings): the ones asked for, else all found, "ImageNet" first."""
    found = default_backbones(records["backbone"])
    backbones = wanted or found
    warnings = [f"backbone {b!r} has no record" for b in backbones if b not in found]
    other = sorted(set(found) - set(backbones))
    if other:
        warnings.append(f"records of backbone(s) {', '.join(other)} left out (not requested)")
    return list(backbones), warnings


class _Report:
    """What the tables and figures of one report collect as they are written."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.tables: list[Path] = []
        self.figures: list[Path] = []
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.missing: list[tuple[str, str, str, str]] = []
        self.missing_lines: list[str] = []
        self.nulls: list[str] = []
        self.uncompared: list[str] = []  # (method, backbone) rows of the control tables left out, and why

    def figure(self, name: str, draw, *args) -> None:
        """Calls ``draw(*args, path) -> (written, notes)`` and files the outcome."""
        path = self.out_dir / name
        written, why = draw(*args, path)
        if written:
            self.figures.append(path)
            self.notes += [f"{name}: {n}" for n in why]
        else:
            self.skipped.append(f"{name}: {'; '.join(why)}")


def _write_tables(report: _Report, records: pd.DataFrame, long: pd.DataFrame, all_records: pd.DataFrame,
                  dataset: str, shots: int, categories: list[str], backbones: list[str], metrics: Sequence[str],
                  spider_metrics: Sequence[str]) -> None:
    """The tables of one (dataset, shots) from ``records`` (the tables' layer sets), and for all training
    images the spider and layer figures."""
    methods_run = order_methods(records["method"])
    done = set(records[["category", "method", "backbone"]].itertuples(index=False))
    missing = [(m, c, b) for m in methods_run for c in categories for b in backbones if (c, m, b) not in done]
    where = dataset_name(dataset) + ("" if shots == ALL_SHOTS else f" K={shots}")
    report.missing_lines += [f"{where}: {method_label(m)} / {c} / {b}" for m, c, b in missing]
    if shots == ALL_SHOTS:
        report.missing += [(dataset, m, c, b) for m, c, b in missing]
    suffix = "" if shots == ALL_SHOTS else f"_{shots}shot"
    for metric in metrics:
        name, title = f"{dataset}_{metric}{suffix}", f"{dataset_name(dataset)} {METRIC_NAMES[metric]}"
        if shots != ALL_SHOTS:
            title += f", K={shots} normal training images"
        stats = cell_stats(records[records["category"].isin(categories)], metric)
        methods = [m for m in methods_run if any(k[1] == m for k in stats)]
        report.nulls += [f"{title}: {method_label(m)} / {c} / {b}" for m in methods for c in categories
                         for b in backbones if (c, m, b) in done and (c, m, b) not in stats]
        if not methods:
            report.skipped.append(f"table_{name}: no values")
            continue
        table, seeds = make_table(stats, categories, methods, backbones)
        caption = f"{title} (%). Each cell carries the results for {'/'.join(backbones)}.{seeds}"
        report.tables += write_table(table, caption, report.out_dir, name)
        if shots != ALL_SHOTS:
            continue
        if metric in spider_metrics:
            means = {k: s.mean for k, s in stats.items()}
            report.figure(f"spider_{name}.png", spider_figure, means, dataset, metric, categories, methods, backbones)
        report.figure(f"layers_{name}.png", layers_figure, long, all_records, dataset, metric, backbones)


def _summary(title: str, head: Sequence[str], sections: Mapping[str, Sequence[str]]) -> str:
    """Markdown: a title, a bullet list, then one section per non-empty list, its count in the heading."""
    lines = [f"# {title}", "", *(f"- {line}" for line in head)]
    for heading, items in sections.items():
        if items:
            lines += ["", f"## {heading} ({len(items)})", "", *(f"- {item}" for item in items)]
    return "\n".join(lines) + "\n"


def _sorted_long(long: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    """Rows in the tables' order: dataset, method, category, backbone, layer set, shots (K up, then all), metric;
    ``shots`` as "all" or K, and left out when every record used all training images."""
    methods = {m: i for i, m in enumerate(order_methods(long["method"]))}
    layer_sets = sorted(set(long["layer_set"]), key=layer_sort_key)
    categories = {(d, c): i for d in datasets
                  for i, c in enumerate(order_categories(d, long.loc[long["dataset"] == d, "category"]))}
    keys = pd.DataFrame({
        "d": long["dataset"].map({d: i for i, d in enumerate(datasets)}), "m": long["method"].map(methods),
        "c": [categories[d, c] for d, c in zip(long["dataset"], long["category"], strict=True)],
        "b": long["backbone"], "l": long["layer_set"].map({s: i for i, s in enumerate(layer_sets)}),
        "s": long["shots"].replace(ALL_SHOTS, np.inf), "x": long["metric"].map({m: i for i, m in enumerate(METRICS)}),
    }, index=long.index)
    out = long.loc[keys.sort_values(list(keys.columns), kind="stable").index]
    if (out["shots"] == ALL_SHOTS).all():
        return out.drop(columns="shots")
    return out.assign(shots=out["shots"].map(shots_label))


@dataclass(frozen=True)
class _Selection:
    """The records a report is built from, after the backbone selection and duplicates, with what goes with them."""

    records: pd.DataFrame  # one row per used record
    tabled: pd.DataFrame  # the records with their method's layer set of the tables
    long: pd.DataFrame  # ``aggregate(records)`` plus ``in_tables``
    backbones: list[str]  # in cell order
    layer_sets: dict[str, str]  # method -> layer set of the tables
    datasets: list[str]  # in the paper's order
    warnings: list[str]
    n_read: int  # records read, before the selection
    done_ids: set[str]  # cell ids with a record, before the selection


def build_report(results_dir: str | Path, out_dir: str | Path, backbones: str | Sequence[str] | None = None,
                 metrics: str | Sequence[str] = METRICS, layers: Mapping[str, Any] | None = None, *,
                 spider_metrics: str | Sequence[str] = SPIDER_METRICS, control: str | None = None,
                 cells: Collection[str] | None = None) -> dict[str, Any]:
    """Writes the paper's tables and figures for the records in ``results_dir`` into ``out_dir``.

    Args:
        results_dir: folder of ``<cell_id>.json`` records (see ``load_records``), and ``maps/`` of cells run
            with ``keep_maps``.
        out_dir: created if needed (see the module docstring for what it gets).
        backbones: backbone labels, in the order of each cell "a/b"; a list or "ImageNet,Fractals". Default: all
            labels found, sorted, "ImageNet" first. Records of other labels are left out (and counted).
        metrics: metrics of the tables and figures, from ``METRICS``.
        layers: method -> layer set of the tables (e.g. ``{"padim": "1,2,3"}``); default per method: the set with
            the most cells (ties: the reference set).
        spider_metrics: metrics with a spider chart (the paper: image-level AUROC only); only those in ``metrics``.
        control: a backbone label (e.g. "random-resnet18"): every other backbone's difference to it, paired by
            seed, in ``control_<dataset>[_<K>shot].{md,csv,png}`` (``ad_eval.report.control``). A ValueError,
            before anything is written, when it has no record or is not among ``backbones``.
        cells: the cell ids to report (``ad-eval report --grid``: one grid config's cells), when the folder also
            holds records of other cells, e.g. of an earlier version of the grid; the others are left out (a
            warning counts them). Default: every record.

    Returns:
        ``{"tables": [paths], "figures": [paths], "results_long": path, "summary": path, "problems": [...],
        "failures": [...], "warnings": [...], "skipped": [...], "missing": [...]}``; problems name the skipped
        record files, skipped the figures not drawn and why, missing the (dataset, method, category, backbone)
        cells (all training images) without a record.
    """
    metrics, spider_metrics = _check_metrics(metrics, spider_metrics)
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    records, problems, failures = load_records(results_dir)
    records, failures, other_cells = _only_cells(records, failures, cells)
    control = control or None
    if control:
        _check_control(records, _as_list(backbones), control)
    out_dir.mkdir(parents=True, exist_ok=True)
    selection = _select_records(records, _as_list(backbones), layers, results_dir)
    if other_cells:
        selection.warnings.insert(0, f"{other_cells} record(s) and failure(s) of cells not in the grid left out")

    report = _Report(out_dir)
    for dataset in selection.datasets:
        _write_dataset(report, selection, dataset, metrics, spider_metrics, results_dir)
        if control:
            _write_control(report, selection, dataset, metrics, control)

    long_path = out_dir / "results_long.csv"
    _sorted_long(selection.long, selection.datasets).to_csv(long_path, index=False)
    summary_path = out_dir / "summary.md"
    head = _summary_head(selection, problems, failures) + ([_control_line(control)] if control else [])
    summary_path.write_text(_summary(f"Report of `{results_dir}`", head,
                                     _summary_sections(selection, problems, failures, report)))
    return {"tables": report.tables, "figures": report.figures, "results_long": long_path, "summary": summary_path,
            "problems": problems, "failures": failures, "warnings": selection.warnings, "skipped": report.skipped,
            "missing": report.missing}


def _check_metrics(metrics: str | Sequence[str], spider_metrics: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """(metrics, spider metrics among them) as lists; a ValueError naming the unknown metrics."""
    metrics = _as_list(metrics) or []
    spider_metrics = [m for m in _as_list(spider_metrics) or [] if m in metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics={unknown}: unknown (known: {', '.join(METRICS)})")
    return metrics, spider_metrics


def _only_cells(records: pd.DataFrame, failures: list[dict], cells: Collection[str] | None
                ) -> tuple[pd.DataFrame, list[dict], int]:
    """The records and failures of ``cells`` (None: all), and how many others there were."""
    if cells is None:
        return records, failures, 0
    cells = set(cells)
    kept = records[records["cell_id"].isin(cells)]
    kept_failures = [f for f in failures if f.get("cell_id") in cells]
    return kept, kept_failures, len(records) - len(kept) + len(failures) - len(kept_failures)


def _check_control(records: pd.DataFrame, backbones: list[str] | None, control: str) -> None:
    """A ValueError naming the control and the backbones found when it has no record or is not asked for."""
    found = default_backbones(records["backbone"])
    if control not in found:
        raise ValueError(f"control {control!r}: no record of that backbone (backbones found: "
                         f"{', '.join(found) or 'none'})")
    if backbones and control not in backbones:
        raise ValueError(f"control {control!r}: not among the backbones asked for ({', '.join(backbones)})")


def _select_records(records: pd.DataFrame, backbones: list[str] | None, layers: Mapping[str, Any] | None,
                    results_dir: Path) -> _Selection:
    """The records of the chosen backbones without duplicates, their seed statistics and the tables' layer sets,
    with a warning for each thing left out or not found."""
    n_read, done_ids = len(records), set(records["cell_id"])
    backbones, warnings = select_backbones(records, backbones)
    if not n_read:  # e.g. --results one folder too high: say so where the user looks, not only in summary.md
        warnings.insert(0, f"no cell record (<cell_id>.json) in {results_dir}")
    records, duplicates = deduplicate(records[records["backbone"].isin(backbones)])
    warnings += duplicates + mixed_settings(records)
    long = aggregate(records)
    layer_sets = choose_layer_sets(records, layers)
    warnings += [f"layers[{m!r}] = {s}: no record of {m} with that layer set" for m, s in layer_sets.items()
                 if not ((records["method"] == m) & (records["layer_set"] == s)).any()]
    long["in_tables"] = long["layer_set"] == long["method"].map(layer_sets)
    tabled = records[records["layer_set"] == records["method"].map(layer_sets)]
    datasets = ordered(records["dataset"], tuple(DATASET_NAMES))
    warnings += [w for dataset in datasets for w in _untabled_methods(records, tabled, dataset, layer_sets)]
    return _Selection(records=records, tabled=tabled, long=long, backbones=backbones, layer_sets=layer_sets,
                      datasets=datasets, warnings=warnings, n_read=n_read, done_ids=done_ids)


def _untabled_methods(records: pd.DataFrame, tabled: pd.DataFrame, dataset: str,
                      layer_sets: Mapping[str, str]) -> list[str]:
    """A warning per method of ``dataset`` with records, none of them with the tables' layer set."""
    in_tables = set(tabled.loc[tabled["dataset"] == dataset, "method"])
    return [f"{dataset_name(dataset)}: {method_label(m)} has records but none with the tables' layer set "
            f"{layer_sets[m]}: no column" for m in order_methods(records.loc[records["dataset"] == dataset, "method"])
            if m not in in_tables]


def _write_dataset(report: _Report, selection: _Selection, dataset: str, metrics: Sequence[str],
                   spider_metrics: Sequence[str], results_dir: Path) -> None:
    """The tables and figures of one dataset: per shots value (all training images first, then each K), the
    few-shot curves, and the qualitative figures of cells run with ``keep_maps``."""
    in_dataset = selection.records[selection.records["dataset"] == dataset]
    categories = order_categories(dataset, in_dataset["category"])
    tabled = selection.tabled[selection.tabled["dataset"] == dataset]
    long = selection.long
    shots_here = sorted(set(in_dataset["shots"]) - {ALL_SHOTS})
    for shots in ([ALL_SHOTS] if (in_dataset["shots"] == ALL_SHOTS).any() or not shots_here else []) + shots_here:
        _write_tables(report, tabled[tabled["shots"] == shots], long[long["shots"] == shots],
                      in_dataset[in_dataset["shots"] == shots], dataset, shots, categories, selection.backbones,
                      metrics, spider_metrics)
    if shots_here:
        for metric in metrics:
            report.figure(f"fewshot_{dataset}_{metric}.png", fewshot_figure, tabled, dataset, metric,
                          selection.backbones)
    if tabled["maps"].notna().any():
        _write_qualitative(report, tabled[tabled["shots"] == ALL_SHOTS], results_dir, dataset, categories,
                           selection.backbones)


def _write_control(report: _Report, selection: _Selection, dataset: str, metrics: Sequence[str],
                   control: str) -> None:
    """Per shots value of ``dataset`` (all training images, then each K): the control table and forest plot."""
    tabled = selection.tabled[selection.tabled["dataset"] == dataset]
    control_records = tabled[tabled["backbone"] == control]
    random_control = bool(len(control_records)) and (control_records["backbone_spec"] == "random").all()
    for shots in sorted(set(tabled["shots"]), key=lambda k: (k != ALL_SHOTS, k)):  # all images first, then K up
        comparisons, left_out = compare_all(tabled[tabled["shots"] == shots], selection.backbones, control, metrics)
        where = dataset_name(dataset) + ("" if shots == ALL_SHOTS else f" K={shots}")
        report.uncompared += [f"{where}: {method_label(m)} / {b}: {why}" for m, b, why in left_out]
        name = f"control_{dataset}" + ("" if shots == ALL_SHOTS else f"_{shots}shot")
        if not comparisons:
            report.skipped.append(f"{name}: no backbone other than the control {control} shares a pair with it")
            continue
        text = control_caption(where, control, comparisons, random_control)
        report.tables += write_control_table(comparisons, metrics, text, report.out_dir, name)
        title = f"{where}: difference to {control} (mean and 95% t-interval, paired by seed)"
        report.figure(f"{name}.png", control_figure, comparisons, metrics, selection.backbones, title)


def _control_line(control: str) -> str:
    """The summary's bullet on the control tables."""
    return (f"control: {control}; `control_<dataset>[_<K>shot].{{md,csv,png}}`: each backbone - {control} per "
            "method (the tables' layer set), paired by (category, seed); mean over seeds of the per-seed mean over "
            "categories, standard error over seeds (one seed: over categories)")


def _write_qualitative(report: _Report, tabled: pd.DataFrame, results_dir: Path, dataset: str,
                       categories: Sequence[str], backbones: Sequence[str]) -> None:
    """One qualitative figure per category; a category without kept maps is not worth a line in the summary."""
    for category in categories:
        name = f"qualitative_{dataset}_{category}.png"
        written, why = qualitative_figure(tabled, results_dir, dataset, category, backbones, METHOD_ORDER,
                                          report.out_dir / name)
        if written:
            report.figures.append(report.out_dir / name)
        elif tabled["category"].eq(category).any() and why != ["no cell with kept maps (keep_maps)"]:
            report.skipped.append(f"{name}: {'; '.join(why)}")


def _summary_head(selection: _Selection, problems: Sequence[str], failures: Sequence[dict]) -> list[str]:
    """The summary's opening bullets: counts, backbone order, layer sets, seeds, few-shot K, absent categories."""
    records, long, layer_sets = selection.records, selection.long, selection.layer_sets
    n_multi = long.loc[long["n"] > 1, KEY].drop_duplicates().shape[0]
    head = [f"records read: {selection.n_read}; used: {len(records)} (after the backbone selection and duplicates)",
            f"failures: {len(failures)}", f"corrupt files skipped: {len(problems)}",
            f"backbones (order in each cell): {'/'.join(selection.backbones)}",
            "layer sets of the tables: " + ", ".join(f"{method_label(m)} {layer_sets[m]}"
                                                     for m in order_methods(layer_sets)),
            f"cells averaged over several seeds: {n_multi} (mean, std, n in `results_long.csv`, in fractions; "
            "the tables are in percent)",
            'Model Avg: mean over the table\'s categories, "-" unless every one of them has a value']
    few_shots = sorted(set(records["shots"]) - {ALL_SHOTS})
    if few_shots:
        head.append(f"few-shot K: {', '.join(map(str, few_shots))} (tables `*_<K>shot.*`, figures `fewshot_*.png`)")
    for dataset in selection.datasets:
        present = set(records.loc[records["dataset"] == dataset, "category"])
        absent = [c for c in CATEGORY_ORDER.get(dataset, ()) if c not in present]
        if absent:
            head.append(f"{dataset_name(dataset)}: no record for {len(absent)} of "
                        f"{len(CATEGORY_ORDER[dataset])} categories ({', '.join(absent)}); its averages are over "
                        "the categories present only")
    return head


def _summary_sections(selection: _Selection, problems: Sequence[str], failures: Sequence[dict],
                      report: _Report) -> dict[str, Sequence[str]]:
    """The summary's sections, heading -> items (empty ones are left out of the file)."""
    return {
        "Corrupt files (skipped)": [f"`{p.split(': ', 1)[0]}`: {p.split(': ', 1)[1]}" for p in problems],
        "Failures": [f"`{f.get('cell_id')}` ({f['file']}): {(str(f.get('error', '')).splitlines() or [''])[0]}"
                     + (" (a result exists too)" if f.get("cell_id") in selection.done_ids else "")
                     for f in failures],
        "Warnings": selection.warnings,
        "Tables written": [p.name for p in report.tables],
        "Figures written": [p.name for p in report.figures],
        "Figure notes": report.notes,
        "Not written": report.skipped,
        "Missing cells (method / category / backbone without a record)": report.missing_lines,
        "Missing values (a record with a null metric)": report.nulls,
        "Not compared with the control": report.uncompared,
    }
