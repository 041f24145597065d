"""The residual-feature projector (ADPretrain ``models/projector.py``, ad_methods.md §3.3), one per layer.

``kind="attention"`` (ADPretrain's): a learnable reference bank (bank_size x C, random init) through a
1x1 Conv1d; cross-attention with Q = the residual tokens and K = V = the projected bank, output
x - Attn(x, bank, bank) (subtractive); then an MLP C -> 4C, a squeeze-excitation gate over the hidden
vector of each token, GELU, 4C -> C, with a skip. ``kind="mlp"`` is the simpler variant without the bank
and the attention (the MLP block alone), kept to measure what the attention adds. Both keep (B, C, h, w).

Residual scale (not in ADPretrain): each layer divides its input by a fixed ``residual_scale`` buffer, the
mean norm of normal residuals of that layer (set once before training, ``AdaptModule.compute_centers``).
ADPretrain feeds raw ViT residuals and its norm loss has fixed constants (normal shell at compressed norm
0.4, i.e. ||e|| ~ 0.96; abnormal margin 0.75). CNN residual norms are ~10: the exp(distance) weights of
the norm loss explode (loss ~3e5). Keeping §3.4's constants as written and instead dividing by the mean
normal residual norm puts normal residuals at mean norm 1 (compressed 0.41), on the shell the loss
describes; the buffer is in the state dict, so ``ad_eval`` (``projection.py``) applies the same division.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from fractal_pretrain.config import check_choice, check_range


@dataclass(frozen=True)
class ProjectorConfig:
    kind: str = "attention"  # "attention" (ADPretrain) | "mlp" (no bank, no attention)
    bank_size: int = 2048  # learnable reference tokens per layer
    heads: int = 16  # attention heads (must divide every layer's channels)
    mlp_ratio: int = 4
    se_reduction: int = 16  # squeeze-excitation bottleneck: hidden / se_reduction

    def __post_init__(self):
        check_choice("kind", self.kind, ("attention", "mlp"))
        check_range("bank_size", self.bank_size, 1, 1 << 20, integer=True)
        check_range("heads", self.heads, 1, 1024, integer=True)
        check_range("mlp_ratio", self.mlp_ratio, 1, 64, integer=True)
        check_range("se_reduction", self.se_reduction, 1, 1024, integer=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SqueezeExcitation(nn.Module):
    """Per-token channel gate: x * sigmoid(W2 relu(W1 x))."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


class LayerProjector(nn.Module):
    """Projector of one layer's (B, C, h, w) residual features; output has the same shape."""

    def __init__(self, channels: int, config: ProjectorConfig):
        super().__init__()
        self.kind = config.kind
        if config.kind == "attention":
            if channels % config.heads:
                raise ValueError(f"heads={config.heads}: must divide the layer's {channels} channels")
            self.bank = nn.Parameter(torch.randn(1, channels, config.bank_size))
            self.embed = nn.Conv1d(channels, channels, 1)
            nn.init.kaiming_normal_(self.embed.weight)
            self.attention = nn.MultiheadAttention(channels, config.heads, batch_first=True)
        hidden = channels * config.mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), SqueezeExcitation(hidden, config.se_reduction),
                                 nn.GELU(), nn.Linear(hidden, channels))
        self.register_buffer("residual_scale", torch.ones(()))  # fixed before training, never trained

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = residual.shape
        x = (residual / self.residual_scale.to(residual.dtype)).flatten(2).transpose(1, 2)  # (B, hw, C)
        if self.kind == "attention":
            bank = self.embed(self.bank).transpose(1, 2).expand(batch, -1, -1)  # (B, bank, C)
            x = x - self.attention(x, bank, bank, need_weights=False)[0]
        x = self.mlp(x) + x
        return x.transpose(1, 2).reshape(batch, channels, height, width)


class Projector(nn.Module):
    """One ``LayerProjector`` per layer name; ``forward`` maps {layer: residual} -> {layer: projected}."""

    def __init__(self, channels: dict[str, int], config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.channels = dict(channels)
        self.layers = nn.ModuleDict({name: LayerProjector(c, config) for name, c in channels.items()})

    def forward(self, residuals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.layers[name](r) for name, r in residuals.items()}

    def scales(self) -> dict[str, float]:
        return {name: float(m.residual_scale) for name, m in self.layers.items()}

    def bank_bytes(self) -> int:
        """Memory of the learnable reference banks (parameters only)."""
        return sum(m.bank.numel() * m.bank.element_size() for m in self.layers.values() if m.kind == "attention")
