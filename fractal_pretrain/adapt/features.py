"""Unpooled ResNet stage features, the input of residual matching (adapt and ad_eval share this)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")


def stage_features(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """{layer: (B, C, h, w)} outputs of the torchvision ResNet stages ``layers``; later stages skipped."""
    wanted = set(layers)
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    out = {}
    for name in LAYER_NAMES:
        if not wanted:
            break
        x = getattr(model, name)(x)
        if name in wanted:
            out[name] = x
            wanted.discard(name)
    return out


def stage_channels(model: nn.Module, layers: Sequence[str]) -> dict[str, int]:
    """Channels of each stage, from a 32 px probe (no weights changed; eval mode assumed)."""
    with torch.no_grad():
        probe = torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device)
        return {name: f.shape[1] for name, f in stage_features(model, probe, layers).items()}
