"""torchvision's AutoAugment ImageNet policy as data: 25 sub-policies, magnitudes, signs.

Copied from ``torchvision/transforms/autoaugment.py`` (``AutoAugment._get_policies`` and
``_augmentation_space`` with 10 bins), which OFDB-4AD used unchanged. Each sub-policy is two
``(op, probability, magnitude bin)`` steps; an op fires when ``U(0, 1) <= probability``, and a
signed op's magnitude is negated with probability 1/2.
"""

from __future__ import annotations

import torch

IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)

NUM_BINS = 10
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                        "Contrast", "Sharpness"})


def _linspace32(low: float, high: float) -> torch.Tensor:
    # torch.linspace in float32 (on the host), exactly as torchvision builds its magnitude tables
    return torch.linspace(low, high, NUM_BINS)


def magnitude(op: str, bin_: int | None, height: int, width: int) -> float:
    """The unsigned magnitude torchvision's AutoAugment uses for ``op`` at ``bin_`` (0.0 if none)."""
    if bin_ is None:
        return 0.0
    if op == "Posterize":
        return float(8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4)).round().int()[bin_].item())
    table = {
        "ShearX": (0.0, 0.3), "ShearY": (0.0, 0.3), "Rotate": (0.0, 30.0),
        "TranslateX": (0.0, 150.0 / 331.0 * width), "TranslateY": (0.0, 150.0 / 331.0 * height),
        "Brightness": (0.0, 0.9), "Color": (0.0, 0.9), "Contrast": (0.0, 0.9), "Sharpness": (0.0, 0.9),
        "Solarize": (255.0, 0.0),
    }
    if op not in table:
        return 0.0
    return float(_linspace32(*table[op])[bin_].item())
