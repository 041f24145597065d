"""Helpers shared by the ad_eval tests."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18


def random_resnet18(seed: int = 0) -> nn.Module:
    """torchvision ResNet-18 with random weights under ``seed``, fc = Identity, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet18(weights=None)
    model.fc = nn.Identity()
    return model.eval()
