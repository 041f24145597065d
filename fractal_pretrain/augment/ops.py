"""Batched image ops on the training device, each equal to torchvision's single-image result.

Images are (N, C, H, W). The AutoAugment ops work on uint8, as torchvision's tensor kernels do,
and round or truncate where those kernels do. Where torchvision blends with ``add_(x, alpha=a)``
(a fused multiply-add on CPU and GPU) the batched version computes the same single-rounded float32
value through float64 (``_fma32``), so the truncation to uint8 lands on the same integer.
Per-sample parameters arrive as host NumPy arrays (see params.py) and go to the device as small tensors.

Deliberate differences (tested with these tolerances in tests/fractal_pretrain/test_augment_ops.py):
- ``resized_crop`` is antialiased bilinear as ``torch.nn.functional.interpolate(antialias=True)``,
  done as two batched matrix products with per-sample weight matrices (the same triangle-filter
  weights). On float images it matches to 1e-4 (of 255); on uint8, torch's CPU kernel uses 16-bit
  fixed-point weights, so single pixels may differ by 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

# ---------------------------------------------------------------------------- helpers


def _per_sample(values, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Host values -> (N, 1, 1, 1) tensor on ``like``'s device."""
    return torch.as_tensor(np.asarray(values), dtype=dtype).to(like.device, non_blocking=True).view(-1, 1, 1, 1)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a * b + c rounded once, as a fused multiply-add (exact in float64 for these operands)."""
    return torch.addcmul(c.double(), a.double(), b.double()).float()


def _grey(image: torch.Tensor) -> torch.Tensor:
    """torchvision's float luma of a uint8 RGB batch, floored: (N, 1, H, W) float32."""
    r, g, b = image.unbind(dim=-3)
    luma = r.float() * 0.2989
    luma = _fma32(g, torch.tensor(0.587, dtype=torch.float32), luma)
    luma = _fma32(b, torch.tensor(0.114, dtype=torch.float32), luma)
    return luma.floor_().unsqueeze(-3)


def _blend(image: torch.Tensor, other: torch.Tensor, ratio: np.ndarray) -> torch.Tensor:
    """torchvision's ``_blend`` on uint8 with one ratio per sample: image * r + other * (1 - r), truncated."""
    ratio = np.asarray(ratio, dtype=np.float64)
    scaled = image.float() * _per_sample(ratio, image)
    out = _fma32(other, _per_sample(1.0 - ratio, image), scaled)
    return out.clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------- crop, flip, normalise, erase


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(N, out_size, in_size) antialiased bilinear weights that crop ``[start, start + length)`` and resize it.

    The weights are torch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)``
    (PIL's triangle filter, widened by the scale when shrinking), placed at the crop's offset.
    """
    start = start.to(torch.float64).view(-1, 1, 1)
    length = length.to(torch.float64).view(-1, 1, 1)
    device = start.device
    scale = length / out_size
    support = torch.where(scale >= 1.0, scale, torch.ones_like(scale))
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out_size, device=device, dtype=torch.float64).view(1, -1, 1) + 0.5)
    lo = torch.clamp((centre - support + 0.5).trunc(), min=0)
    hi = torch.minimum((centre + support + 0.5).trunc(), length)
    pos = torch.arange(in_size, device=device, dtype=torch.float64).view(1, 1, -1) - start  # crop coordinates
    weight = (1.0 - ((pos - centre + 0.5) * invscale).abs()).clamp_(min=0.0)
    weight = torch.where((pos >= lo) & (pos < hi), weight, torch.zeros_like(weight))
    return (weight / weight.sum(-1, keepdim=True)).float()


def resized_crop(images: torch.Tensor, crop: np.ndarray, size: int, hflip: np.ndarray | None = None) -> torch.Tensor:
    """Crop each image to its ``(top, left, height, width)`` and resize to ``size`` (float, not rounded).

    A horizontal flip is folded in by reversing that sample's column weights.
    """
    n, _, height, width = images.shape
    box = torch.as_tensor(crop, dtype=torch.int64).to(images.device, non_blocking=True)
    rows = resize_weights(box[:, 0], box[:, 2], height, size)
    cols = resize_weights(box[:, 1], box[:, 3], width, size)
    if hflip is not None and np.any(hflip):
        flip = _per_sample(hflip, images, torch.bool).view(-1, 1, 1)
        cols = torch.where(flip, cols.flip(1), cols)
    x = images.float()
    x = torch.matmul(rows.unsqueeze(1), x)  # (N, C, size, W)
    return torch.matmul(x, cols.transpose(1, 2).unsqueeze(1))  # (N, C, size, size)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 255] -> uint8, rounded (torchvision's resize of a uint8 image)."""
    return images.round().clamp_(0, 255).to(torch.uint8)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std, as ``to_dtype(scale=True)`` then ``normalize``."""
    x = images.to(torch.float32).mul_(1.0 / 255)
    mean = torch.as_tensor(mean, dtype=torch.float32).to(x.device, non_blocking=True).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).to(x.device, non_blocking=True).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def erase(images: torch.Tensor, boxes: np.ndarray, value: float) -> torch.Tensor:
    """Write ``value`` into each sample's ``(top, left, height, width)`` box (height 0: nothing)."""
    box = torch.as_tensor(boxes, dtype=torch.int64).to(images.device, non_blocking=True)
    top, left, h, w = (box[:, k].view(-1, 1, 1, 1) for k in range(4))
    rows = torch.arange(images.shape[-2], device=images.device).view(1, 1, -1, 1)
    cols = torch.arange(images.shape[-1], device=images.device).view(1, 1, 1, -1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return images.masked_fill(inside, value)


# ---------------------------------------------------------------------------- AutoAugment ops (uint8)


def posterize(images: torch.Tensor, bits: np.ndarray) -> torch.Tensor:
    bits = np.asarray(bits, dtype=np.int64)
    mask = ((1 << bits) - 1) << (8 - bits)
    return images & _per_sample(mask, images, torch.uint8)


def solarize(images: torch.Tensor, threshold: np.ndarray) -> torch.Tensor:
    return torch.where(images >= _per_sample(threshold, images), 255 - images, images)


def invert(images: torch.Tensor, _magnitude=None) -> torch.Tensor:
    return TF.invert(images)


def autocontrast(images: torch.Tensor, _magnitude=None) -> torch.Tensor:
    return TF.autocontrast(images)  # per image and channel already


def equalize(images: torch.Tensor, _magnitude=None) -> torch.Tensor:
    return TF.equalize(images)  # batched 256-bin histograms per image and channel


def color(images: torch.Tensor, magnitude: np.ndarray) -> torch.Tensor:
    """``adjust_saturation(1 + magnitude)``."""
    if images.shape[-3] == 1:
        return images
    return _blend(images, _grey(images), 1.0 + np.asarray(magnitude, dtype=np.float64))


def contrast(images: torch.Tensor, magnitude: np.ndarray) -> torch.Tensor:
    """``adjust_contrast(1 + magnitude)``: blend with the mean grey level of each image."""
    grey = _grey(images) if images.shape[-3] == 3 else images.float()
    mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, 1.0 + np.asarray(magnitude, dtype=np.float64))


def sharpness(images: torch.Tensor, magnitude: np.ndarray) -> torch.Tensor:
    """``adjust_sharpness(1 + magnitude)``: blend the interior with a rounded 3x3 smoothing."""
    n, c, height, width = images.shape
    if height <= 2 or width <= 2:
        return images
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32, device=images.device)
    out = images.to(torch.float32)
    smooth = F.conv2d(out, kernel.expand(c, 1, 3, 3), groups=c).round_()
    interior = out[..., 1:-1, 1:-1]
    alpha = _per_sample(1.0 - (1.0 + np.asarray(magnitude, dtype=np.float64)), images)
    out[..., 1:-1, 1:-1] = _fma32(smooth - interior, alpha, interior)
    return out.clamp_(0, 255).to(torch.uint8)


def _inverse_affine(centre, angle: float, shear_x: float, shear_y: float) -> list[float]:
    """torchvision's ``_get_inverse_affine_matrix`` with unit scale and no translation (degrees in)."""
    rot, sx, sy = math.radians(angle), math.radians(shear_x), math.radians(shear_y)
    cx, cy = centre
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += cx - matrix[0] * cx - matrix[1] * cy
    matrix[5] += cy - matrix[3] * cx - matrix[4] * cy
    return matrix


def _warp_nearest(images: torch.Tensor, matrices: list[list[float]]) -> torch.Tensor:
    """Per-sample inverse affine warp, nearest, fill 0: torchvision's ``_affine_grid`` + ``grid_sample``."""
    n, _, height, width = images.shape
    device = images.device
    theta = torch.tensor(matrices, dtype=torch.float32).to(device, non_blocking=True).view(n, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height,
                                      device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * width, 0.5 * height], device=device))
    grid = base.view(1, height * width, 3).expand(n, -1, -1).bmm(scaled).view(n, height, width, 2)
    out = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(images.dtype)


def rotate(images: torch.Tensor, degrees: np.ndarray) -> torch.Tensor:
    """``rotate(angle)`` about the centre, same size, nearest, fill 0 (angles never a multiple of 90 here)."""
    # torchvision turns the angle into [0, 360) first and inverts its sign for the affine matrix
    return _warp_nearest(images, [_inverse_affine((0.0, 0.0), -(float(d) % 360), 0.0, 0.0) for d in degrees])


def _shear(images: torch.Tensor, magnitude: np.ndarray, axis: int) -> torch.Tensor:
    # AutoAugment: affine(shear=degrees(atan(m)), centre = the top-left corner)
    height, width = images.shape[-2:]
    centre = (-width * 0.5, -height * 0.5)
    matrices = []
    for m in magnitude:
        angle = math.degrees(math.atan(float(m)))
        matrices.append(_inverse_affine(centre, 0.0, angle if axis == 0 else 0.0, angle if axis == 1 else 0.0))
    return _warp_nearest(images, matrices)


def shear_x(images: torch.Tensor, magnitude: np.ndarray) -> torch.Tensor:
    return _shear(images, magnitude, 0)


def shear_y(images: torch.Tensor, magnitude: np.ndarray) -> torch.Tensor:
    return _shear(images, magnitude, 1)


AUTOAUGMENT_OPS = {
    "Posterize": posterize, "Solarize": solarize, "Invert": invert, "AutoContrast": autocontrast,
    "Equalize": equalize, "Color": color, "Contrast": contrast, "Sharpness": sharpness,
    "Rotate": rotate, "ShearX": shear_x, "ShearY": shear_y,
}
