"""Two photometric views of an image (ADPretrain's ``MoCoTransform`` without the geometry), keyed draws.

Per view: with p 0.8 brightness, contrast and saturation factors U(0.6, 1.4) (ColorJitter 0.4; the hue
jitter 0.1 is left out), with p 0.2 greyscale, with p 0.5 a Gaussian blur of sigma U(0.1, 2). Only
photometric, so one anomaly mask serves both views. Draws: ``rng.STREAM_VIEWS``, slot = view number.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fractal_pretrain import rng

JITTER = 0.4
JITTER_P, GREY_P, BLUR_P = 0.8, 0.2, 0.5
BLUR_SIGMA = (0.1, 2.0)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(3, H, W) float Gaussian blur, kernel radius ceil(3 sigma), reflect padding."""
    radius = max(1, int(np.ceil(3 * sigma)))
    radius = min(radius, image.shape[-1] - 1, image.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]


def photometric_view(images: torch.Tensor, indices, seed: int, view: int) -> torch.Tensor:
    """(B, 3, H, W) float [0, 1] view of (B, 3, H, W) uint8 ``images`` keyed by (seed, index, view)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    words = np.stack([np.stack(rng.draw_words(seed, 0, indices, rng.STREAM_VIEWS, d, slot=view), -1)
                      for d in range(2)], axis=1).reshape(len(indices), 8)
    u = rng.to_uniform(words)
    x = images.float() / 255.0
    out = []
    for b in range(len(indices)):
        img = x[b]
        if u[b, 0] < JITTER_P:
            brightness, contrast, saturation = (1 - JITTER + 2 * JITTER * float(u[b, k]) for k in (1, 2, 3))
            img = img * brightness
            img = (img - img.mean()) * contrast + img.mean()
            grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
            img = (img - grey) * saturation + grey
            img = img.clamp(0, 1)
        if u[b, 4] < GREY_P:
            img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None].expand(3, -1, -1)
        if u[b, 5] < BLUR_P:
            img = gaussian_blur(img.contiguous(), BLUR_SIGMA[0] + float(u[b, 6]) * (BLUR_SIGMA[1] - BLUR_SIGMA[0]))
        out.append(img)
    return torch.stack(out)
