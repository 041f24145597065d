"""Two photometric views of an image (ADPretrain's ``MoCoTransform`` without the geometry), keyed draws.

Per view: with p 0.8 brightness, contrast and saturation factors U(0.6, 1.4) (ColorJitter 0.4; the hue
jitter 0.1 is left out), with p 0.2 greyscale, with p 0.5 a Gaussian blur of sigma U(0.1, 2). Only
photometric, so one anomaly mask serves both views. Draws: ``rng.STREAM_VIEWS`` with the key (seed, epoch,
sample index), slot = view number; the caller's epoch word keeps its uses apart (``adapt/model.py``: training,
validation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fractal_pretrain import rng
from fractal_pretrain.augment.augmenter import upload

JITTER = 0.4
JITTER_P, GREY_P, BLUR_P = 0.8, 0.2, 0.5
BLUR_SIGMA = (0.1, 2.0)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: torch.Tensor, max_radius: int) -> torch.Tensor:
    """(B, 3, H, W) float Gaussian blur, per-sample ``sigma`` and kernel ``radius`` (B,), reflect padding;
    one grouped convolution per axis (kernels zero beyond their radius, up to ``max_radius``)."""
    batch, channels, height, width = images.shape
    x = torch.arange(-max_radius, max_radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x / sigma.view(-1, 1)) ** 2) * (x.abs() <= radius.view(-1, 1))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B C, K)
    out = F.pad(images.reshape(1, batch * channels, height, width), (max_radius,) * 4, mode="reflect")
    out = F.conv2d(out, kernel.view(batch * channels, 1, 1, -1), groups=batch * channels)
    out = F.conv2d(out, kernel.view(batch * channels, 1, -1, 1), groups=batch * channels)
    return out.view(batch, channels, height, width)


def grey(images: torch.Tensor) -> torch.Tensor:
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])[:, None]


def view_draws(seed: int, epoch: int, indices, view: int) -> np.ndarray:
    """(B, 8) float32 uniforms of view ``view`` of the samples ``indices``: a pure function of the key."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    words = np.stack([np.stack(rng.draw_words(seed, epoch, indices, rng.STREAM_VIEWS, d, slot=view), -1)
                      for d in range(2)], axis=1).reshape(len(indices), 8)
    return rng.to_uniform(words)


def photometric_view(images: torch.Tensor, indices, seed: int, view: int, *, epoch: int) -> torch.Tensor:
    """(B, 3, H, W) float [0, 1] view of (B, 3, H, W) uint8 ``images`` keyed by (seed, epoch, index, view).

    The draws are made on the host and go to the images' device in one copy; the view is batched tensor
    ops (no per-sample loop)."""
    u = view_draws(seed, epoch, indices, view)
    height, width = images.shape[-2:]
    sigma = BLUR_SIGMA[0] + u[:, 6].astype(np.float64) * (BLUR_SIGMA[1] - BLUR_SIGMA[0])
    radius = np.minimum(np.maximum(1, np.ceil(3 * sigma)), min(height, width) - 1)
    max_radius = int(min(np.ceil(3 * BLUR_SIGMA[1]), height - 1, width - 1))
    factors = 1 - JITTER + 2 * JITTER * u[:, 1:4]
    blurred = np.flatnonzero(u[:, 5] < BLUR_P)  # the host knows which: only those are blurred
    jitter, to_grey, rows, factors, sigma, radius = upload(
        [u[:, 0] < JITTER_P, u[:, 4] < GREY_P, blurred, factors, sigma[blurred].astype(np.float32), radius[blurred]],
        images.device)
    flag = lambda v: v.bool().view(-1, 1, 1, 1)  # noqa: E731 - a per-sample condition over an image
    per = lambda v: v.float().view(-1, 1, 1, 1)  # noqa: E731
    x = images.float() / 255.0
    jittered = x * per(factors[:, 0])
    mean = jittered.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (jittered - mean) * per(factors[:, 1]) + mean
    g = grey(jittered)
    jittered = ((jittered - g) * per(factors[:, 2]) + g).clamp(0, 1)
    x = torch.where(flag(jitter), jittered, x)
    x = torch.where(flag(to_grey), grey(x).expand(-1, 3, -1, -1), x)
    if len(blurred) == 0:
        return x
    rows = rows.long()
    return x.index_copy(0, rows, gaussian_blur(x.index_select(0, rows), sigma.float(), radius, max_radius))
