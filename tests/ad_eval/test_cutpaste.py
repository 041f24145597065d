"""Tests of ad_eval.methods.cutpaste: augmentations, 3-way batches, schedule, training, density.

The Gaussian density is checked against the Ledoit-Wolf formula written out here from the paper
(Ledoit & Wolf 2004, one sample at a time) and a per-sample Mahalanobis loop; the learning-rate
schedule against torch's ``CosineAnnealingWarmRestarts`` driven as the reference drives it.
End-to-end runs use the real MVTec AD hazelnut samples under ``../shared/realdata`` (skipped if
absent) with a random ResNet-18 at 64 px and a few steps.

Run: ``python -m pytest -q tests/ad_eval/test_cutpaste.py``
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ad_helpers import random_resnet18
from scipy import ndimage
from torch import nn

from ad_eval.datasets import IMAGENET_MEAN, IMAGENET_STD, Split, scan
from ad_eval.methods.cutpaste import (
    DEFAULTS,
    CutPasteNet,
    GaussianDensity,
    cutpaste_normal,
    cutpaste_scar,
    index_stream,
    make_batch,
    reference_lr,
    run_cutpaste,
    scar_scale,
    train_cutpaste,
)

CATEGORY = "hazelnut_reduced"
SIZE = 64  # px: fast on 2 CPU cores
TINY = {"steps": 3, "batch_size": 4, "freeze_steps": 1, "eval_batch_size": 32}






@pytest.fixture(scope="module")
def split(realdata):
    return scan("mvtec", realdata, CATEGORY)


def noise_image(seed: int, size: int = 256) -> torch.Tensor:
    """(3, size, size) uniform noise in [0, 1]: any moved pixel differs from what it covers."""
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- augmentations


@pytest.mark.parametrize("seed", range(6))
def test_cutpaste_changes_only_a_rectangle_of_the_reference_size(seed):
    image = noise_image(seed)
    out, mask = cutpaste_normal(image, torch.Generator().manual_seed(seed))
    changed = (out != image).any(dim=0)
    assert not changed[~mask].any(), "pixels outside the pasted box changed"
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    rows, cols = np.nonzero(mask.numpy())
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask.sum() == h * w, "the pasted region is not a rectangle"
    assert changed[mask].float().mean() > 0.9  # noise moved elsewhere differs almost everywhere
    assert 0.02 * 256**2 * 0.95 <= h * w <= 0.15 * 256**2 * 1.05
    assert 0.3 * 0.9 <= w / h <= (1 / 0.3) * 1.1
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("seed", range(6))
def test_scar_is_thin_and_changes_only_its_footprint(seed):
    image = noise_image(100 + seed)
    out, mask = cutpaste_scar(image, torch.Generator().manual_seed(seed))
    changed = (out != image).any(dim=0)
    assert not changed[~mask].any(), "pixels outside the pasted scar changed"
    assert changed[mask].float().mean() > 0.8
    area = int(mask.sum())
    assert 2 * 10 * 0.5 <= area <= 17 * 26  # width 2-16, height 10-25 px, rounding
    assert area < 0.02 * 256**2  # far below the smallest CutPaste rectangle
    # thin: no pixel of the scar is more than half the maximal width (8 px) from its border
    assert ndimage.distance_transform_edt(np.pad(mask.numpy(), 1)).max() <= 8 + 1.5
    assert ndimage.label(mask.numpy(), structure=np.ones((3, 3)))[1] == 1  # one piece


def test_scar_is_rotated_like_pil():
    """A +90 degree rotation turns a tall, narrow cut into a wide, flat one (counter-clockwise)."""
    image = noise_image(7)
    _, mask = cutpaste_scar(
        image, torch.Generator().manual_seed(0), width=(3, 3), height=(20, 20), rotation=(90, 90)
    )
    rows, cols = np.nonzero(mask.numpy())
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (3, 20)


def test_scar_scales_with_the_image_size():
    assert scar_scale(256) == 1 and scar_scale(64) == 0.25 and scar_scale((128, 512)) == 0.5


def test_three_way_batch_is_balanced_and_ordered():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(5, 3, 48, 48, generator=g) * 255).to(torch.uint8)
    cfg = {**DEFAULTS, "image_jitter": 0.0}
    x, y = make_batch(
        images, [4, 0, 2], g, config=cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=48 / 256
    )
    assert x.shape == (9, 3, 48, 48)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.bincount(y).tolist() == [3, 3, 3]
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    originals = (images[[4, 0, 2]].float() / 255 - mean) / std
    torch.testing.assert_close(x[:3], originals)  # no image jitter: normalised originals
    for i in range(3):  # each augmented view differs from its original, but only partly
        for view in (x[3 + i], x[6 + i]):
            changed = (view != x[i]).any(dim=0).float().mean()
            assert 0 < changed < 0.5


def test_index_stream_is_back_to_back_permutations():
    stream = index_stream(4, torch.Generator().manual_seed(0))
    first = [next(stream) for _ in range(12)]
    for start in range(0, 12, 4):
        assert sorted(first[start : start + 4]) == [0, 1, 2, 3]


# ---------------------------------------------------------------- model and schedule


def test_head_is_the_reference_projection_net():
    net = CutPasteNet(
        nn.Identity(),
        512,
        head_layers=1,
        head_width=512,
        head_out=128,
        generator=torch.Generator().manual_seed(0),
    )
    kinds = [type(m).__name__ for m in net.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2
    assert [(m.in_features, m.out_features) for m in net.head if isinstance(m, nn.Linear)] == [
        (512, 512),
        (512, 128),
    ]
    assert (net.out.in_features, net.out.out_features) == (128, 3)
    again = CutPasteNet(
        nn.Identity(),
        512,
        head_layers=1,
        head_width=512,
        head_out=128,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_lr_schedule_matches_the_reference_scheduler_calls():
    steps, base = 10, 0.03
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, steps)
    used = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):  # run_training.py: optimizer.step(), then scheduler.step(epoch)
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step(step)
    np.testing.assert_allclose(
        [reference_lr(s, steps, base) for s in range(steps)], used, rtol=1e-12
    )


def test_frozen_backbone_steps_keep_weights_but_move_batchnorm_statistics():
    images = (torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(
        torch.uint8
    )
    cfg = {**DEFAULTS, "steps": 2, "batch_size": 3, "freeze_steps": 2}
    model = random_resnet18(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = train_cutpaste(
        model, images, config=cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=0.125
    )
    after = net.backbone.state_dict()
    assert all(torch.equal(before[n], after[n]) for n, _ in model.named_parameters())
    assert not torch.equal(
        before["bn1.running_mean"], after["bn1.running_mean"]
    )  # train mode, as the reference
    assert not net.training

    model = random_resnet18(2)
    net = train_cutpaste(
        model, images, config={**cfg, "freeze_steps": 0}, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    assert not torch.equal(
        before["layer1.0.conv1.weight"], net.backbone.state_dict()["layer1.0.conv1.weight"]
    )


def test_adam_steps_by_its_constant_lr_and_progress_is_logged(caplog):
    """optimizer="adam": no cosine; Adam's first update moves each bias of the classifier by exactly lr (its
    gradient normalised by itself). Progress is logged at step 0, every 32nd step and the last."""
    images = (torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    cfg = {**DEFAULTS, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "steps": 1, "batch_size": 2,
           "freeze_steps": 1}
    model = random_resnet18(2)
    init = CutPasteNet(nn.Identity(), 512, head_layers=cfg["head_layers"], head_width=cfg["head_width"],
                       head_out=cfg["head_out"], generator=torch.Generator().manual_seed(0))  # train_cutpaste's seed 0
    net = train_cutpaste(model, images, config=cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=0.125)
    step = (net.out.bias - init.out.bias).abs()
    torch.testing.assert_close(step, torch.full_like(step, cfg["lr"]), rtol=1e-4, atol=0)
    with caplog.at_level("INFO", logger="ad_eval.methods.cutpaste"):
        train_cutpaste(random_resnet18(2), images, config={**cfg, "steps": 3}, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    logged = [r.getMessage() for r in caplog.records if r.name == "ad_eval.methods.cutpaste"]
    assert [m.split(":")[0] for m in logged] == ["CutPaste step 0", "CutPaste step 2"]
    assert all(", accuracy " in m and ": loss " in m for m in logged)


# ---------------------------------------------------------------- density


def ledoit_wolf_by_the_formula(x: np.ndarray) -> np.ndarray:
    """Ledoit & Wolf (2004), Lemma 3.2 / Theorem 3.2 with the normalised Frobenius norm ||A||^2 / p.

    S = sample covariance (1/n), m = tr(S)/p, d2 = ||S - m I||^2, b2 = min(d2, mean_k
    ||x_k x_k^T - S||^2 / n), covariance = b2/d2 m I + (1 - b2/d2) S.
    """
    n, p = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n

    def norm2(a):
        return (a**2).sum() / p

    m = np.trace(s) / p
    d2 = norm2(s - m * np.eye(p))
    b2 = min(d2, sum(norm2(np.outer(v, v) - s) for v in xc) / n**2)
    return b2 / d2 * m * np.eye(p) + (1 - b2 / d2) * s


def test_density_is_ledoit_wolf_mahalanobis_on_normalised_embeddings():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 12)) @ rng.normal(size=(12, 12)) + 3
    test = rng.normal(size=(6, 12)) * 2 + 3
    density = GaussianDensity.fit(train)
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    covariance = ledoit_wolf_by_the_formula(unit)
    np.testing.assert_allclose(density.mean, unit.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.inv(density.precision), covariance, rtol=1e-8, atol=1e-12)
    precision = np.linalg.inv(covariance)
    expected = []
    for row in test:
        diff = row / np.sqrt((row**2).sum()) - unit.mean(axis=0)
        expected.append(np.sqrt(diff @ precision @ diff))
    np.testing.assert_allclose(density.score(test), expected, rtol=1e-7)
    # L2 normalisation: scaling embeddings does not change anything
    np.testing.assert_allclose(density.score(test * 5.0), density.score(test), rtol=1e-10)
    np.testing.assert_allclose(
        GaussianDensity.fit(train * 0.1).score(test), density.score(test), rtol=1e-8
    )


# ---------------------------------------------------------------- run_cutpaste on real data


def test_unknown_config_key_names_the_allowed_ones():
    model = (random_resnet18(), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"unknown key 'epochs'.*allowed: .*steps"):
        run_cutpaste(model, Split(train=[], test=[]), config={"epochs": 3})


def test_run_cutpaste_end_to_end(split):
    model = random_resnet18()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    backbone = (model, IMAGENET_MEAN, IMAGENET_STD)
    first = run_cutpaste(backbone, split, size=SIZE, config=TINY, seed=0)
    labels = np.array([s.label for s in split.test])
    assert first.image_scores.shape == (len(split.test),)
    np.testing.assert_array_equal(first.image_labels, labels)
    assert np.all(np.isfinite(first.image_scores)) and np.all(first.image_scores > 0)
    assert first.anomaly_maps is None and first.masks is None
    same = run_cutpaste(backbone, split, size=SIZE, config=TINY, seed=0)
    np.testing.assert_array_equal(same.image_scores, first.image_scores)
    other = run_cutpaste(backbone, split, size=SIZE, config=TINY, seed=1)
    assert not np.allclose(other.image_scores, first.image_scores, rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items()), (
        "the caller's backbone was modified"
    )
    assert not model.training and all(p.requires_grad for p in model.parameters())
