"""The ``fractal-pretrain`` command line: recipes, render, export, and its error handling.

Run: bash scripts/test.sh tests/fractal_pretrain/test_cli.py
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fractal_pretrain.cli import main
from fractal_pretrain.export import load_manifest
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import make_renderer

RECIPES = ("anderson", "fractal4ad", "multiformula", "multiinstance", "fractaldb")
SIZE = 32
FAST = ["--set", "num_points=5000"]  # few points: fast on 2 cores


def _render_args(out, *extra: str) -> list[str]:
    return [
        "render",
        "--recipe",
        "anderson",
        "--num",
        "5",
        "--seed",
        "0",
        "--size",
        str(SIZE),
        "--device",
        "cpu",
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


def _assert_one_line_error(err: str) -> None:
    assert err.startswith("fractal-pretrain: error: ")
    assert err.strip().count("\n") == 0
    assert "Traceback" not in err


def test_recipes_lists_all_five(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert set(RECIPES) <= set(listed)


def test_render_writes_grid(tmp_path, capsys):
    out = tmp_path / "sub" / "grid.png"
    assert main(_render_args(out, "--no-labels")) == 0
    assert capsys.readouterr().out.strip() == str(out)
    grid = np.asarray(Image.open(out).convert("RGB"))
    # 5 tiles -> 3 columns x 2 rows with 2 px gaps
    assert grid.shape == (2 * SIZE + 2, 3 * SIZE + 2 * 2, 3)
    # each tile is the image the renderer makes for that index
    recipe = get_recipe("anderson", {"num_points": 5000})
    direct = make_renderer(recipe, size=SIZE, seed=0, device="cpu").render(np.arange(5))
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = r * (SIZE + 2), c * (SIZE + 2)
        np.testing.assert_array_equal(grid[y : y + SIZE, x : x + SIZE], direct.images[i])


def test_render_labels_add_a_caption_strip(tmp_path):
    out = tmp_path / "grid.png"
    assert main(_render_args(out, "--start", "7", "--epoch", "2")) == 0
    width, height = Image.open(out).size
    assert width == 3 * SIZE + 2 * 2
    assert height > 2 * SIZE + 2


def test_export_writes_shards(tmp_path, capsys):
    out = tmp_path / "shards"
    argv = [
        "export",
        "--recipe",
        "anderson",
        "--num",
        "3",
        "--seed",
        "1",
        "--size",
        str(SIZE),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--no-progress",
        *FAST,
    ]
    assert main(argv) == 0
    manifest = load_manifest(out)
    assert manifest["count"] == 3 and manifest["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert manifest["overrides"] == {"num_points": 5000}
    assert "wrote 3 samples in 2 shards" in capsys.readouterr().out


def test_unknown_recipe_names_it_and_the_allowed_ones(tmp_path, capsys):
    argv = _render_args(tmp_path / "g.png")
    argv[argv.index("anderson")] = "nosuchrecipe"
    assert main(argv) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err)
    assert "nosuchrecipe" in err
    for name in RECIPES:
        assert name in err
    assert not (tmp_path / "g.png").exists()


def test_bad_set_key_names_the_key(tmp_path, capsys):
    assert main(_render_args(tmp_path / "g.png", "--set", "no_such_key=1")) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err)
    assert "no_such_key" in err


def test_bad_device_is_a_config_error(tmp_path, capsys):
    assert main(_render_args(tmp_path / "g.png", "--device", "tpu")) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err)
    assert "tpu" in err


@pytest.mark.parametrize(
    ("command", "flag"),
    [("render", "--num"), ("render", "--size"), ("export", "--shard-size"), ("export", "--num")],
)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_counts_are_rejected(tmp_path, capsys, command, flag, value):
    argv = [
        command,
        "--recipe",
        "anderson",
        "--num",
        "2",
        "--size",
        str(SIZE),
        "--out",
        str(tmp_path / "x"),
    ]
    if command == "export":
        argv += ["--shard-size", "2"]
    argv[argv.index(flag) + 1] = value
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a positive integer" in err
    assert not (tmp_path / "x").exists()


def test_set_needs_key_equals_value(tmp_path, capsys):
    assert main(_render_args(tmp_path / "g.png", "--set", "num_points")) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "fractal_pretrain", "recipes"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for name in RECIPES:
        assert name in proc.stdout
