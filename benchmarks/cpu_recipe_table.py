"""Tables of ``benchmarks/cpu_recipe_study.sh``: per backbone and method, the mean over seeds of the two
categories' mean (image AUROC / pixel AUROC / AUPRO) with its standard error, and the paired difference to the
random-init control (same seed: the same training shots; for the control the seed is also the init).
``--control NAME`` pairs against another backbone label instead (cpu_adapt_bar.sh: NAME+adapt against NAME).
`ad-eval report --results FOLDER/eval --out REPORT --control NAME` gives the same differences and standard errors
(control_mvtec_10shot.{md,csv,png}; on runs/recipe_study_x4 they agree to the printed digits) where every seed has
both categories; a seed lacking a category is dropped there, while this script averages the categories it has.

    python3 benchmarks/cpu_recipe_table.py runs/recipe_study
    python3 benchmarks/cpu_recipe_table.py runs/adapt_bar_anderson4x --control anderson4x
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
ORDER = ("random", "anderson", "selfsup", "ofdb", "mandelbulbvar")


def load(folder: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("eval/*.json"))]
    if not rows:
        sys.exit(f"cpu_recipe_table: no results in {folder / 'eval'}")
    return pd.DataFrame(rows)[["method", "backbone", "category", "seed", *METRICS]]


def cell(values: pd.Series) -> str:
    se = values.std(ddof=1) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{values.mean():.3f} ({se:.3f})"


def tables(frame: pd.DataFrame, control: str = "random") -> str:
    per_seed = frame.groupby(["method", "backbone", "seed"])[list(METRICS)].mean()
    lines = []
    for method in sorted(frame["method"].unique()):
        differences = " | ".join(f"{m} - {control}" for m in METRICS)
        lines += [f"### {method}", "", "| backbone | seeds | " + " | ".join(METRICS) + f" | {differences} |",
                  "|---" * (2 + 2 * len(METRICS)) + "|"]
        seeds = per_seed.loc[method]
        present = seeds.index.get_level_values(0)
        order = (control, *(label for b in ORDER for label in (b, b + "+adabn")))  # AdaBN cells beside their own
        for backbone in dict.fromkeys([b for b in order if b in present] + sorted(set(present) - set(order))):
            own = seeds.loc[backbone]
            paired = backbone != control and control in present
            diff = (own - seeds.loc[control]).dropna() if paired else None  # seeds both have
            lines.append(f"| {backbone} | {len(own)} | " + " | ".join(cell(own[m]) for m in METRICS) + " | "
                         + " | ".join(cell(diff[m]) if paired else "" for m in METRICS) + " |")
        per_category = frame[frame["method"] == method].groupby(["backbone", "category"])[list(METRICS)].mean()
        lines += ["", "| backbone | category | " + " | ".join(METRICS) + " |", "|---" * (2 + len(METRICS)) + "|"]
        for (backbone, category), row in per_category.iterrows():
            lines.append(f"| {backbone} | {category} | " + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--control", default=None, help="backbone label the others are paired against (random)")
    args = parser.parse_args(argv)
    frame = load(args.folder)
    found = sorted(set(frame["backbone"]))
    if args.control is not None and args.control not in found:  # else every difference column would stay empty
        sys.exit(f"cpu_recipe_table: --control {args.control}: no results of that backbone in {args.folder / 'eval'} "
                 f"(backbones: {', '.join(found)})")
    print(tables(frame, args.control or "random"))


if __name__ == "__main__":
    main()
