"""``AugmentConfig``: the training-time augmentation block (``data.augment``), validated.

Defaults are OFDB-4AD's published settings (``main.py`` @ 6af9ec0, torchvision 0.18 defaults; see
strong_recipes.md §1.3) so ``enabled: true`` alone reproduces that recipe. ``enabled`` defaults to
False: an absent or empty block means no augmentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fractal_pretrain.config import ConfigError, check_choice, check_pair, check_range, replace_checked
from fractal_pretrain.render.base import IMAGENET_MEAN, IMAGENET_STD

AUTOAUGMENT_POLICIES = ("imagenet", "none")


@dataclass(frozen=True)
class AugmentConfig:
    """Batched on-device augmentation, in the order torchvision applies OFDB-4AD's transforms."""

    enabled: bool = False  # master switch; False: images are only normalised, targets one-hot
    # --- 1. RandomResizedCrop (bilinear, antialiased) ---
    crop: bool = True  # False: the whole image is resized to `size` (no random crop)
    size: int = 224  # output side in pixels
    crop_scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect w/h, drawn log-uniformly
    # --- 2. horizontal flip ---
    hflip_p: float = 0.5
    # --- 3. AutoAugment (torchvision's 25 ImageNet sub-policies, nearest, fill 0) ---
    autoaugment: str = "imagenet"  # "imagenet" | "none"
    # --- 4. normalisation of [0, 1] pixels ---
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # --- 5. RandomErasing on the normalised image ---
    erase_p: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.33)  # erased area as a fraction of the image area
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # erased box aspect h/w, drawn log-uniformly
    erase_value: float = 0.0  # value written into the normalised image
    # --- 6. batch mixing (one draw per step and rank) ---
    mix_p: float = 0.8  # probability that a batch is mixed at all
    cutmix_p: float = 0.5  # given a mix: CutMix with this probability, else MixUp
    mix_alpha: float = 1.0  # lambda ~ Beta(alpha, alpha) for both; 1.0 is U(0, 1)

    def __post_init__(self):
        check_choice("enabled", self.enabled, (True, False))
        check_choice("crop", self.crop, (True, False))
        check_range("size", self.size, 8, 4096, integer=True)
        check_pair("crop_scale", self.crop_scale, 0.0, 1.0)
        if self.crop_scale[1] <= 0:
            raise ConfigError(f"crop_scale={list(self.crop_scale)!r}: the upper bound must be positive")
        check_pair("crop_ratio", self.crop_ratio, 1e-3, 1e3)
        check_range("hflip_p", self.hflip_p, 0.0, 1.0)
        check_choice("autoaugment", self.autoaugment, AUTOAUGMENT_POLICIES)
        _check_triple("mean", self.mean, 0.0, 1.0)
        _check_triple("std", self.std, 1e-6, None)
        check_range("erase_p", self.erase_p, 0.0, 1.0)
        check_pair("erase_scale", self.erase_scale, 0.0, 1.0)
        check_pair("erase_ratio", self.erase_ratio, 1e-3, 1e3)
        check_range("erase_value", self.erase_value, -1e3, 1e3)
        check_range("mix_p", self.mix_p, 0.0, 1.0)
        check_range("cutmix_p", self.cutmix_p, 0.0, 1.0)
        check_range("mix_alpha", self.mix_alpha, 1e-3, 1e3)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> AugmentConfig:
        """Build from a YAML mapping; unknown keys and bad values raise a one-line ConfigError."""
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"augment={values!r}: must be a mapping of augmentation keys")
        return replace_checked(cls(), values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def mixing(self) -> bool:
        return self.enabled and self.mix_p > 0


def _check_triple(name: str, values, low, high) -> None:
    if not isinstance(values, (tuple, list)) or len(values) not in (1, 3):
        raise ConfigError(f"{name}={values!r}: must be 1 or 3 numbers (one per channel)")
    for value in values:
        check_range(name, value, low, high)
