"""The method registry: a method defined in this file runs through ``ad-eval run``, a local grid and the report.

``ToyMean`` is a real (if naive) AD method: the anomaly map is the distance of each pixel to the mean
train image, the image score the map's maximum. It is registered when this module is imported; the
grid's worker processes import it through ``AD_EVAL_METHODS=test_registry`` (the registry's plugin
variable), with this folder on their ``PYTHONPATH``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ad_eval.cli import main
from ad_eval.datasets import ADImageDataset, Split
from ad_eval.grid import GridError, load_grid
from ad_eval.methods import ANY_LAYER_SET, MethodSpec, get_method, list_methods, register
from ad_eval.methods.base import MethodScores
from ad_eval.methods.registry import PLUGIN_ENV
from ad_eval.synthetic import make_mvtec_like
from fractal_pretrain.config import ConfigError, check_range

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SIZE = 32


@dataclass(frozen=True)
class ToyConfig:
    """The toy method's one hyper-parameter."""

    power: float = 1.0  # the map is |x - mean| ** power

    def __post_init__(self):
        check_range("power", self.power, 0.1, 4.0)


def run_toy(backbone, split: Split, *, layers, size, crop, config: ToyConfig, device, seed, work_dir) -> MethodScores:
    def images(samples):
        data = ADImageDataset(samples, size=size, crop=crop, mean=backbone.mean, std=backbone.std)
        items = [data[i] for i in range(len(data))]
        return torch.stack([it["image"] for it in items]), torch.stack([it["mask"][0] for it in items])

    train, _ = images(split.train)
    test, masks = images(split.test)
    maps = (test - train.mean(dim=0)).abs().mean(dim=1).pow(config.power)  # (N, H, W)
    return MethodScores(image_scores=maps.flatten(1).amax(dim=1).double().numpy(),
                        image_labels=np.array([s.label for s in split.test]), anomaly_maps=maps.numpy(),
                        masks=masks.numpy())


TOY = register(MethodSpec(name="toymean", label="ToyMean", config=ToyConfig, run=run_toy, pixel_maps=True,
                          min_train_images=lambda config, layers, side: 2))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return make_mvtec_like(root, categories=("texture",), n_train=6, n_test_good=3, n_test_defect=2, size=SIZE)


def run_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--method", "toymean", "--dataset", "mvtec", "--root", str(root), "--category", "texture",
            "--backbone", "random", "--arch", "resnet18", "--size", str(SIZE), "--device", "cpu", "--out", str(out),
            *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.endswith(".failed.json")]


# ----------------------------------------------------------------------------- the registry itself


def test_builtin_methods_are_registered_with_their_properties():
    names = list_methods()
    assert names == ("patchcore", "padim", "fastflow", "cflow", "rd", "stfpm", "panda", "cutpaste", "featurenorm",
                     "toymean")
    assert get_method("cflow").label == "C-Flow" and get_method("patchcore").default_layers == ("layer2", "layer3")
    assert not get_method("panda").pixel_maps and not get_method("cutpaste").pixel_maps
    assert get_method("cutpaste").allowed_layer_sets is None and not get_method("cutpaste").takes_layers
    assert get_method("rd").allowed_layer_sets == (("layer1", "layer2", "layer3"),)
    assert get_method("stfpm").allowed_layer_sets == ANY_LAYER_SET and len(ANY_LAYER_SET) == 15
    for name in names:
        spec = get_method(name)
        assert dataclasses.is_dataclass(spec.config) and spec.config.__dataclass_params__.frozen, name
        spec.make_config()  # the defaults are valid


def test_unknown_method_and_a_clashing_registration_are_errors():
    with pytest.raises(ConfigError, match="unknown method 'nope': must be one of patchcore, .*toymean"):
        get_method("nope")
    with pytest.raises(ConfigError, match="'toymean' is already registered"):
        register(dataclasses.replace(TOY, label="Other"))
    assert register(TOY) is TOY  # the same spec again (a re-import) is fine
    with pytest.raises(ConfigError, match="default_layers=.*is not an allowed set"):
        MethodSpec(name="x", label="X", config=ToyConfig, run=run_toy, default_layers=("layer4",),
                   allowed_layer_sets=(("layer1",),))


def test_layer_sets_are_checked_against_the_spec():
    assert get_method("fastflow").resolve_layers("3,2,1") == ("layer1", "layer2", "layer3")
    with pytest.raises(ConfigError, match="fastflow only supports layers layer1, layer2, layer3, not layer2"):
        get_method("fastflow").resolve_layers("2")
    with pytest.raises(ConfigError, match="takes no layers"):
        get_method("cutpaste").resolve_layers("2")


# ----------------------------------------------------------------------------- typed configs


def _int_fields(config_cls) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls) if type(f.default) is int]


@pytest.mark.parametrize("method", ["patchcore", "padim", "fastflow", "cflow", "rd", "stfpm", "panda", "cutpaste"])
def test_every_config_error_names_method_key_and_value(method):
    spec = get_method(method)
    with pytest.raises(ConfigError, match=rf"^{method} config: unknown key 'bogus' \(allowed: \w+"):
        spec.make_config({"bogus": 1})
    for key in _int_fields(spec.config):
        with pytest.raises(ConfigError, match=rf"^{method} config: {key}=-7: must be"):
            spec.make_config({key: -7})
        with pytest.raises(ConfigError, match=rf"^{method} config: {key}='x': must be an integer"):
            spec.make_config({key: "x"})


@pytest.mark.parametrize("bad", ["x", -7])
def test_every_field_of_every_method_rejects_a_wrong_value_in_one_line(bad):
    # cflow's decoder took any value (anomalib builds one decoder whatever the name) and a bad panda trainable
    # raised a bare TypeError (a traceback) or named "layers" instead of the key.
    for method in list_methods():
        spec = get_method(method)
        for field in dataclasses.fields(spec.config):
            with pytest.raises(ConfigError) as err:
                spec.make_config({field.name: bad})
            value = rf"{bad!r}(\.0)?"  # a float field names the value as it read it: -7.0
            assert re.match(rf"{method} config: {field.name}={value}: must be", str(err.value)), str(err.value)
            assert "\n" not in str(err.value)


def _fields_without_a_comment(cls) -> list[str]:
    """Fields (own and inherited) whose line, or the line above, has no ``#`` comment."""
    missing = []
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        lines, _ = inspect.getsourcelines(klass)
        for i, line in enumerate(lines):
            field = re.match(r"    (\w+): ", line)
            if field and "#" not in line and not lines[i - 1].strip().startswith("#"):
                missing.append(f"{klass.__name__}.{field.group(1)}")
    return missing


def test_every_config_field_has_a_comment():
    from ad_eval import grid

    configs = [get_method(m).config for m in list_methods()]
    configs += [grid.GridConfig, grid.DatasetEntry, grid.BackboneEntry, grid.MethodEntry, grid.Resources]
    assert [name for cls in configs for name in _fields_without_a_comment(cls)] == []


def test_config_values_are_coerced_to_the_field_types():
    assert get_method("cutpaste").make_config({"area_ratio": [0.1, 0.2]}).area_ratio == (0.1, 0.2)
    assert get_method("patchcore").make_config({"coreset_sampling_ratio": 1}).coreset_sampling_ratio == 1.0
    with pytest.raises(ConfigError, match=r"cutpaste config: optimizer='lbfgs': must be one of sgd, adam"):
        get_method("cutpaste").make_config({"optimizer": "lbfgs"})


@pytest.mark.parametrize("changes,message", [
    ({"datasets": {"mvtec": {"root": "/x", "categories": "bottle"}}},
     "datasets.mvtec: categories='bottle': must be a non-empty list of names"),
    ({"seeds": [0, -1]}, r"seeds=-1: must be in \[0, inf\]"),
    ({"shots": [2, "many"]}, "shots='many': must be an integer >= 1 or 'all'"),
    ({"resources": {"mem_gbb": 3}}, r"resources: unknown key 'mem_gbb' \(allowed: cpus_per_task, "),
    ({"methods": {"toymean": {"config": {"power": 0}}}}, r"methods.toymean: toymean config: power=0.0: must be in"),
    ({"methods": {"toymean": {"config": {"powr": 1}}}}, r"toymean config: unknown key 'powr' \(allowed: power\)"),
    ({"methods": {"toymean": {"resources": {"timeout_min": 0}}}},
     r"methods.toymean.resources: timeout_min=0: must be in \[1, inf\]"),
    ({"keep_maps": "yes"}, "keep_maps='yes': must be true or false"),
    ({"size": 128, "crop": 512}, r"crop=512: must be in \[8, 128\]"),
    ({"backbones": {"R": {"spec": 3}}}, "backbones.R: spec=3: must be a backbone.pt path"),
    ({"backbones": {"R": {"arch": "resnet18"}}}, "backbones.R: needs 'spec'"),
])
def test_grid_config_errors_name_file_key_and_value(tmp_path, changes, message):
    config = {"datasets": {"mvtec": {"root": "/x", "categories": ["a"]}},
              "backbones": {"R": {"spec": "random", "arch": "resnet18"}}, "methods": {"toymean": {}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**config, **changes}))
    with pytest.raises(GridError, match=message) as err:
        load_grid(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_cli_config_errors_are_one_line_and_write_nothing(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    for bad, expected in ((["--set", "power=9"], "toymean config: power=9.0: must be in [0.1, 4.0]"),
                          (["--set", "k=["], "bad YAML value for k"),
                          (["--set", "powr=2"], "toymean config: unknown key 'powr' (allowed: power)"),
                          (["--shots", "0"], "shots=0: must be an integer >= 1 or 'all'")):
        assert main(run_args(data_root, out, *bad)) == 2, bad
        err = capsys.readouterr().err
        last = err.splitlines()[-1]  # argparse's own errors come after its usage lines
        assert expected in last and last.startswith("ad-eval") and "Traceback" not in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- end to end


def test_registered_method_runs_through_run_grid_and_report(data_root, tmp_path, monkeypatch, capsys):
    # ad-eval run, in process
    out = tmp_path / "run"
    assert main(run_args(data_root, out, "--set", "power=2", "--name", "Random")) == 0
    (record,) = records(out)
    assert record["method"] == "toymean" and record["config"] == {"power": 2}
    assert 0 <= record["image_AUROC"] <= 1 and record["pixel_AUPRO"] is not None and record["num_test"] == 7
    assert record["image_AUROC"] > 0.5  # the synthetic defects change pixels: even this method sees them

    # the grid on the local cluster: worker processes find the method through the plugin variable
    monkeypatch.setenv(PLUGIN_ENV, "test_registry")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "datasets": {"mvtec": {"root": str(data_root), "categories": ["texture"]}},
        "backbones": {"Random": {"spec": "random", "arch": "resnet18"}},
        "methods": {"toymean": {"config": {"power": 2}}},
        "size": SIZE, "seeds": [0, 1], "device": "cpu",
        "resources": {"timeout_min": 10, "mem_gb": 4, "cpus_per_task": 1, "gpus_per_node": 0},
    }))
    results = tmp_path / "results"
    assert main(["grid", "--config", str(grid), "--cluster", "local", "--out", str(results), "--no-progress"]) == 0
    got = records(results)
    assert sorted((r["method"], r["seed"]) for r in got) == [("toymean", 0), ("toymean", 1)]
    toy = next(r for r in got if r["seed"] == 0)
    assert toy["cell_id"] == record["cell_id"]  # the same cell as the run above
    assert toy["image_AUROC"] == record["image_AUROC"]

    # the report has a column for it
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "table_mvtec_image_AUROC.md").read_text()
    assert TOY.label in table or TOY.name in table


def test_methods_command_lists_every_method_with_its_set_keys(capsys):
    """`ad-eval methods`: what --method, --layers and --set accept, without reading the source."""
    assert main(["methods"]) == 0
    out = "\n" + capsys.readouterr().out
    assert all(f"\n{name} " in out for name in list_methods())  # the test-only method too
    patchcore = out[out.index("\npatchcore ") + 1:].split("\n")[:2]
    assert "PatchCore" in patchcore[0] and "layers 2+3 (any of 1-4)" in patchcore[0]
    assert "coreset_sampling_ratio=0.1" in patchcore[1] and "num_neighbors=9" in patchcore[1]
    assert "cutpaste " in out and "no layers, image scores only" in out
    toy = out[out.index("\ntoymean ") + 1:].split("\n")[:2]
    assert "ToyMean" in toy[0] and all(f"{f.name}=" in toy[1] for f in dataclasses.fields(ToyConfig))
