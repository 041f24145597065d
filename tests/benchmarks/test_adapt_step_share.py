"""benchmarks/adapt_step_share.py reads an adapt run's metrics.csv in the GPU session's adapt stage."""

from __future__ import annotations

import json
from pathlib import Path


def write_metrics(run: Path, rows: list[dict]) -> None:
    path = run / "logs" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    names = ["step", "train/loss", "train/prepare_s", "train/step_s"]
    lines = [",".join(names)] + [",".join(str(r.get(n, "")) for n in names) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_medians_skip_the_first_steps_and_rows_without_the_column(tmp_path, capsys, bench_script):
    rows = [{"step": 0, "train/prepare_s": 5.0}]  # the first step has no step_s (no previous step)
    rows += [{"step": s, "train/prepare_s": 9.0, "train/step_s": 10.0} for s in range(1, 3)]  # warm-up
    rows += [{"step": s, "train/prepare_s": 0.02, "train/step_s": 0.1} for s in range(3, 8)]
    rows += [{"step": 8, "train/loss": 1.5}]  # a row of another metric
    write_metrics(tmp_path, rows)
    assert bench_script("adapt_step_share").main([str(tmp_path), "--skip", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["median_step_s"] == 0.1 and out["median_prepare_s"] == 0.02 and out["prepare_share"] == 0.2
    assert out["steps"] == 5 and out["steps_per_s"] == 10.0


def test_a_run_without_metrics_is_a_one_line_error(tmp_path, capsys, bench_script):
    assert bench_script("adapt_step_share").main([str(tmp_path)]) == 2
    assert "no logs/version_*/metrics.csv" in capsys.readouterr().err
