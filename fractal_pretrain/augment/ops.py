"""Batched image ops on the training device, each equal to torchvision's single-image result.

Images are (N, C, H, W). The AutoAugment ops work on uint8, as torchvision's tensor kernels do,
and round or truncate where those kernels do. Where torchvision blends with ``add_(x, alpha=a)``
(a fused multiply-add on CPU and GPU) the batched version computes the same single-rounded float32
value through float64 (``_fma32``), so the truncation to uint8 lands on the same integer.
Per-sample parameters are host NumPy arrays (see params.py) or, from ``BatchAugmenter``, device
tensors that arrived in one pinned copy per batch. AutoAugment ops come as ``(prepare, apply)``:
``prepare`` turns magnitudes into per-sample parameters on the host (affine matrices, bit masks),
``apply`` runs on the device; ``apply_op`` chains the two.

Why not kornia: its batched ops take float images in [0, 1] and skip the uint8 rounding and
truncation that define torchvision's (and PIL's) results, and its crop-and-resize samples a grid without
antialiasing, so none of them could equal torchvision's output. The ops here are compact torch code
plus torchvision's own batch-capable kernels where they exist (invert, equalize).

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


def _on_device(values, like: torch.Tensor, dtype) -> torch.Tensor:
    """Host array or device tensor -> tensor of ``dtype`` on ``like``'s device."""
    values = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    return values.to(device=like.device, dtype=dtype, non_blocking=True)


def _per_sample(values, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Per-sample values -> (N, 1, 1, 1) tensor on ``like``'s device."""
    return _on_device(values, like, dtype).view(-1, 1, 1, 1)


def _fma32(a: torch.Tensor, b, c: torch.Tensor) -> torch.Tensor:
    """float32 a * b + c rounded once, as a fused multiply-add.

    The operands are 8-bit pixels and float32 values, so product and sum are exact in float64 and the
    final cast is the only rounding. ``b``: a tensor or a float holding a float32 value.
    """
    b = b.double() if isinstance(b, torch.Tensor) else float(b)
    return (a.double() * b + c.double()).float()


def _grey(image: torch.Tensor) -> torch.Tensor:
    """torchvision's float luma of a uint8 RGB batch, floored: (N, 1, H, W) float32."""
    r, g, b = image.unbind(dim=-3)
    luma = r.float() * 0.2989
    luma = _fma32(g, np.float32(0.587), luma)  # torchvision's alpha, a float32 inside add_
    luma = _fma32(b, np.float32(0.114), luma)
    return luma.floor_().unsqueeze(-3)


def _blend(image: torch.Tensor, other: torch.Tensor, magnitude) -> torch.Tensor:
    """torchvision's ``_blend`` on uint8 with ratio 1 + magnitude per sample: image * r + other * (1 - r), truncated.

    Ratio and 1 - ratio are formed in float64 and rounded to float32 once, as torchvision's Python floats.
    """
    ratio = 1.0 + _per_sample(magnitude, image, torch.float64)
    scaled = image.float() * ratio.float()
    out = _fma32(other, (1.0 - ratio).float(), scaled)
    return out.clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------- crop, flip, normalise, erase


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(N, out_size, in_size) antialiased bilinear weights that crop ``[start, start + length)`` and resize it.

    The weights are torch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)``
    (PIL's triangle filter, widened by the scale when shrinking), placed at the crop's offset. Only
    the few taps of each output pixel are computed; they are scattered into the dense matrix.
    """
    device = start.device
    start = start.to(torch.float64).view(-1, 1, 1)
    length = length.to(torch.float64).view(-1, 1, 1)
    scale = length / out_size
    support = torch.where(scale >= 1.0, scale, torch.ones_like(scale))
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out_size, device=device, dtype=torch.float64).view(1, -1, 1) + 0.5)
    lo = torch.clamp((centre - support + 0.5).trunc(), min=0)
    hi = torch.minimum((centre + support + 0.5).trunc(), length)
    taps = int(2 * max(in_size / out_size, 1.0)) + 2  # >= hi - lo for any crop of this input
    pos = lo + torch.arange(taps, device=device, dtype=torch.float64).view(1, 1, -1)  # crop coordinates
    weight = (1.0 - ((pos - centre + 0.5) * invscale).abs()).clamp_(min=0.0)
    weight = torch.where(pos < hi, weight, torch.zeros_like(weight))
    weight = weight / weight.sum(-1, keepdim=True)
    column = (start + pos).clamp_(max=in_size - 1).long()  # unused taps add 0 to a valid column
    dense = torch.zeros(weight.shape[0], out_size, in_size, device=device, dtype=torch.float32)
    return dense.scatter_add_(2, column, weight.float())


def resized_crop(images: torch.Tensor, crop, size: int, hflip=None) -> torch.Tensor:
    """Crop each image to its ``(top, left, height, width)`` and resize to ``size`` (float, not rounded).

    A horizontal flip is folded in by reversing that sample's column weights. Columns are contracted
    first, as one plain batched product over (N, C * H, W), then rows.
    """
    n, c, height, width = images.shape
    box = _on_device(crop, images, torch.int64)
    rows = resize_weights(box[:, 0], box[:, 2], height, size)
    cols = resize_weights(box[:, 1], box[:, 3], width, size)
    if hflip is not None:
        flip = _per_sample(hflip, images, torch.bool).view(-1, 1, 1)
        cols = torch.where(flip, cols.flip(1), cols)
    x = torch.bmm(images.float().reshape(n, c * height, width), cols.transpose(1, 2))  # (N, C * H, size)
    return torch.matmul(rows.unsqueeze(1), x.view(n, c, height, size))  # (N, C, size, size)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 255] -> uint8, rounded (torchvision's resize of a uint8 image)."""
    return images.round().clamp_(0, 255).to(torch.uint8)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std, as ``to_dtype(scale=True)`` then ``normalize``."""
    x = images.to(torch.float32).mul_(1.0 / 255)
    mean = _on_device(mean, x, torch.float32).view(-1, 1, 1)
    std = _on_device(std, x, torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def erase(images: torch.Tensor, boxes, value: float) -> torch.Tensor:
    """Write ``value`` into each sample's ``(top, left, height, width)`` box (height 0: nothing)."""
    box = _on_device(boxes, images, torch.int64)
    top, left, h, w = (box[:, k].view(-1, 1, 1, 1) for k in range(4))
    rows = torch.arange(images.shape[-2], device=images.device).view(1, 1, -1, 1)
    cols = torch.arange(images.shape[-1], device=images.device).view(1, 1, 1, -1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return images.masked_fill(inside, value)


# ---------------------------------------------------------------------------- AutoAugment ops (uint8)
# Each ``apply`` takes the uint8 group and its per-sample parameters from the matching ``prepare``.


def _same(magnitude, height: int, width: int) -> np.ndarray:
    return np.asarray(magnitude, dtype=np.float64)


def posterize_masks(bits, height: int, width: int) -> np.ndarray:
    bits = np.asarray(bits, dtype=np.int64)
    return ((1 << bits) - 1) << (8 - bits)  # keep the top `bits` bits


def posterize(images: torch.Tensor, masks) -> torch.Tensor:
    return images & _per_sample(masks, images, torch.uint8)


def solarize(images: torch.Tensor, threshold) -> torch.Tensor:
    return torch.where(images >= _per_sample(threshold, images), 255 - images, images)


def invert(images: torch.Tensor, _unused=None) -> torch.Tensor:
    return TF.invert(images)


def autocontrast(images: torch.Tensor, _unused=None) -> torch.Tensor:
    """torchvision's ``autocontrast_image`` with ``torch.where`` for its masked assignments (no nonzero)."""
    x = images.to(torch.float32)
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, torch.ones_like(low), (high - low).mul_(1.0 / 255))
    low = torch.where(flat, torch.zeros_like(low), low)
    return x.sub_(low).div_(inv_scale).clamp_(0, 255).to(images.dtype)


def equalize(images: torch.Tensor, _unused=None) -> torch.Tensor:
    return TF.equalize(images)  # batched 256-bin histograms per image and channel


def color(images: torch.Tensor, magnitude) -> torch.Tensor:
    """``adjust_saturation(1 + magnitude)``."""
    if images.shape[-3] == 1:
        return images
    return _blend(images, _grey(images), magnitude)


def contrast(images: torch.Tensor, magnitude) -> torch.Tensor:
    """``adjust_contrast(1 + magnitude)``: blend with the mean grey level of each image."""
    grey = _grey(images) if images.shape[-3] == 3 else images.float()
    return _blend(images, grey.mean(dim=(-3, -2, -1), keepdim=True), magnitude)


def sharpness(images: torch.Tensor, magnitude) -> torch.Tensor:
    """``adjust_sharpness(1 + magnitude)``: blend the interior with a rounded 3x3 smoothing."""
    n, c, height, width = images.shape
    if height <= 2 or width <= 2:
        return images
    kernel = torch.full((c, 1, 3, 3), 1.0 / 13.0, dtype=torch.float32, device=images.device)
    kernel[:, :, 1, 1] = 5.0 / 13.0  # filled on the device: no host-to-device copy
    out = images.to(torch.float32)
    smooth = F.conv2d(out, kernel, groups=c).round_()
    interior = out[..., 1:-1, 1:-1]
    alpha = (1.0 - (1.0 + _per_sample(magnitude, images, torch.float64))).float()
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


def _by_distinct(values, matrix_of) -> np.ndarray:
    """(N, 6) ``matrix_of(v)`` of each value, computed once per distinct value: a batch's magnitudes come from
    a few policy bins and signs, so the host does a handful of evaluations, not one per sample."""
    distinct, inverse = np.unique(np.ravel(np.asarray(values, dtype=np.float64)), return_inverse=True)
    return np.array([matrix_of(float(v)) for v in distinct], dtype=np.float64).reshape(-1, 6)[inverse]


def rotate_matrices(degrees, height: int, width: int) -> np.ndarray:
    """``rotate(angle)`` about the centre: torchvision first maps the angle to [0, 360), then negates it."""
    return _by_distinct(degrees, lambda d: _inverse_affine((0.0, 0.0), -(d % 360), 0.0, 0.0))


def _shear_matrices(magnitude, height: int, width: int, axis: int) -> np.ndarray:
    # AutoAugment: affine(shear=degrees(atan(m)) on one axis, centre = the top-left corner)
    centre = (-width * 0.5, -height * 0.5)

    def matrix(m: float) -> list[float]:
        angle = math.degrees(math.atan(m))
        return _inverse_affine(centre, 0.0, angle if axis == 0 else 0.0, angle if axis == 1 else 0.0)

    return _by_distinct(magnitude, matrix)


def warp_nearest(images: torch.Tensor, matrices) -> torch.Tensor:
    """Per-sample inverse affine warp, same size, nearest, fill 0: torchvision's ``_affine_grid`` + ``grid_sample``."""
    n, _, height, width = images.shape
    device = images.device
    theta = _on_device(matrices, images, torch.float32).view(n, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height,
                                      device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).clone()  # (N, 3, 2), divided per column as torchvision does
    scaled[..., 0] /= 0.5 * width
    scaled[..., 1] /= 0.5 * height
    grid = base.view(1, height * width, 3).expand(n, -1, -1).bmm(scaled).view(n, height, width, 2)
    out = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(images.dtype)


# name -> (prepare on the host: (magnitudes, height, width) -> per-sample parameters, apply on the device)
AUTOAUGMENT_OPS = {
    "Posterize": (posterize_masks, posterize),
    "Solarize": (_same, solarize),
    "Invert": (_same, invert),
    "AutoContrast": (_same, autocontrast),
    "Equalize": (_same, equalize),
    "Color": (_same, color),
    "Contrast": (_same, contrast),
    "Sharpness": (_same, sharpness),
    "Rotate": (rotate_matrices, warp_nearest),
    "ShearX": (lambda m, h, w: _shear_matrices(m, h, w, 0), warp_nearest),
    "ShearY": (lambda m, h, w: _shear_matrices(m, h, w, 1), warp_nearest),
}


def apply_op(name: str, images: torch.Tensor, magnitudes) -> torch.Tensor:
    """Apply AutoAugment op ``name`` to every image of the group, each with its signed magnitude."""
    prepare, apply = AUTOAUGMENT_OPS[name]
    return apply(images, prepare(magnitudes, *images.shape[-2:]))
