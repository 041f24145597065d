"""Few-shot cells: which K train images (pure, nested, recorded), the grid's shots axis, and too-few errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ad_eval.cell import Cell
from ad_eval.cli import main
from ad_eval.datasets import scan
from ad_eval.fewshot import parse_shots, select_shots
from ad_eval.grid import GridError, load_grid
from ad_eval.methods import get_method
from ad_eval.synthetic import make_mvtec_like
from fractal_pretrain.config import ConfigError

SIZE = 32


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return make_mvtec_like(root, categories=("texture", "object"), n_train=16, n_test_good=3, n_test_defect=2,
                           size=SIZE)


def names(samples) -> list[str]:
    return [s.path.name for s in samples]


def test_selection_is_pure_nested_and_depends_on_seed_and_category(data_root):
    train = scan("mvtec", data_root, "texture").train
    chosen = {k: names(select_shots(train, k, seed=0, category="texture")) for k in (1, 2, 4, 8, 16)}
    assert all(len(chosen[k]) == k for k in chosen)
    for k in (1, 2, 4, 8):
        assert set(chosen[k]) < set(chosen[2 * k])  # nested: K's images are among 2K's
    assert chosen[16] == names(train) and names(select_shots(train, None, seed=0, category="texture")) == names(train)
    again = names(select_shots(list(train), 4, seed=0, category="texture"))
    assert again == chosen[4]  # a pure function: same (seed, category, K), same images
    assert chosen[4] == sorted(chosen[4])  # kept in the folder's order
    other_seeds = {tuple(names(select_shots(train, 4, seed=s, category="texture"))) for s in range(1, 6)}
    other_categories = {tuple(names(select_shots(train, 4, seed=0, category=c))) for c in ("a", "b", "c", "d")}
    assert len(other_seeds | {tuple(chosen[4])}) > 2 and len(other_categories | {tuple(chosen[4])}) > 2
    with pytest.raises(ConfigError, match="shots=17: category 'texture' has only 16 train images"):
        select_shots(train, 17, seed=0, category="texture")


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_bad_shots_name_the_value(bad):
    with pytest.raises(ConfigError, match=f"shots={bad!r}: must be an integer >= 1 or 'all'"):
        parse_shots(bad)
    assert parse_shots("all") is None and parse_shots("4") == 4 and parse_shots(None) is None


def test_cell_id_and_dict_are_unchanged_without_shots():
    base = dict(method="patchcore", dataset="mvtec", root="/d", category="bottle", backbone="random", arch="resnet18")
    full, few = Cell(**base), Cell(**base, shots=4)
    assert "shots" not in full.to_dict() and full.cell_id == Cell(**base, shots=None).cell_id
    assert few.to_dict()["shots"] == 4 and "_s0_k4_" in few.cell_id and few.cell_id != full.cell_id


def test_run_records_the_shots_and_the_chosen_images(data_root, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--method", "panda", "--dataset", "mvtec", "--root", str(data_root), "--category", "object",
            "--backbone", "random", "--arch", "resnet18", "--size", str(SIZE), "--device", "cpu", "--seed", "3",
            "--out", str(out)]
    assert main([*args, "--shots", "4"]) == 0
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    train = scan("mvtec", data_root, "object").train
    assert record["shots"] == 4 and "_k4_" in record["cell_id"]
    assert record["train_images"] == names(select_shots(train, 4, seed=3, category="object"))


def test_too_few_images_for_the_method_is_one_line_naming_k_and_the_minimum(data_root, tmp_path, capsys):
    args = ["run", "--method", "patchcore", "--dataset", "mvtec", "--root", str(data_root), "--category", "texture",
            "--backbone", "random", "--arch", "resnet18", "--size", "64", "--device", "cpu", "--out",
            str(tmp_path / "out"), "--shots", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    # 64 px, layer2 first: 8 x 8 patches a image, 10 % kept, 9 neighbours needed -> 2 images
    assert err == "ad-eval: error: patchcore cannot run with shots=1: it needs at least 2 train images at this " \
                  "config and image size\n"
    assert not (tmp_path / "out").exists()  # found before the cell starts: nothing written


@pytest.mark.parametrize("size, crop, layers, fiber, need", [
    (256, None, ("layer2", "layer3", "layer4"), 64, 1),  # layer4 8 x 8: one image fills a flow step
    (256, 224, ("layer2", "layer3", "layer4"), 64, 2),  # 7 x 7 = 49 < 64
    (64, None, ("layer2", "layer3", "layer4"), 64, 16),  # 2 x 2
    (64, None, ("layer2",), 64, 1),  # 8 x 8
    (65, None, ("layer4",), 9, 1),  # 65 px: a 3 x 3 layer4 (each stride-2 step rounds up)
])
def test_cflow_minimum_is_one_flow_step_on_every_layer(size, crop, layers, fiber, need):
    spec = get_method("cflow")
    assert spec.min_train_images(spec.make_config({"fiber_batch_size": fiber}), layers, crop or size) == need


def test_cflow_with_too_few_images_is_one_line_and_the_minimum_runs(data_root, tmp_path, capsys):
    # anomalib's CFlow needs B * H * W >= fiber_batch_size on every layer; below it the fit failed mid-run with
    # "Make sure we have enough fibers" and a failure record. At 64 px layer4 is 2 x 2: 8 fibers need 2 images.
    args = ["run", "--method", "cflow", "--dataset", "mvtec", "--root", str(data_root), "--category", "texture",
            "--backbone", "random", "--arch", "resnet18", "--size", "64", "--device", "cpu", "--set", "max_epochs=1",
            "--set", "fiber_batch_size=8", "--out", str(tmp_path / "out")]
    assert main([*args, "--shots", "1"]) == 2
    assert capsys.readouterr().err == ("ad-eval: error: cflow cannot run with shots=1: it needs at least 2 train "
                                       "images at this config and image size\n")
    assert not (tmp_path / "out").exists()
    assert main([*args, "--shots", "2"]) == 0
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert record["shots"] == 2 and record["pixel_AUROC"] is not None


def test_grid_shots_axis(data_root, tmp_path):
    config = {
        "datasets": {"mvtec": {"root": str(data_root), "categories": ["texture"]}},
        "backbones": {"Random": {"spec": "random", "arch": "resnet18"}},
        "methods": {"padim": {"layers": [[1, 2]]}}, "size": SIZE, "seeds": [0, 1], "shots": [2, 3, "all"],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    cells = load_grid(path).cells
    assert [(c.seed, c.shots) for c in cells] == [(0, 2), (0, 3), (0, None), (1, 2), (1, 3), (1, None)]
    assert len({c.cell_id for c in cells}) == 6
    # PaDiM's covariance needs two images, PatchCore's coreset at 32 px six: the cells of a K below a method's
    # minimum are left out with a note, not run into failure records that every re-run would retry
    both = {**config, "methods": {"padim": {"layers": [[1, 2]]}, "patchcore": {}}, "seeds": [0], "shots": [1, 2, 6]}
    path.write_text(yaml.safe_dump(both))
    grid = load_grid(path)
    assert [(c.method, c.shots) for c in grid.cells] == [("padim", 2), ("padim", 6), ("patchcore", 6)]
    why = "{m} cannot run with shots={k}: it needs at least {n} train images at this config and image size"
    assert grid.skipped == tuple(f"methods.{m}, shots={k}: skipped ({why.format(m=m, k=k, n=n)})"
                                 for m, k, n in (("padim", 1, 2), ("patchcore", 1, 6), ("patchcore", 2, 6)))
    path.write_text(yaml.safe_dump({**both, "shots": [1]}))
    with pytest.raises(GridError, match=r"grid.yaml: no cell left to run: methods.padim, shots=1: skipped \(padim "):
        load_grid(path)
    path.write_text(yaml.safe_dump({**config, "shots": [4, 0]}))
    with pytest.raises(GridError, match=r"grid.yaml: shots=0: must be an integer >= 1 or 'all'"):
        load_grid(path)
