"""Each batched augmentation op against torchvision.transforms.v2.functional on single images.

Run: PYTHONPATH=$PWD .venv/bin/python -m pytest tests/fractal_pretrain/test_augment_ops.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import AutoAugment, AutoAugmentPolicy
from torchvision.transforms.v2 import functional as TF

from fractal_pretrain.augment import ops
from fractal_pretrain.augment.policy import IMAGENET_POLICY, SIGNED_OPS, magnitude


def _images(n=6, height=40, width=56, seed=0) -> torch.Tensor:
    """Noise (every value occurs), a smooth ramp, a half-black image and a flat one."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    images[1] = ((yy * 3 + xx * 2) % 256).to(torch.uint8).expand(3, -1, -1)
    images[2, :, : height // 2] = 0
    images[3] = 77  # constant: AutoContrast and Equalize leave it alone
    return images


def _assert_same(batched: torch.Tensor, reference: list[torch.Tensor]) -> None:
    for k, ref in enumerate(reference):
        assert batched[k].dtype == ref.dtype
        diff = (batched[k].int() - ref.int()).abs()
        assert int(diff.max()) == 0, f"sample {k}: {int((diff > 0).sum())} pixels differ"


def tv_apply(image: torch.Tensor, name: str, mag: float) -> torch.Tensor:
    """torchvision's AutoAugment ``_apply_op`` written with the v2 functional kernels."""
    if name in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(mag)), 0.0] if name == "ShearX" else [0.0, math.degrees(math.atan(mag))]
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])
    calls = {
        "Rotate": lambda: TF.rotate(image, mag),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + mag),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + mag),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + mag),
        "Posterize": lambda: TF.posterize(image, int(mag)),
        "Solarize": lambda: TF.solarize(image, mag),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
        "Invert": lambda: TF.invert(image),
    }
    return calls[name]()


FACTORS = np.array([0.1, -0.3, 0.5, 0.9, -0.9, 0.0])
CASES = {
    "Color": FACTORS,
    "Contrast": FACTORS,
    "Sharpness": FACTORS,
    "Posterize": np.array([4, 5, 6, 7, 8, 4]),
    "Solarize": np.array([255.0, 141.66666, 113.33333, 0.0, 28.333334, 85.0], dtype=np.float32),
    "Rotate": np.array([30.0, -30.0, 26.666666, -10.0, 10.0, -26.666666], dtype=np.float32),
    "ShearX": np.array([0.16666667, -0.16666667, 0.3, -0.3, 0.1, 0.0]),
    "ShearY": np.array([0.16666667, -0.16666667, 0.3, -0.3, 0.1, 0.0]),
    "AutoContrast": np.zeros(6),
    "Equalize": np.zeros(6),
    "Invert": np.zeros(6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_autoaugment_op_equals_torchvision(name):
    images, mags = _images(), CASES[name]
    batched = ops.apply_op(name, images, mags)
    _assert_same(batched, [tv_apply(images[k], name, float(m)) for k, m in enumerate(mags)])


def test_grey_images_pass_colour_ops_like_torchvision():
    images = _images()[:, :1]
    for name in ("Color", "Contrast", "Sharpness", "Equalize"):
        batched = ops.apply_op(name, images, FACTORS)
        _assert_same(batched, [tv_apply(images[k], name, float(m)) for k, m in enumerate(FACTORS)])


def test_policy_table_and_magnitudes_are_torchvisions():
    reference = AutoAugment(AutoAugmentPolicy.IMAGENET)
    assert [tuple(sub) for sub in reference.policies] == list(IMAGENET_POLICY)
    space = reference._augmentation_space(10, (224, 200))
    for sub in IMAGENET_POLICY:
        for name, _, bin_ in sub:
            table, signed = space[name]
            expected = float(table[bin_].item()) if bin_ is not None else 0.0
            assert magnitude(name, bin_, 224, 200) == expected
            assert (name in SIGNED_OPS) == signed


CROPS = np.array([[0, 0, 40, 56], [5, 7, 20, 30], [1, 2, 39, 10], [10, 20, 30, 36], [0, 0, 3, 4], [2, 3, 35, 50]])
FLIPS = np.array([0, 1, 0, 1, 0, 1], dtype=bool)


def _tv_crop(image: torch.Tensor, k: int, size: int) -> torch.Tensor:
    out = TF.resized_crop(image, *[int(v) for v in CROPS[k]], [size, size], antialias=True)
    return TF.horizontal_flip(out) if FLIPS[k] else out


@pytest.mark.parametrize("size", [24, 64])  # shrinking and enlarging crops
def test_resized_crop_matches_float_antialiased_resize(size):
    images = _images().float()
    batched = ops.resized_crop(images, CROPS, size, FLIPS)
    for k in range(len(images)):
        torch.testing.assert_close(batched[k], _tv_crop(images[k], k, size), atol=1e-3, rtol=0)


def test_resized_crop_uint8_within_one_level_of_torchvision():
    """uint8: equal to torchvision's float path rounded (its CUDA path); CPU fixed point differs by <= 1."""
    images = _images()
    batched = ops.quantise(ops.resized_crop(images, CROPS, 24, FLIPS))
    for k in range(len(images)):
        float_path = _tv_crop(images[k].float(), k, 24).round().to(torch.uint8)
        assert (batched[k].int() - float_path.int()).abs().max() <= 1
        assert (batched[k] != float_path).float().mean() < 0.01
        cpu_uint8 = _tv_crop(images[k], k, 24)
        assert (batched[k].int() - cpu_uint8.int()).abs().max() <= 1


def test_normalise_and_erase_equal_torchvision():
    images = _images()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    boxes = np.array([[0, 0, 0, 0], [3, 4, 10, 20], [0, 0, 40, 56], [39, 55, 1, 1], [5, 0, 7, 56], [0, 0, 0, 0]])
    out = ops.erase(ops.normalise(images, mean, std), boxes, 0.0)
    for k in range(len(images)):
        ref = TF.normalize(TF.to_dtype(images[k], torch.float32, scale=True), mean, std)
        if boxes[k, 2]:
            ref = TF.erase(ref, *[int(v) for v in boxes[k]], v=torch.tensor(0.0))
        assert torch.equal(out[k], ref), k
