"""Synthetic anomalies: exact masks, determinism by key, every kind, bad mixes."""

import numpy as np
import pytest
import torch

from fractal_pretrain.adapt.anomalies import KINDS, AnomalyMix, AnomalySynthesizer, sample_words
from fractal_pretrain.config import ConfigError
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import make_renderer


@pytest.fixture(scope="module")
def normal_images():
    renderer = make_renderer(get_recipe("anderson", {"num_classes": 4, "num_points": 4000}), size=64)
    images, _ = renderer.render_tensor(np.arange(6), 0)
    return images


def only(kind: str, **extra) -> AnomalyMix:
    weights = {k: (1.0 if k == kind else 0.0) for k in KINDS}
    return AnomalyMix(anomaly_p=1.0, mask_systems=16, mask_points=3000, **weights, **extra)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_is_exactly_the_changed_pixels(normal_images, kind):
    out, masks = AnomalySynthesizer(only(kind), seed=3).apply(normal_images, np.arange(6), epoch=1)
    assert out.dtype == torch.uint8 and masks.shape == (6, 64, 64)
    assert torch.equal(masks, (out != normal_images).any(dim=1))
    assert (masks.flatten(1).sum(1) > 0).sum() >= 4  # a defect actually changes pixels in most images


def test_defects_are_local(normal_images):
    _, masks = AnomalySynthesizer(only("fractal_paste"), seed=0).apply(normal_images, np.arange(6))
    assert 0 < masks.float().mean() < 0.3  # a patch of side <= 0.5 of the image, fractal-masked


def test_pure_function_of_the_key(normal_images):
    synth = AnomalySynthesizer(AnomalyMix(anomaly_p=1.0, mask_systems=16), seed=5)
    a = synth.apply(normal_images, np.arange(10, 16), epoch=2)
    b = AnomalySynthesizer(AnomalyMix(anomaly_p=1.0, mask_systems=16), seed=5).apply(
        normal_images, np.arange(10, 16), epoch=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = synth.apply(normal_images, np.arange(10, 16), epoch=3)
    assert not torch.equal(a[1], c[1])


def test_no_anomaly_leaves_images_unchanged(normal_images):
    out, masks = AnomalySynthesizer(AnomalyMix(anomaly_p=0.0, mask_systems=16)).apply(normal_images, np.arange(6))
    assert torch.equal(out, normal_images) and not masks.any()


def test_mix_weights_must_sum_to_something_positive():
    with pytest.raises(ConfigError, match="must sum to something positive"):
        AnomalyMix(**{k: 0.0 for k in KINDS})
    with pytest.raises(ConfigError, match="scar=-1"):
        AnomalyMix(scar=-1.0)


def test_views_are_batched_per_sample_and_keyed(normal_images):
    """The batched view of an image is the view of that image alone (no leak across the batch), and keyed
    (view and epoch)."""
    from fractal_pretrain.adapt.views import photometric_view

    indices = np.arange(20, 26)
    batch = photometric_view(normal_images, indices, seed=7, view=1, epoch=0)
    alone = torch.cat([photometric_view(normal_images[i:i + 1], indices[i:i + 1], seed=7, view=1, epoch=0)
                       for i in range(6)])
    assert batch.shape == normal_images.shape and 0 <= batch.min() and batch.max() <= 1
    assert torch.allclose(batch, alone, atol=1e-6)
    assert not torch.allclose(batch, photometric_view(normal_images, indices, seed=7, view=0, epoch=0))
    assert not torch.allclose(batch, photometric_view(normal_images, indices, seed=7, view=1, epoch=1))


def test_default_mix_has_fractalads_constants():
    # strong_recipes.md §5 (FractalAD fag.py): patch side U(0.1, 0.5) min(H, W), rotation U(15, 75) degrees,
    # a 100k-point binary N = 2 IFS mask dilated 3x3 three times, Gaussian noise of amplitude 10 with p 0.5
    mix = AnomalyMix()
    assert mix.patch_side == (0.1, 0.5) and mix.rotation == (15.0, 75.0) and mix.dilation == 3
    assert mix.mask_points == 100_000 and mix.noise_p == 0.5 and mix.noise_amplitude == 10.0
    from fractal_pretrain.adapt.anomalies import mask_recipe

    recipe = mask_recipe(mix)
    assert (recipe.min_maps, recipe.max_maps, recipe.render_mode, recipe.num_points) == (2, 2, "binary", 100_000)


def test_scars_have_cutpaste_sizes_and_come_from_the_same_image():
    # CutPasteScar (ad_methods.md §2.1): U(2, 16) x U(10, 25) pixels at 256 px, rotated U(-45, 45) degrees,
    # cut from the image itself; at 64 px the sides scale by 1/4.
    images = make_renderer(get_recipe("anderson", {"num_classes": 4, "num_points": 4000}), size=256).render_tensor(
        np.arange(12), 0)[0]
    synth = AnomalySynthesizer(only("scar"), seed=3)
    plan = synth.plan(sample_words(3, 0, np.arange(12)), 256, 256, 12)
    assert np.array_equal(plan["source"], plan["chosen"])
    assert ((plan["scar_w"] >= 2) & (plan["scar_w"] <= 16) & (plan["scar_h"] >= 10) & (plan["scar_h"] <= 25)).all()
    degrees = np.degrees(np.arctan2(plan["sin"], plan["cos"]))
    assert ((degrees >= -45) & (degrees <= 45)).all() and degrees.min() < 0 < degrees.max()
    out, masks = synth.apply(images, np.arange(12))
    for i in range(12):
        ys, xs = np.nonzero(masks[i].numpy())
        assert 0 < len(ys) <= 16 * 25
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= np.hypot(16, 25) + 1
