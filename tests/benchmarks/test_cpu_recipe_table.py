"""benchmarks/cpu_recipe_table.py: the recipe study's tables (means over seeds, paired differences to random)."""

from __future__ import annotations

import json

import pytest


def write_cells(folder, backbone: str, values: dict[tuple[str, int], float]) -> None:
    """One result JSON per (category, seed) with image AUROC ``values[...]``, pixel AUROC 0.9, AUPRO 0.5."""
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    for (category, seed), value in values.items():
        cell = {"method": "patchcore", "backbone": backbone, "category": category, "seed": seed,
                "image_AUROC": value, "pixel_AUROC": 0.9, "pixel_AUPRO": 0.5, "wall_time_s": 1.0}
        (folder / "eval" / f"{backbone}_{category}_{seed}.json").write_text(json.dumps(cell))


def test_means_over_seeds_and_differences_paired_by_seed(tmp_path, bench_script):
    write_cells(tmp_path, "random", {("a", 0): 0.5, ("b", 0): 0.7, ("a", 1): 0.6, ("b", 1): 0.8})
    write_cells(tmp_path, "ofdb", {("a", 0): 0.7, ("b", 0): 0.9, ("a", 1): 0.6, ("b", 1): 0.8})
    table = bench_script("cpu_recipe_table")
    lines = table.tables(table.load(tmp_path)).splitlines()
    # random: per-seed means 0.6 and 0.7 -> 0.650 (se 0.050); ofdb: 0.8 and 0.7 -> 0.750; paired +0.2 and 0.0
    assert "| random | 2 | 0.650 (0.050) | 0.900 (0.000) | 0.500 (0.000) |  |  |  |" in lines
    assert "| ofdb | 2 | 0.750 (0.050) | 0.900 (0.000) | 0.500 (0.000) | 0.100 (0.100) | 0.000 (0.000) | " \
           "0.000 (0.000) |" in lines
    assert lines.index("| random | 2 | 0.650 (0.050) | 0.900 (0.000) | 0.500 (0.000) |  |  |  |") < \
        [i for i, line in enumerate(lines) if line.startswith("| ofdb | 2 |")][0]  # the recipes' order, random first
    assert "| ofdb | a | 0.650 | 0.900 | 0.500 |" in lines


def test_an_empty_folder_is_a_one_line_error(tmp_path, bench_script):
    with pytest.raises(SystemExit, match="no results in"):
        bench_script("cpu_recipe_table").load(tmp_path)


def test_another_control_is_paired_against_and_listed_first(tmp_path, bench_script):
    # cpu_adapt_bar.sh: the projected cells NAME+adapt against the same backbone's raw cells NAME
    write_cells(tmp_path, "random", {("a", 0): 0.1, ("b", 0): 0.1})
    write_cells(tmp_path, "frac", {("a", 0): 0.5, ("b", 0): 0.7})
    write_cells(tmp_path, "frac+adapt", {("a", 0): 0.4, ("b", 0): 0.6})
    table = bench_script("cpu_recipe_table")
    lines = table.tables(table.load(tmp_path), control="frac").splitlines()
    rows = [line for line in lines if line.split(" | ")[1:2] == ["1"]]
    assert [row.split(" | ")[0] for row in rows] == ["| frac", "| random", "| frac+adapt"]
    assert rows[2].startswith("| frac+adapt | 1 | 0.500 (nan) | 0.900 (nan) | 0.500 (nan) | -0.100 (nan) |")
    assert "image_AUROC - frac" in lines[2]


def test_adabn_cells_follow_their_own_backbone(tmp_path, bench_script):
    for backbone in ("ofdb+adabn", "random", "ofdb", "anderson", "random+adabn"):
        write_cells(tmp_path, backbone, {("a", 0): 0.5})
    table = bench_script("cpu_recipe_table")
    lines = table.tables(table.load(tmp_path)).splitlines()
    rows = [line.split(" | ")[0][2:] for line in lines if line.split(" | ")[1:2] == ["1"]]
    assert rows == ["random", "random+adabn", "anderson", "ofdb", "ofdb+adabn"]


def test_an_unknown_control_is_a_one_line_error(tmp_path, bench_script, capsys):
    write_cells(tmp_path, "frac", {("a", 0): 0.5})
    write_cells(tmp_path, "frac+adapt", {("a", 0): 0.4})
    with pytest.raises(SystemExit, match=r"--control farc: no results of that backbone .* \(backbones: frac, "
                                         r"frac\+adapt\)"):
        bench_script("cpu_recipe_table").main([str(tmp_path), "--control", "farc"])
    assert capsys.readouterr().out == ""  # no table with empty difference columns
    bench_script("cpu_recipe_table").main([str(tmp_path)])  # no random: the means, no differences, as before
    assert "| frac | 1 | 0.500 (nan) |" in capsys.readouterr().out
