"""Tests of ad_eval.methods.anomalib_models: offline construction, injection, end-to-end cells.

Real data: ``hazelnut_reduced`` (MVTec layout) under ``../shared/realdata`` relative to the
repository root, read in place at 64 px with 10 train images and a random resnet18 backbone; those
tests skip if the folder is absent. Construction checks need no data.

Run: ``python -m pytest -q tests/ad_eval/test_anomalib_models.py`` (``-m slow``: only the WRN50-2 cells)
"""

from __future__ import annotations

import dataclasses
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import timm.models._builder
import torch
from anomalib.metrics import AUROC
from anomalib.models import Stfpm

from ad_eval import metrics
from ad_eval.backbones import load_backbone
from ad_eval.datasets import ADImageDataset, Split, scan
from ad_eval.methods import anomalib_models as am
from ad_eval.methods.padim import padim_n_features
from fractal_pretrain.config import ConfigError

CATEGORY = "hazelnut_reduced"
SIZE = 64
N_TRAIN = 10




@pytest.fixture(scope="module")
def backbone():
    return load_backbone("random", arch="resnet18", seed=0)


@pytest.fixture(scope="module")
def split(realdata):
    full = scan("mvtec", realdata, CATEGORY)
    return Split(train=full.train[:N_TRAIN], test=full.test)


@pytest.fixture
def no_network(monkeypatch):
    """Every way timm/torch could fetch weights raises."""

    def boom(*args, **kwargs):
        raise RuntimeError("network access during model construction")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", boom)
    monkeypatch.setattr(urllib.request, "urlopen", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _run(method, backbone, split, tmp_path, **kwargs):
    kwargs.setdefault("config", {} if method in ("patchcore", "padim") else {"max_epochs": 1})
    return am.run_anomalib(
        method, backbone, split, size=SIZE, device="cpu", work_dir=tmp_path, **kwargs
    )


def _assert_extractors_hold(model, method, backbone):
    extractors = am.frozen_extractors(method, model)
    assert extractors
    for name, extractor in extractors.items():
        state = extractor.state_dict()
        assert state, name
        for key, value in state.items():
            assert torch.equal(value, backbone.state_dict[key]), f"{method} {name} {key}"


# ----------------------------------------------------------------------------- construction


def test_network_trap_catches_stfpm_teacher(no_network):
    """Sanity check of the trap: anomalib's STFPM alone would fetch ImageNet weights."""
    with pytest.raises(RuntimeError, match="network access"):
        Stfpm(backbone="resnet18", pre_processor=False, post_processor=False,
              evaluator=False, visualizer=False)  # fmt: skip


@pytest.mark.parametrize("method", am.METHODS)
def test_build_offline_and_inject(method, backbone, no_network):
    model = am.build_model(method, backbone, out_size=(SIZE, SIZE))
    _assert_extractors_hold(model, method, backbone)
    transform = model.pre_processor.transform
    assert model.input_size == (SIZE, SIZE)
    x = torch.rand(2, 3, SIZE, SIZE)
    expected = (x - torch.tensor(backbone.mean)[:, None, None]) / torch.tensor(backbone.std)[
        :, None, None
    ]
    assert torch.allclose(transform(x), expected, atol=1e-6)
    if method == "stfpm":
        student = model.model.student_model.feature_extractor.state_dict()
        teacher = model.model.teacher_model.feature_extractor.state_dict()
        assert student.keys() == teacher.keys()
        assert not torch.equal(student["conv1.weight"], teacher["conv1.weight"])
        assert any(p.requires_grad for p in model.model.student_model.parameters())
        assert not any(p.requires_grad for p in model.model.teacher_model.parameters())


def test_layer_sets_reach_the_extractor(backbone):
    model = am.build_model("patchcore", backbone, layers=("layer1", "layer4"), out_size=(SIZE, SIZE))
    extractor = model.model.feature_extractor
    assert extractor.layers == ["layer1", "layer4"]
    assert any(k.startswith("layer4.") for k in extractor.feature_extractor.state_dict())
    model = am.build_model("stfpm", backbone, layers="2", out_size=(SIZE, SIZE))
    assert model.model.teacher_model.layers == ["layer2"]
    assert not any(k.startswith("layer3.") for k in model.model.teacher_model.state_dict())
    model = am.build_model("cflow", backbone, layers=(1, 3), out_size=(SIZE, SIZE))
    assert model.model.pool_layers == ("layer1", "layer3") and len(model.model.decoders) == 2


@pytest.mark.parametrize("method", ["fastflow", "rd"])
def test_fixed_layer_sets(method, backbone):
    assert am.resolve_layers(method, None) == ("layer1", "layer2", "layer3")
    assert am.resolve_layers(method, "3,1,2") == ("layer1", "layer2", "layer3")
    with pytest.raises(ValueError, match=rf"{method} only supports layers layer1, layer2, layer3"):
        am.build_model(method, backbone, layers=("layer2", "layer3"), out_size=(SIZE, SIZE))


def test_default_layer_sets():
    assert am.resolve_layers("patchcore", None) == ("layer2", "layer3")
    assert am.resolve_layers("cflow", None) == ("layer2", "layer3", "layer4")
    with pytest.raises(ValueError, match="is not one of 1, 2, 3, 4"):
        am.resolve_layers("padim", ("layer5",))


def test_config_is_checked():
    assert am.resolve_config("patchcore", {"num_neighbors": 3})["num_neighbors"] == 3
    assert am.resolve_config("stfpm")["max_epochs"] == am.DEFAULTS["stfpm"]["max_epochs"]
    with pytest.raises(ValueError, match=r"stfpm config: unknown key 'epochs' \(allowed: .*max_epochs"):
        am.resolve_config("stfpm", {"epochs": 3})
    with pytest.raises(ValueError, match="patchcore config: unknown key 'max_epochs'"):
        am.resolve_config("patchcore", {"max_epochs": 3})  # memory banks take one pass
    with pytest.raises(ValueError, match=r"fastflow config: max_epochs=0: must be in \[1, inf\]"):
        am.resolve_config("fastflow", {"max_epochs": 0})
    with pytest.raises(ValueError, match="unknown method 'efficientad'"):
        am.resolve_config("efficientad")


def test_arch_support_by_name():
    resnet34 = load_backbone("random", arch="resnet34")
    with pytest.raises(ValueError, match="fastflow does not support arch=resnet34.*resnet18, wide_resnet50_2"):
        am.build_model("fastflow", resnet34, out_size=(SIZE, SIZE))
    resnext = load_backbone("random", arch="resnext101_64x4d")
    with pytest.raises(ValueError, match="rd does not support arch=resnext101_64x4d"):
        am.build_model("rd", resnext, out_size=(SIZE, SIZE))


def test_bad_device_is_refused_before_any_image_is_read(backbone, tmp_path):
    with pytest.raises(ValueError, match=r"device='tpu': must be one of auto, cpu, cuda, gpu or cuda:N"):
        am.run_anomalib("patchcore", backbone, Split(train=[], test=[]), device="tpu", work_dir=tmp_path)


def test_a_numbered_cuda_device_is_that_gpu_alone_for_lightning():
    # ad_eval.cell accepts and resolves device cuda:N; Lightning's accelerator takes no index, its devices do
    assert am._accelerator("cuda:1") == ("cuda", [1])
    assert am._accelerator("cpu") == ("cpu", 1) and am._accelerator("cuda") == ("cuda", 1)
    with pytest.raises(ValueError, match=r"device='cuda:x'"):
        am._accelerator("cuda:x")


def test_padim_n_features(backbone):
    assert padim_n_features(backbone, ("layer1", "layer2", "layer3")) == 100
    assert padim_n_features(backbone, ("layer1",)) == 64  # capped at the channels
    wide = load_backbone("random", arch="wide_resnet50_2")
    assert padim_n_features(wide, ("layer1", "layer2", "layer3")) == 550
    model = am.build_model("padim", backbone, layers=("layer1",), out_size=(SIZE, SIZE))
    assert model.model.n_features == 64


# ----------------------------------------------------------------------------- end to end


def _check_scores(scores, split):
    n = len(split.test)
    assert scores.image_scores.shape == (n,) and np.isfinite(scores.image_scores).all()
    np.testing.assert_array_equal(scores.image_labels, [s.label for s in split.test])
    assert scores.anomaly_maps.shape == (n, SIZE, SIZE) and scores.anomaly_maps.dtype == np.float32
    assert np.isfinite(scores.anomaly_maps).all()
    assert scores.masks.shape == (n, SIZE, SIZE) and scores.masks.dtype == bool
    expected = ADImageDataset(split.test, size=SIZE)
    for i in range(n):  # masks in split.test order, as ADImageDataset makes them
        np.testing.assert_array_equal(scores.masks[i], expected[i]["mask"][0].numpy())
    assert scores.masks[scores.image_labels == 1].any(axis=(1, 2)).all()
    assert not scores.masks[scores.image_labels == 0].any()
    values = metrics.compute_all(
        scores.image_scores, scores.image_labels, scores.anomaly_maps, scores.masks
    )
    assert all(0 <= v <= 1 for v in values.values())


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_memory_bank_cell(method, backbone, split, tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    first = _run(method, backbone, split, tmp_path / "a", layers=("layer2", "layer3"))
    _check_scores(first, split)
    assert not torch.are_deterministic_algorithms_enabled()  # Lightning's global flag restored
    again = _run(method, backbone, split, tmp_path / "b", layers=("layer2", "layer3"))
    np.testing.assert_array_equal(again.image_scores, first.image_scores)  # seeded
    np.testing.assert_array_equal(again.anomaly_maps, first.anomaly_maps)
    other = _run(method, backbone, split, tmp_path / "c", layers=("layer1", "layer2"))
    _check_scores(other, split)
    assert not np.allclose(other.image_scores, first.image_scores)  # the layers are used
    # our image and pixel AUROC agree with anomalib's metric on the same predictions, scaled to
    # [0, 1] first: torchmetrics (under anomalib's AUROC) treats scores outside [0, 1] as logits
    # and applies a float32 sigmoid, which saturates to 1.0 above ~17 and merges those scores.
    image_scores = _min_max(first.image_scores)
    auroc = AUROC(fields=["pred_score", "gt_label"])
    auroc.update(
        SimpleNamespace(
            pred_score=torch.from_numpy(image_scores), gt_label=torch.from_numpy(first.image_labels)
        )
    )
    ours = metrics.image_auroc(image_scores, first.image_labels)
    assert ours == metrics.image_auroc(first.image_scores, first.image_labels)
    assert float(auroc.compute()) == pytest.approx(ours, abs=1e-6)
    maps = _min_max(first.anomaly_maps)
    pixel = AUROC(fields=["anomaly_map", "gt_mask"])
    pixel.update(
        SimpleNamespace(anomaly_map=torch.from_numpy(maps), gt_mask=torch.from_numpy(first.masks))
    )
    assert float(pixel.compute()) == pytest.approx(metrics.pixel_auroc(maps, first.masks), abs=1e-6)


def _min_max(values: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1] (float32); order-preserving up to float32 ties."""
    values = values.astype(np.float64)
    return ((values - values.min()) / (values.max() - values.min())).astype(np.float32)


def test_padim_seed_changes_channel_subset(backbone, split, tmp_path):
    a = _run("padim", backbone, split, tmp_path / "a", seed=0)
    b = _run("padim", backbone, split, tmp_path / "b", seed=1)
    assert not np.allclose(a.image_scores, b.image_scores)


def test_input_is_normalised_once_with_backbone_stats(backbone, split, tmp_path, monkeypatch):
    """The extractor sees exactly ADImageDataset(size, crop, backbone mean/std) pixels."""
    odd = dataclasses.replace(backbone, mean=(0.3, 0.5, 0.7), std=(0.1, 0.2, 0.4))
    seen = []
    real_build = am.build_model

    def build_and_watch(*args, **kwargs):
        model = real_build(*args, **kwargs)
        extractor = model.model.feature_extractor.feature_extractor
        extractor.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
        return model

    monkeypatch.setattr(am, "build_model", build_and_watch)
    small = Split(train=split.train[:4], test=split.test)
    scores = am.run_anomalib(
        "padim", odd, small, size=72, crop=SIZE, config={"eval_batch_size": 4},
        device="cpu", work_dir=tmp_path,
    )  # fmt: skip
    assert scores.anomaly_maps.shape == (len(split.test), SIZE, SIZE)
    test_inputs = torch.cat(seen[-3:])  # predict batches come last: 4 + 4 + 2 test images
    expected = ADImageDataset(small.test, size=72, crop=SIZE, mean=odd.mean, std=odd.std)
    assert test_inputs.shape == (len(split.test), 3, SIZE, SIZE)
    for i in range(len(expected)):
        torch.testing.assert_close(test_inputs[i], expected[i]["image"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["stfpm", "fastflow", "rd", "cflow"])
def test_trained_cell(method, backbone, split, tmp_path, monkeypatch):
    """One epoch end to end; the frozen backbone is still exactly ours after training."""
    built = []
    real_build = am.build_model

    def build_and_keep(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(am, "build_model", build_and_keep)
    config = {"max_epochs": 1, "train_batch_size": 5}
    if method == "cflow":
        config["fiber_batch_size"] = 16  # layer4 is 2x2 at 64 px
    scores = _run(method, backbone, split, tmp_path, config=config)
    _check_scores(scores, split)
    (model,) = built
    _assert_extractors_hold(model, method, backbone)
    if method == "stfpm":  # the student was trained from its seeded random init
        torch.manual_seed(0)
        fresh = am.build_model("stfpm", backbone, out_size=(SIZE, SIZE))
        trained = model.model.student_model.feature_extractor.conv1.weight
        assert not torch.equal(trained, fresh.model.student_model.feature_extractor.conv1.weight)


def test_stfpm_more_epochs_change_scores(backbone, split, tmp_path):
    """Epochs come from config (fixed, not chosen on test): 1 vs 3 epochs give other scores."""
    one = _run("stfpm", backbone, split, tmp_path / "1", config={"max_epochs": 1})
    three = _run("stfpm", backbone, split, tmp_path / "3", config={"max_epochs": 3})
    _check_scores(three, split)
    assert not np.allclose(one.image_scores, three.image_scores)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["padim", "fastflow", "rd"])
def test_wide_resnet50_2_cell(method, split, tmp_path):
    """The papers' backbone, for the methods that treat it by name (PaDiM's n_features=550,
    FastFlow's backbone table, RD's decoder); the others only see more channels (4-7 s each on 2 cores)."""
    wide = load_backbone("random", arch="wide_resnet50_2", seed=1)
    config = {} if method == "padim" else {"max_epochs": 1, "train_batch_size": 5}
    scores = _run(method, wide, split, tmp_path, config=config)
    _check_scores(scores, split)


def test_predictions_out_of_order_are_an_error(backbone, split, tmp_path, monkeypatch):
    """The scores are matched to ``split.test`` by position: a reordered prediction must not pass silently."""
    from anomalib.engine import Engine

    real_predict = Engine.predict
    monkeypatch.setattr(Engine, "predict", lambda self, **kwargs: real_predict(self, **kwargs)[::-1])
    small = Split(train=split.train[:4], test=split.test)
    with pytest.raises(RuntimeError, match="patchcore: predictions came back out of order or incomplete"):
        _run("patchcore", backbone, small, tmp_path, config={"eval_batch_size": 4})


def test_train_batches_are_balanced():
    """No short last batch (17 at 16: 9 + 8, not 16 + 1); a count the batch size divides keeps the batches of a
    shuffled DataLoader with the same seed, so earlier records stay reproducible."""
    loader = am.train_loader_of([{"i": i} for i in range(17)], 16, seed=3)
    loader.collate_fn = list
    batches = [[item["i"] for item in batch] for batch in loader]
    assert [len(batch) for batch in batches] == [9, 8]
    assert sorted(i for batch in batches for i in batch) == list(range(17))
    items = [{"i": i} for i in range(32)]
    balanced = am.train_loader_of(items, 16, seed=3)
    plain = torch.utils.data.DataLoader(items, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    balanced.collate_fn = list
    assert [[x["i"] for x in b] for b in balanced] == [b["i"].tolist() for b in plain]


def test_cflow_runs_with_a_batch_size_that_leaves_one_image_over(backbone, texture_dataset, tmp_path):
    """6 train images at train_batch_size 5 were 5 + 1, and 1 image's layer4 (2x2 at 64 px) is too few vectors
    for a flow step of 12: anomalib's "Make sure we have enough fibers" mid-fit. Balanced: 3 + 3."""
    split = scan("mvtec", texture_dataset, "texture")
    assert len(split.train) == 6
    config = {"max_epochs": 1, "train_batch_size": 5, "fiber_batch_size": 12, "coupling_blocks": 1}
    _check_scores(_run("cflow", backbone, split, tmp_path, config=config), split)


def test_cflow_too_small_batches_are_one_line_before_fitting(texture_dataset):
    """Full-data cells are checked too: 6 images are enough for one flow step of 16 (4 images: layer4 is 2x2 at
    64 px), but not in batches of at most 5 (balanced: 3 + 3)."""
    from ad_eval.cell import Cell, preflight

    cell = Cell(method="cflow", dataset="mvtec", root=str(texture_dataset), category="texture", backbone="random",
                arch="resnet18", size=64, config={"train_batch_size": 5, "fiber_batch_size": 16})
    with pytest.raises(ConfigError, match=r"cflow cannot run with 6 train image\(s\) at train_batch_size=5: its "
                                          r"smallest training batch has 3 images, every batch needs at least 4 "):
        preflight(cell)
