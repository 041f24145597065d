"""Markdown tables from the benchmarks' JSON lines, for benchmarks/RESULTS.md.

    python3 benchmarks/summarise.py render.jsonl train.jsonl

Lines that are not JSON objects (pytest output, warnings) are skipped. Render rows (render_throughput.py)
give ms per batch, images/s and, with --profile, the slowest kernels; train rows (train_throughput.py)
give the ceiling, end-to-end and prefetch throughput and their ratios to the ceiling.
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


def render_table(render: list[dict]) -> list[str]:
    out = ["| recipe | version | size | batch | ms / batch | images/s | image digest | slowest kernels (ms / batch) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in render:
        kernels = ", ".join(f"{k} {v}" for k, v in list(r.get("kernel_ms", {}).items())[:4])
        recipe = r["recipe"] + "".join(f", {k}={v}" for k, v in r.get("overrides", {}).items())
        out.append(f"| {recipe} | {r.get('version', '')} | {r['size']} | {r['batch']} | {r['ms_per_batch']} "
                   f"| {r['images_per_s']:,.0f} | {r.get('digest', '')} | {kernels} |")
    return out


def train_table(train: list[dict]) -> list[str]:
    out = ["| arch | ceiling img/s | end to end | ratio | prefetch | ratio | render ms / batch |",
           "|---|---|---|---|---|---|---|"]
    for r in train:
        arch = r["arch"] + (" (compile)" if r.get("compile") else "") + (f", {r['dtype']}" if "dtype" in r else "")
        out.append(f"| {arch} | {r['ceiling_img_s']:,.0f} "
                   f"| {r['end_to_end_img_s']:,.0f} | {r['ratio']:.3f} | {r['prefetch_img_s']:,.0f} "
                   f"| {r['prefetch_ratio']:.3f} | {r['render_ms_per_batch']} |")
    return out


def summarise(paths: list[str]) -> str:
    found = rows(paths)
    render = [r for r in found if "ms_per_batch" in r]
    train = [r for r in found if "ceiling_img_s" in r]
    lines = []
    if render:
        lines += render_table(render) + [""]
    if train:
        lines += train_table(train)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(summarise(sys.argv[1:]))
