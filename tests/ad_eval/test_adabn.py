"""AdaBN (``--bn-stats train``): BatchNorm running statistics re-estimated on the cell's normal train images."""

import json

import pytest
import torch

from ad_eval.adabn import recalibrated
from ad_eval.backbones import load_backbone
from ad_eval.cli import main as ad_eval
from ad_eval.datasets import ADImageDataset, scan


@pytest.fixture(scope="module")
def dataset(texture_dataset):
    return texture_dataset


def first_layer_inputs(backbone, samples, size=64):
    """conv1's output for every image: what the first BatchNorm normalises."""
    images = torch.stack([item["image"] for item in ADImageDataset(samples, size=size, mean=backbone.mean,
                                                                     std=backbone.std)])
    with torch.no_grad():
        return backbone.build().conv1(images)


def test_one_batch_gives_the_exact_mean_and_unbiased_variance(dataset):
    backbone = load_backbone("random", "resnet18", seed=0)
    train = scan("mvtec", dataset, "texture").train
    before = {k: v.clone() for k, v in backbone.state_dict.items()}
    adapted = recalibrated(backbone, train, size=64, crop=None)
    x = first_layer_inputs(backbone, train)  # (6, 64, 32, 32)
    assert torch.allclose(adapted.state_dict["bn1.running_mean"], x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(adapted.state_dict["bn1.running_var"], x.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4)
    # a random init's statistics are 0 and 1: every BatchNorm layer really changed, nothing else did
    for key, value in adapted.state_dict.items():
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(value, before[key]), key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(value, before[key]), key
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict.items())  # the input is unchanged
    again = recalibrated(backbone, train, size=64, crop=None)
    assert all(torch.equal(v, again.state_dict[k]) for k, v in adapted.state_dict.items())  # deterministic


def test_several_batches_average_the_batch_statistics(dataset):
    backbone = load_backbone("random", "resnet18", seed=1)
    train = scan("mvtec", dataset, "texture").train[:4]
    adapted = recalibrated(backbone, train, size=64, crop=None, batch_size=2)
    x = first_layer_inputs(backbone, train)
    halves = x[:2], x[2:]
    assert torch.allclose(adapted.state_dict["bn1.running_mean"],
                          sum(h.mean(dim=(0, 2, 3)) for h in halves) / 2, atol=1e-5)
    assert torch.allclose(adapted.state_dict["bn1.running_var"],
                          sum(h.var(dim=(0, 2, 3), unbiased=True) for h in halves) / 2, rtol=1e-4)


def test_batches_are_equal_in_size_so_no_image_weighs_more(dataset):
    backbone = load_backbone("random", "resnet18", seed=2)
    train = scan("mvtec", dataset, "texture").train[:5]
    # at 32 px layer4 is 1x1: a last batch of one image (4 + 1) cannot be batch-normalised in training mode
    adapted = recalibrated(backbone, train, size=32, crop=None, batch_size=4)
    x = first_layer_inputs(backbone, train, size=32)
    assert torch.allclose(adapted.state_dict["bn1.running_mean"],
                          (x[:3].mean(dim=(0, 2, 3)) + x[3:].mean(dim=(0, 2, 3))) / 2, atol=1e-5)  # 3 + 2


def test_images_are_preprocessed_as_the_methods_see_them(dataset):
    backbone = load_backbone("random", "resnet18", seed=0)
    train = scan("mvtec", dataset, "texture").train
    cropped = recalibrated(backbone, train, size=64, crop=48).state_dict["bn1.running_mean"]
    whole = recalibrated(backbone, train, size=64, crop=None).state_dict["bn1.running_mean"]
    images = torch.stack([item["image"] for item in ADImageDataset(train, size=64, crop=48, mean=backbone.mean,
                                                                     std=backbone.std)])
    with torch.no_grad():
        x = backbone.build().conv1(images)
    assert torch.allclose(cropped, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not torch.allclose(cropped, whole, atol=1e-5)  # the crop matters: these are other pixels


def run(dataset, out, *extra):
    return ad_eval(["run", "--method", "patchcore", "--dataset", "mvtec", "--root", str(dataset), "--category",
                    "texture", "--backbone", "random", "--arch", "resnet18", "--size", "64", "--device", "cpu",
                    "--out", str(out), *extra])


def test_a_cell_with_train_statistics_is_its_own_backbone_in_the_records(dataset, tmp_path):
    assert run(dataset, tmp_path / "raw") == 0
    assert run(dataset, tmp_path / "adabn", "--bn-stats", "train", "--shots", "4") == 0
    assert run(dataset, tmp_path / "adabn", "--bn-stats", "train") == 0
    raw = json.loads(next((tmp_path / "raw").glob("*.json")).read_text())
    adapted = {r["shots"] if "shots" in r else "all": r
               for r in (json.loads(p.read_text()) for p in (tmp_path / "adabn").glob("*.json"))}
    assert "bn_stats" not in raw and "bn_images" not in raw  # ids and records of existing cells unchanged
    assert {r["backbone"] for r in adapted.values()} == {"random-resnet18+adabn"}
    assert {r["bn_stats"] for r in adapted.values()} == {"train"}
    assert adapted["all"]["bn_images"] == 6 and adapted[4]["bn_images"] == 4  # the cell's own train images
    assert adapted["all"]["cell_id"] != raw["cell_id"]
    assert adapted["all"]["pixel_AUROC"] != raw["pixel_AUROC"]  # the features really changed


def test_train_statistics_with_a_projector_is_one_line(dataset, tmp_path, capsys):
    assert run(dataset, tmp_path, "--bn-stats", "train", "--projector", str(tmp_path / "p.pt")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bn_stats='train' with a projector" in err[0]
    assert not any(tmp_path.iterdir())


def test_grid_backbones_take_bn_stats(dataset, tmp_path):
    from ad_eval.grid import expand, parse_grid
    from fractal_pretrain.config import ConfigError

    data = {"datasets": {"mvtec": {"root": str(dataset), "categories": ["texture"]}},
            "backbones": {"Random": {"spec": "random", "arch": "resnet18"},
                          "AdaBN": {"spec": "random", "arch": "resnet18", "bn_stats": "train"},
                          "Both+adabn": {"spec": "random", "arch": "resnet18", "bn_stats": "train"}},
            "methods": {"patchcore": {}}, "size": 64, "seeds": [0]}
    grid = expand(parse_grid(data, "grid.yaml"), tmp_path, "grid.yaml")
    assert {c.backbone_name: c.bn_stats for c in grid.cells} == {
        "Random": "source", "AdaBN+adabn": "train", "Both+adabn": "train"}
    assert grid.backbone_key(next(c for c in grid.cells if c.backbone_name == "AdaBN+adabn")) == "backbones.AdaBN"
    data["backbones"]["AdaBN"]["projector"] = "p/projector.pt"
    with pytest.raises(ConfigError, match=r"grid.yaml: backbones\.AdaBN: bn_stats='train' with a projector"):
        parse_grid(data, "grid.yaml")
    data["backbones"]["AdaBN"]["bn_stats"] = "target"
    with pytest.raises(ConfigError, match=r"grid.yaml: backbones\.AdaBN: bn_stats='target': must be one of source"):
        parse_grid(data, "grid.yaml")


def test_a_name_claiming_adabn_without_it_is_one_line_and_writes_nothing(dataset, tmp_path, capsys):
    assert run(dataset, tmp_path / "out", "--name", "Fractals+adabn") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'Fractals+adabn': '+adabn' marks cells run with bn_stats='train'" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert run(dataset, tmp_path / "out", "--name", "Fractals+adabn", "--bn-stats", "train") == 0  # as claimed


def test_label_check_reads_suffixes_as_words_and_says_how_to_name_a_path_derived_label():
    from ad_eval.cell import check_label
    from fractal_pretrain.config import ConfigError

    check_label("Fractals+adaptive", projector=None, bn_stats="source")  # another word, not the +adapt marker
    check_label("Fractals+adabn", projector=None, bn_stats="train")
    derived = r"'runs\+adapt' \(from its path\): '\+adapt' marks .*\(name it with --name\)"
    with pytest.raises(ConfigError, match=derived):
        check_label("runs+adapt", projector=None, bn_stats="source", derived=True)
    with pytest.raises(ConfigError, match=r"'X\+adabn-v2': '\+adabn' marks .*\(rename it\)"):
        check_label("X+adabn-v2", projector=None, bn_stats="source")
