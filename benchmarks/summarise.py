"""Markdown tables from the benchmarks' JSON lines, for benchmarks/RESULTS.md.

    python3 benchmarks/summarise.py render.jsonl train.jsonl

Lines that are not JSON objects (pytest output, warnings) are skipped. Render rows (render_throughput.py)
give ms per batch, images/s, with --profile the slowest kernels, and for the Mandelbulb recipes rays/s and
the setup time (the view bank's build); augmentation rows
(augment_throughput.py) ms per batch by stage; train rows (train_throughput.py in every mode, and
augment_throughput.py's train_step) the ceiling, end-to-end and prefetch throughput and their ratios to the
ceiling (samples/s for SimSiam rows). A row's recipe, overrides and a non-GPU device are named beside its
arch or recipe; a value it lacks, or null (what a --device cpu run leaves out), is shown as "–".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(paths: list[str]) -> list[dict]:
    found = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return found


CPU_DEVICES = ("cpu", "cpu-reference", "emulator")  # the benchmarks' --device values off the GPU
MISSING = "–"  # a value the row does not have, or null (a CUDA-only part of a --device cpu run)


def number(value, fmt: str = ",.0f") -> str:
    return MISSING if value is None else format(value, fmt)


def first(row: dict, *keys):
    """The first of ``keys`` the row has (images/s or, for two-view rows, samples/s), else None."""
    return next((row[k] for k in keys if row.get(k) is not None), None)


def settings(row: dict, default_recipe: str | None) -> str:
    """What sets a row apart beyond its arch / recipe: recipe, overrides, and the device when not a GPU."""
    parts = []
    if row.get("recipe") not in (None, default_recipe):
        parts.append(row["recipe"] + (" simsiam (samples/s)" if row.get("objective") == "simsiam" else ""))
    if row.get("measure") == "train_step":
        parts.append("augment" + (" tf32" if row.get("tf32") else ""))
    parts += [f"{k}={v}" for k, v in (row.get("overrides") or {}).items()]
    if row.get("device") in CPU_DEVICES:
        parts.append(row["device"] + (f" x{row['threads']}" if "threads" in row else ""))
    return "".join(f", {p}" for p in parts)


def render_table(render: list[dict]) -> list[str]:
    out = ["| recipe | version | size | batch | ms / batch | images/s | image digest | slowest kernels (ms / batch) "
           "| rays/s | setup s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in render:
        kernels = ", ".join(f"{k} {v}" for k, v in list((r.get("kernel_ms") or {}).items())[:4])
        recipe = r["recipe"] + settings({**r, "recipe": None}, None)
        out.append(f"| {recipe} | {r.get('version', '')} | {r['size']} | {r['batch']} | {r['ms_per_batch']} "
                   f"| {number(r['images_per_s'])} | {r.get('digest', '')} | {kernels} "
                   f"| {number(r.get('rays_per_s'), '.3g')} | {number(r.get('setup_s'), 'g')} |")
    return out


def augment_table(augment: list[dict]) -> list[str]:
    out = ["| measure | device | tf32 | batch | source -> size | ms / batch | images/s |",
           "|---|---|---|---|---|---|---|"]
    for r in augment:
        out.append(f"| {r['measure']} | {r.get('device', '')} | {r.get('tf32', '')} | {r['batch']} "
                   f"| {r.get('source', '')} -> {r.get('size', '')} | {r['ms_per_batch']} "
                   f"| {number(r['images_per_s'])} |")
    return out


def train_table(train: list[dict]) -> list[str]:
    out = ["| arch | ceiling img/s | end to end | ratio | prefetch | ratio | render ms / batch |",
           "|---|---|---|---|---|---|---|"]
    for r in train:
        arch = r["arch"] + (" (compile)" if r.get("compile") else "") + (f", {r['dtype']}" if "dtype" in r else "")
        arch += settings(r, "fractal4ad")
        render = r.get("render_ms_per_batch")
        if render is None and r.get("augment_ms_per_batch") is not None:
            render = f"{r['augment_ms_per_batch']} (augment)"
        out.append(f"| {arch} | {number(first(r, 'ceiling_img_s', 'ceiling_samples_s'))} "
                   f"| {number(first(r, 'end_to_end_img_s', 'end_to_end_samples_s'))} "
                   f"| {number(r.get('ratio'), '.3f')} "
                   f"| {number(first(r, 'prefetch_img_s', 'prefetch_samples_s'))} "
                   f"| {number(r.get('prefetch_ratio'), '.3f')} | {MISSING if render is None else render} |")
    return out


def summarise(paths: list[str]) -> str:
    """Render rows (render_throughput.py), augmentation rows (augment_throughput.py) and training rows
    (train_throughput.py, all modes, and augment_throughput.py's train_step) as Markdown tables."""
    found = rows(paths)
    train = [r for r in found if "ceiling_img_s" in r or "ceiling_samples_s" in r]
    augment = [r for r in found if "measure" in r and "ms_per_batch" in r]
    render = [r for r in found if "recipe" in r and "ms_per_batch" in r and "images_per_s" in r]
    lines = []
    for table, selected in ((render_table, render), (augment_table, augment), (train_table, train)):
        if selected:
            lines += table(selected) + [""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(summarise(sys.argv[1:]))
