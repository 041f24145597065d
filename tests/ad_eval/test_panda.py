"""Tests of ad_eval.methods.panda: kNN score, pooled features, compactness fine-tuning, run_panda.

The kNN score is checked against a brute-force loop over all train features; run_panda runs on
the real MVTec AD hazelnut samples under ``../shared/realdata`` (skipped if absent) with a
randomly initialised ResNet-18 at 64 px.

Run: ``python -m pytest -q tests/ad_eval/test_panda.py``
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ad_helpers import random_resnet18
from torch import nn

from ad_eval.datasets import IMAGENET_MEAN, IMAGENET_STD, Sample, Split, scan
from ad_eval.methods.panda import (
    DEFAULTS,
    as_config,
    compactness_loss,
    finetune_compactness,
    knn_scores,
    pooled_features,
    resolve_backbone,
    run_panda,
)

CATEGORY = "hazelnut_reduced"
SIZE = 64  # px: fast on 2 CPU cores






@pytest.fixture(scope="module")
def backbone():
    return random_resnet18(), IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def split(realdata):
    return scan("mvtec", realdata, CATEGORY)


def brute_force_knn(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """Sum of the k smallest squared Euclidean distances, one pair at a time."""
    scores = []
    for x in test:
        squared = sorted(float(((x - t) ** 2).sum()) for t in train)
        scores.append(sum(squared[:k]))
    return np.array(scores)


# ---------------------------------------------------------------- kNN score


@pytest.mark.parametrize("k", [1, 2, 5])
def test_knn_scores_match_brute_force(k):
    rng = np.random.default_rng(k)
    train, test = rng.normal(size=(40, 9)), rng.normal(size=(7, 9)) * 2
    np.testing.assert_allclose(
        knn_scores(train, test, k=k), brute_force_knn(train, test, k), rtol=1e-12
    )


def test_knn_score_of_a_train_feature():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 16))
    test = train[[3, 17]]
    assert np.all(knn_scores(train, test, k=1) == 0)  # exact: float64 differences, no expansion
    # k=2: zero for itself plus the squared distance to its nearest other train feature
    others = [np.delete(train, i, axis=0) for i in (3, 17)]
    expected = [brute_force_knn(o, t[None], 1)[0] for o, t in zip(others, test, strict=True)]
    np.testing.assert_allclose(knn_scores(train, test, k=2), expected, rtol=1e-12)


def test_knn_scores_default_k_is_the_reference_two():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(10, 4)), rng.normal(size=(3, 4))
    assert DEFAULTS["k"] == 2
    np.testing.assert_allclose(knn_scores(train, test), brute_force_knn(train, test, 2), rtol=1e-12)


def test_knn_scores_rejects_bad_k_and_shapes():
    train = np.zeros((3, 4))
    with pytest.raises(ValueError, match="k=4"):
        knn_scores(train, np.zeros((1, 4)), k=4)
    with pytest.raises(ValueError, match="k=0"):
        knn_scores(train, np.zeros((1, 4)), k=0)
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        knn_scores(train, np.zeros((1, 5)))


# ---------------------------------------------------------------- features, config, backbone


def test_default_feature_is_the_avgpool_output(backbone):
    model = backbone[0]
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(model, x, ("layer4",)), model(x))
        both = pooled_features(model, x, ("layer2", "layer4"))
        layer2 = pooled_features(model, x, ("layer2",))
    assert both.shape == (2, 128 + 512)
    torch.testing.assert_close(both[:, :128], layer2)


def test_unknown_config_key_names_the_allowed_ones(backbone):
    with pytest.raises(
        ValueError, match=r"unknown key 'neighbours'.*allowed: .*finetune_epochs.*k"
    ):
        as_config({"neighbours": 3})
    split = Split(train=[], test=[])
    with pytest.raises(ValueError, match="unknown key 'epochs'"):
        run_panda(backbone, split, config={"epochs": 1})


def test_resolve_backbone_forms(backbone):
    model = backbone[0]

    class Duck:  # ad_eval.backbones.Backbone's interface
        mean, std = IMAGENET_MEAN, IMAGENET_STD

        def build(self):
            return model

    assert resolve_backbone(Duck())[0] is model
    assert resolve_backbone(backbone)[1:] == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(TypeError, match="bare nn.Module"):
        resolve_backbone(model)
    with pytest.raises(TypeError, match="not a torchvision-style ResNet"):
        resolve_backbone((nn.Linear(2, 2), IMAGENET_MEAN, IMAGENET_STD))


# ---------------------------------------------------------------- fine-tuning


def test_compactness_loss_is_the_reference_formula():
    features = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    center = torch.tensor([1.0, 0.0, 0.0])
    # ||(0,2,2)||^2 = 8, ||(-1,0,3)||^2 = 10; / D = 3; batch mean
    assert compactness_loss(features, center).item() == pytest.approx((8 / 3 + 10 / 3) / 2)


def test_finetune_trains_layer3_and_layer4_only_and_keeps_batchnorm_statistics():
    model = random_resnet18(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    train_set = [{"image": torch.randn(3, 32, 32, generator=g)} for _ in range(8)]
    cfg = {**DEFAULTS, "finetune_epochs": 3, "lr": 0.05, "grad_clip_norm": 10.0}
    losses = finetune_compactness(
        model, train_set, ("layer4",), config=cfg, batch_size=4, device="cpu", seed=0
    )
    assert len(losses) == 3 and losses[-1] < losses[0]
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        trainable = (
            key.startswith(("layer3.", "layer4."))
            and "running_" not in key
            and "num_batches" not in key
        )
        if key.endswith(("conv1.weight", "conv2.weight")) and trainable:
            assert changed, f"{key} should have been fine-tuned"
        if not trainable:
            assert not changed, f"{key} changed: frozen weights or BatchNorm statistics"
    assert not model.training


# ---------------------------------------------------------------- run_panda on real data


def test_run_panda_on_hazelnut(backbone, split):
    state = {k: v.clone() for k, v in backbone[0].state_dict().items()}
    result = run_panda(backbone, split, size=SIZE, batch_size=16)
    labels = np.array([s.label for s in split.test])
    assert result.image_scores.shape == (len(split.test),)
    np.testing.assert_array_equal(result.image_labels, labels)
    assert labels.min() == 0 and labels.max() == 1
    assert np.all(np.isfinite(result.image_scores)) and np.all(result.image_scores > 0)
    assert result.anomaly_maps is None and result.masks is None
    again = run_panda(backbone, split, size=SIZE, batch_size=7)  # other batching, same scores
    np.testing.assert_allclose(again.image_scores, result.image_scores, rtol=1e-5)
    other_layer = run_panda(backbone, split, layers=(2,), size=SIZE, batch_size=16)
    assert not np.allclose(other_layer.image_scores, result.image_scores, rtol=1e-3)
    assert all(torch.equal(v, backbone[0].state_dict()[k]) for k, v in state.items())


def test_train_image_in_the_test_set_scores_zero_with_k1(backbone, split):
    good = split.train[0]
    test = [Sample(good.path, 0, "good"), *split.test]
    result = run_panda(
        backbone, Split(train=split.train, test=test), size=SIZE, config={"k": 1}, batch_size=16
    )
    assert result.image_scores[0] <= 1e-6 * np.median(result.image_scores[1:])
    assert result.image_scores[1:].min() > 0


def test_run_panda_finetuning_is_deterministic_and_leaves_the_backbone(backbone, split):
    small = Split(train=split.train[:12], test=split.test)
    state = {k: v.clone() for k, v in backbone[0].state_dict().items()}
    cfg = {"finetune_epochs": 1, "lr": 0.05, "grad_clip_norm": 10.0}
    first = run_panda(backbone, small, size=SIZE, config=cfg, batch_size=6, seed=3)
    second = run_panda(backbone, small, size=SIZE, config=cfg, batch_size=6, seed=3)
    frozen = run_panda(backbone, small, size=SIZE, batch_size=6)
    np.testing.assert_array_equal(first.image_scores, second.image_scores)
    assert np.all(np.isfinite(first.image_scores))
    assert not np.allclose(first.image_scores, frozen.image_scores, rtol=1e-4)
    assert all(torch.equal(v, backbone[0].state_dict()[k]) for k, v in state.items())
    assert not backbone[0].training
