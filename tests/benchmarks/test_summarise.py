"""benchmarks/summarise.py turns the GPU session's JSON lines into the Markdown tables of RESULTS.md; it runs
last in a device call, so a crash there would lose the summary of a whole session."""

from __future__ import annotations

import json


def test_render_and_train_rows_become_tables_and_other_lines_are_skipped(tmp_path, bench_script):
    render = [
        {"recipe": "anderson", "device": "cuda", "size": 256, "batch": 512, "ms_per_batch": 1.8,
         "images_per_s": 284444.4, "version": "5c48fc7 chaos kernel", "digest": "77032ad464c5",
         "kernel_ms": {"render_items": 1.1, "plasma_background": 0.5, "finish": 0.2}},
        {"recipe": "fractal4ad", "device": "cuda", "size": 256, "batch": 512, "ms_per_batch": 1.3,
         "images_per_s": 393846.2, "overrides": {"chains": 512}},
        {"recipe": "mandelbulbvar", "device": "cuda", "size": 256, "batch": 512, "ms_per_batch": 3.1,
         "images_per_s": 165161.3, "overrides": {"mode": "view_bank"}, "setup_s": 9.25, "rays_per_s": 470312345},
    ]
    train = [{"arch": "resnet18", "compile": False, "dtype": "bfloat16", "ceiling_img_s": 9800.0,
              "end_to_end_img_s": 9650.0, "ratio": 0.9847, "prefetch_img_s": 9700.0, "prefetch_ratio": 0.9898,
              "render_ms_per_batch": 1.3}]
    log = tmp_path / "session.log"
    log.write_text("3 passed in 2.1s\n" + "\n".join(json.dumps(r) for r in render + train) + "\n{not json\n")
    text = bench_script("summarise").summarise([str(log)])
    lines = text.splitlines()
    assert "| anderson | 5c48fc7 chaos kernel | 256 | 512 | 1.8 | 284,444 | 77032ad464c5 | render_items 1.1, " \
           "plasma_background 0.5, finish 0.2 | – | – |" in lines
    assert any(line.startswith("| fractal4ad, chains=512 |  | 256 | 512 | 1.3 | 393,846 |") for line in lines)
    assert "| mandelbulbvar, mode=view_bank |  | 256 | 512 | 3.1 | 165,161 |  |  | 4.7e+08 | 9.25 |" in lines
    assert "| resnet18, bfloat16 | 9,800 | 9,650 | 0.985 | 9,700 | 0.990 | 1.3 |" in lines
