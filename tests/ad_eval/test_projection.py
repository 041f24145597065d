"""``ad-eval run --projector``: the CPU smoke projector used end to end on generated data, and its errors."""

import json

import pytest

from ad_eval.cli import main as ad_eval
from ad_eval.methods import get_method
from fractal_pretrain.cli import main as fractal_pretrain


@pytest.fixture(scope="module")
def projector(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    status = fractal_pretrain(["adapt", "--config", "jobs/adapt/smoke.yaml", "--trainer.max_steps", "2",
                               "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"])
    assert status == 0
    return root / "projector.pt"


@pytest.fixture(scope="module")
def dataset(texture_dataset):
    return texture_dataset


def run(dataset, out, method, *extra):
    return ad_eval(["run", "--method", method, "--dataset", "mvtec", "--root", str(dataset), "--category", "texture",
                    "--backbone", "random", "--arch", "resnet18", "--size", "64", "--device", "cpu",
                    "--out", str(out), *extra])


@pytest.mark.parametrize("method, extra", [("patchcore", []), ("featurenorm", []),
                                           ("padim", ["--layers", "2,3"])])  # PaDiM: the projector's layers
def test_projected_run_records_its_label_and_references(projector, dataset, tmp_path, method, extra):
    assert run(dataset, tmp_path, method, "--projector", str(projector), *extra) == 0
    (record_file,) = tmp_path.glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["backbone"] == "random-resnet18+adapt"
    assert record["projector"] == str(projector) and record["projector_shots"] == 2
    assert len(record["projector_references"]) == 2
    assert 0.0 <= record["image_AUROC"] <= 1.0 and record["pixel_AUROC"] is not None


@pytest.mark.parametrize("method, extra", [("patchcore", []), ("padim", ["--layers", "2,3"])])
def test_raw_and_projected_cells_differ(projector, dataset, tmp_path, method, extra):
    assert run(dataset, tmp_path / "raw", method, *extra) == 0
    assert run(dataset, tmp_path / "adapt", method, "--projector", str(projector), *extra) == 0
    raw = json.loads(next((tmp_path / "raw").glob("*.json")).read_text())
    adapted = json.loads(next((tmp_path / "adapt").glob("*.json")).read_text())
    assert raw["cell_id"] != adapted["cell_id"] and "projector" not in raw
    assert raw["pixel_AUROC"] != adapted["pixel_AUROC"]  # the features really changed


@pytest.mark.parametrize("extra, message", [
    (["--seed", "1"], "made for backbone 'random' resnet18 seed 0"),  # random init of seed 1: other weights
    (["--seed", "1"], "not for 'random' resnet18 seed 1 (digest"),  # which seed was used (it did not say)
    (["--arch", "resnet34"], "not for 'random' resnet34 seed 0 (digest"),
    (["--layers", "1,2"], "trained on layers layer2, layer3; patchcore uses layer1, layer2"),
    (["--projector-shots", "7"], "projector_shots=7: category 'texture' has only 6 train images"),
])
def test_bad_projector_use_is_one_line(projector, dataset, tmp_path, capsys, extra, message):
    assert run(dataset, tmp_path, "patchcore", "--projector", str(projector), *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not any(tmp_path.iterdir())


def test_method_without_projector_support_is_refused(projector, dataset, tmp_path, capsys):
    assert not get_method("stfpm").accepts_projector
    assert run(dataset, tmp_path, "stfpm", "--projector", str(projector)) == 2
    assert "does not accept a projector" in capsys.readouterr().err


def test_missing_projector_file(dataset, tmp_path, capsys):
    assert run(dataset, tmp_path, "featurenorm", "--projector", str(tmp_path / "nope.pt")) == 2
    assert "nope.pt: file not found" in capsys.readouterr().err


def test_grid_backbone_with_a_projector(tmp_path, dataset):
    from ad_eval.grid import GridError, expand, parse_grid

    data = {"datasets": {"mvtec": {"root": str(dataset), "categories": ["texture"]}},
            "backbones": {"Random": {"spec": "random", "arch": "resnet18"},
                          "Random+adapt": {"spec": "random", "arch": "resnet18", "projector": "p/projector.pt",
                                           "projector_shots": 2}},
            "methods": {"patchcore": {}, "featurenorm": {}}, "size": 64, "seeds": [0]}
    cells = expand(parse_grid(data, "grid.yaml"), tmp_path, "grid.yaml").cells
    adapted = [c for c in cells if c.projector]
    assert len(cells) == 4 and len(adapted) == 2
    assert {c.backbone_name for c in adapted} == {"Random+adapt"}
    assert all(c.projector == str(tmp_path / "p/projector.pt") and c.projector_shots == 2 for c in adapted)
    data["methods"] = {"stfpm": {}}
    with pytest.raises(GridError, match="does not accept a projector"):
        expand(parse_grid(data, "grid.yaml"), tmp_path, "grid.yaml")


def test_grid_refuses_a_projector_of_another_seed_before_submitting(projector, dataset, tmp_path):
    """A random backbone is other weights for every seed: with seeds [0, 1] and a projector adapted for seed 0
    the seed-1 cells all failed at run time ("re-run the same command to retry"); now one error up front."""
    import yaml

    from ad_eval.grid import GridError, run_grid

    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({
        "datasets": {"mvtec": {"root": str(dataset), "categories": ["texture"]}},
        "backbones": {"Random+adapt": {"spec": "random", "arch": "resnet18", "projector": str(projector)}},
        "methods": {"featurenorm": {}}, "size": 64, "seeds": [0, 1], "device": "cpu"}))
    seed_1 = r"backbones.Random\+adapt \(seed 1\): projector .* not for 'random' resnet18 seed 1"
    with pytest.raises(GridError, match=seed_1):
        run_grid(config, tmp_path / "out", cluster="debug", progress=False)
    assert not (tmp_path / "out").exists()


def test_file_backbone_projector_names_no_seed(dataset, tmp_path, capsys):
    """A seed names weights only for a random init: projector.json records none for a file backbone, and the
    digest error for another file does not say "seed 0" (it did, whatever the file)."""
    import torch
    import torchvision

    weights = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights[seed] = tmp_path / f"r18_{seed}.pth"
        torch.save(torchvision.models.resnet18().state_dict(), weights[seed])
    root = tmp_path / "adapt"
    assert fractal_pretrain(["adapt", "--config", "jobs/adapt/smoke.yaml", "--trainer.max_steps", "1",
                             "--model.backbone", f"imagenet:{weights[0]}", "--trainer.default_root_dir", str(root),
                             "--trainer.enable_progress_bar", "false"]) == 0
    assert json.loads((root / "projector.json").read_text())["backbone_seed"] is None
    capsys.readouterr()
    assert ad_eval(["run", "--method", "patchcore", "--dataset", "mvtec", "--root", str(dataset), "--category",
                    "texture", "--backbone", f"imagenet:{weights[1]}", "--arch", "resnet18", "--size", "64",
                    "--device", "cpu", "--out", str(tmp_path / "out"), "--projector", str(root / "projector.pt")]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert f"made for backbone 'imagenet:{weights[0]}' resnet18 (weights digest" in err and "seed" not in err


def test_a_few_shot_cell_s_references_are_among_its_own_shots(projector, dataset, tmp_path, capsys):
    # the projector's default is 2 references; a 1-shot cell may use only its one image (featurenorm: it fits on one)
    from ad_eval.datasets import scan
    from ad_eval.fewshot import select_shots

    train = scan("mvtec", str(dataset), "texture").train
    for shots, references in ((1, 1), (3, 2)):
        out = tmp_path / str(shots)
        assert run(dataset, out, "featurenorm", "--projector", str(projector), "--shots", str(shots)) == 0
        record = json.loads(next(out.glob("*.json")).read_text())
        own = {s.path.name for s in select_shots(train, shots, seed=0, category="texture")}
        assert record["projector_shots"] == references == len(record["projector_references"])
        assert set(record["projector_references"]) <= own
    capsys.readouterr()
    assert run(dataset, tmp_path / "bad", "featurenorm", "--projector", str(projector), "--shots", "1",
               "--projector-shots", "2") == 2
    assert "projector_shots=2: more references than the cell's shots=1" in capsys.readouterr().err
