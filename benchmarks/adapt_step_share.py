"""Where an ``adapt`` step's time goes, from its metrics.csv: median wall time of a whole step and of
preparing its batch (rendering, anomalies, views, reference forwards, nearest-neighbour matching).

    python3 benchmarks/adapt_step_share.py RUN_DIR [--skip 20]

Prints one JSON line. The first ``--skip`` steps (compilation, cudnn autotuning, the centre pass) are left
out. ``prepare_s`` includes the backbone forwards of the views and references, so it reads higher than the
share of work outside the model (issue 14's < 10% target; benchmarks/PENDING_GPU.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path


def step_share(metrics: Path, skip: int) -> dict:
    with open(metrics, newline="") as handle:
        rows = list(csv.DictReader(handle))

    def column(name: str) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name)][skip:]

    step, prepare = column("train/step_s"), column("train/prepare_s")
    if not step or not prepare:
        raise SystemExit(f"{metrics}: fewer than {skip + 1} logged steps with train/step_s and train/prepare_s")
    median_step, median_prepare = statistics.median(step), statistics.median(prepare)
    return {"metrics": str(metrics), "steps": len(step), "median_step_s": round(median_step, 5),
            "steps_per_s": round(1.0 / median_step, 3), "median_prepare_s": round(median_prepare, 5),
            "prepare_share": round(median_prepare / median_step, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the adapt run directory (trainer.default_root_dir)")
    parser.add_argument("--skip", type=int, default=20, help="leading steps to leave out")
    args = parser.parse_args(argv)
    versions = sorted((args.run / "logs").glob("version_*/metrics.csv"))
    if not versions:
        print(f"{args.run}: no logs/version_*/metrics.csv", file=sys.stderr)
        return 2
    print(json.dumps(step_share(versions[-1], args.skip)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
