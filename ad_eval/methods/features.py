"""Feature helpers shared by the methods that run the torchvision ResNet themselves (PANDA, CutPaste).

Backbone resolution (``resolve_backbone``: a ``Backbone`` or ``(model, mean, std)`` to the model and its
normalisation), pooled stage features (``pooled_features``, ``extract_features``), a plain loader and a
deterministic-kernels context. Config merging is ``MethodSpec.make_config`` (``registry.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ad_eval.methods.base import LAYER_NAMES

RESNET_STEM = ("conv1", "bn1", "relu", "maxpool")


def resolve_backbone(backbone: Any) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """The (model, mean, std) of a backbone given as a tuple or as an object with ``.build()``.

    Args:
        backbone: ``(model, mean, std)``, or any object with ``.build()`` returning the model and
            ``.mean``/``.std`` attributes (``ad_eval.backbones.Backbone``). The model is a
            torchvision ResNet with ``fc = nn.Identity()``. A bare ``nn.Module`` is refused: it
            carries no normalisation, and a silent ImageNet default would be wrong for fractal
            backbones.

    Returns:
        The model (not copied: callers copy before changing it) and mean/std as float tuples.
    """
    if isinstance(backbone, nn.Module):
        raise TypeError(
            "backbone: pass (model, mean, std) or an object with .build(), .mean and .std; "
            "a bare nn.Module carries no normalisation"
        )
    if isinstance(backbone, (tuple, list)) and len(backbone) == 3:
        model, mean, std = backbone
    elif callable(getattr(backbone, "build", None)):
        model, mean, std = backbone.build(), backbone.mean, backbone.std
    else:
        raise TypeError(
            f"backbone: {type(backbone).__name__} is neither (model, mean, std) nor an object "
            "with .build(), .mean and .std"
        )
    missing = [n for n in (*RESNET_STEM, *LAYER_NAMES) if not hasattr(model, n)]
    if not isinstance(model, nn.Module) or missing:
        raise TypeError(
            f"backbone model {type(model).__name__} is not a torchvision-style ResNet "
            f"(missing {', '.join(missing) or 'nn.Module'})"
        )
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"backbone mean={mean!r}, std={std!r}: need 3 values each, std > 0")
    return model, mean, std


def pooled_features(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> torch.Tensor:
    """Global-average-pooled outputs of ResNet stages ``layers``, concatenated in stage order.

    Args:
        model: a torchvision ResNet (only the stem and ``layer1..4`` are used).
        images: (B, 3, H, W) normalised.
        layers: names from ``check_layers`` (sorted ``layer1..layer4``).

    Returns:
        (B, sum of the layers' channels); for ``("layer4",)`` this is ``model(images)``.
    """
    wanted = set(layers)
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    features = []
    for name in LAYER_NAMES:
        x = getattr(model, name)(x)  # (B, C, h, w)
        if name in wanted:
            features.append(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # (B, C)
            wanted.discard(name)
            if not wanted:  # later stages are not needed
                break
    return torch.cat(features, dim=1)


def make_loader(
    dataset: Dataset, batch_size: int, *, generator: torch.Generator | None = None
) -> DataLoader:
    """In-process loader; shuffled (drop_last=False) when a seeded ``generator`` is given."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator
    )


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, layers: Sequence[str], device: str | torch.device
) -> torch.Tensor:
    """(N, D) float32 CPU pooled features of every image of ``loader`` (items have ``"image"``)."""
    chunks = [
        pooled_features(model, batch["image"].to(device), layers).float().cpu() for batch in loader
    ]
    return torch.cat(chunks)


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Deterministic torch kernels (a warning where none exists), previous settings restored."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
