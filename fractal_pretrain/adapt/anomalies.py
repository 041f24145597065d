"""Synthetic anomalies with exact pixel masks, made from fractals (FractalAD-style) and local defects.

``AnomalySynthesizer.apply(images, indices, epoch)`` takes a batch of normal uint8 images (B, 3, H, W) on
any device and returns anomalous copies and their masks. Each image is, with probability ``anomaly_p``,
given one defect of a kind drawn by the ``AnomalyMix`` weights:

* ``fractal_paste`` (FractalAD ``fag.py``, strong_recipes.md §5): a square patch of side U(patch_side) x
  min(H, W) cut from the central 10-90% band of the same or another image of the batch, colour-jittered
  (one of three jitters), flipped h/v with p 0.5 each, rotated U(rotation) degrees, multiplied by a fresh
  binary N = 2 IFS mask rendered *at the patch size* by our renderer, the mask dilated 3x3 ``dilation``
  times, pasted elsewhere, Gaussian noise inside with p ``noise_p``;
* ``scar``: a CutPaste scar, a thin rotated rectangle of another place, colour-jittered;
* ``blur`` / ``contrast`` / ``colour``: the pixels under a fractal mask at some place blurred, their
  contrast changed, or their colour shifted.

Every draw is a pure function of (seed, epoch, sample index) through ``fractal_pretrain.rng``
(``STREAM_ANOMALY``, ``STREAM_ANOMALY_NOISE``; the mask renderer draws with its own streams under the
same key). The mask is built from the defect's region (the dilated fractal mask, the rotated scar)
intersected with "differs after rounding to uint8", so a pasted pixel equal to the old one is not
labelled anomalous (nothing changed there); the tests check that it equals the set of changed pixels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fractal_pretrain import rng
from fractal_pretrain.config import ConfigError, check_pair, check_range
from fractal_pretrain.recipes import Recipe
from fractal_pretrain.render import make_renderer

KINDS = ("fractal_paste", "scar", "blur", "contrast", "colour")
MASK_QUANTUM = 4  # mask patch sides are rounded to a multiple of this: one renderer per side
MIN_MASK_SIDE = 8  # the renderer's smallest image
# Word positions of one sample's draws (4 draws x 4 words of STREAM_ANOMALY).
(W_ANOMALOUS, W_KIND, W_SIDE, W_SRC_Y, W_SRC_X, W_DST_Y, W_DST_X, W_JITTER, W_JITTER_AMOUNT, W_FLIP_H,
 W_FLIP_V, W_ANGLE, W_SOURCE, W_NOISE, W_SCAR_ASPECT, W_SPARE) = range(16)


@dataclass(frozen=True)
class AnomalyMix:
    """Which defects, how often, and their FractalAD constants. Weights need not sum to 1."""

    anomaly_p: float = 0.5  # probability that an image gets a defect
    fractal_paste: float = 0.6  # kind weights
    scar: float = 0.2
    blur: float = 0.1
    contrast: float = 0.05
    colour: float = 0.05
    patch_side: tuple[float, float] = (0.1, 0.5)  # fraction of min(H, W)
    rotation: tuple[float, float] = (15.0, 75.0)  # degrees
    dilation: int = 3  # 3x3 dilations of the fractal mask
    noise_p: float = 0.5  # Gaussian noise inside a pasted patch
    noise_amplitude: float = 10.0  # its standard deviation, in 0-255 units
    mask_systems: int = 256  # N = 2 IFS systems the fractal masks are drawn from
    mask_points: int = 20_000  # chaos-game points of one mask

    def __post_init__(self):
        check_range("anomaly_p", self.anomaly_p, 0.0, 1.0)
        for kind in KINDS:
            check_range(kind, getattr(self, kind), 0.0)
        if sum(self.weights) <= 0:
            raise ConfigError(f"anomaly mix weights {', '.join(KINDS)}: must sum to something positive "
                              f"(got {sum(self.weights)})")
        check_pair("patch_side", self.patch_side, 0.02, 1.0)
        check_pair("rotation", self.rotation, -360.0, 360.0)
        check_range("dilation", self.dilation, 0, 16, integer=True)
        check_range("noise_p", self.noise_p, 0.0, 1.0)
        check_range("noise_amplitude", self.noise_amplitude, 0.0, 255.0)
        check_range("mask_systems", self.mask_systems, 1, 1_000_000, integer=True)
        check_range("mask_points", self.mask_points, 100, 2**31 - 1, integer=True)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, kind)) for kind in KINDS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mask_recipe(mix: AnomalyMix) -> Recipe:
    """The recipe of the fractal masks: binary N = 2 IFS with FractalDB's random 3x3 patch, no colour."""
    return Recipe(name="anomaly-mask", num_classes=mix.mask_systems, min_maps=2, max_maps=2,
                  num_points=mix.mask_points, jitter="none", render_mode="binary", patch="image",
                  color=False, background=False, blur_p=0.0)


def sample_words(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """(B, 16) uint32: the anomaly draws of each sample."""
    words = [np.stack(rng.draw_words(seed, epoch, indices, rng.STREAM_ANOMALY, draw), axis=-1)
             for draw in range(4)]
    return np.concatenate(words, axis=-1)


def choose_kind(word: int, weights: tuple[float, ...]) -> int:
    """Index into KINDS for one uniform word, by cumulative weights."""
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
    u = float(rng.to_uniform(np.uint32(word))) * cumulative[-1]
    return int(min(np.searchsorted(cumulative, u, side="right"), len(weights) - 1))


def gaussian_noise(seed: int, epoch: int, index: int, count: int) -> np.ndarray:
    """``count`` standard normal float32 values (Box-Muller on Philox words), pure in the key."""
    blocks = (count + 1) // 2
    w = rng.draw_words(seed, epoch, index, rng.STREAM_ANOMALY_NOISE, np.arange(blocks))
    u1 = 1.0 - rng.to_uniform(w[0]).astype(np.float64)  # (0, 1]: log is finite
    u2 = rng.to_uniform(w[1]).astype(np.float64)
    radius = np.sqrt(-2.0 * np.log(u1))
    normal = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return normal[:count].astype(np.float32)


def dilate(mask: torch.Tensor, times: int) -> torch.Tensor:
    """Binary 3x3 dilation of a (h, w) bool mask, ``times`` times."""
    x = mask[None, None].float()
    for _ in range(times):
        x = F.max_pool2d(x, 3, stride=1, padding=1)
    return x[0, 0] > 0


def rotate(patch: torch.Tensor, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, s, s) float patch rotated about its centre (nearest), and the bool mask of pixels that came
    from inside the patch (the corners a rotation uncovers are outside it)."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    matrix = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=torch.float32, device=patch.device)[None]
    grid = F.affine_grid(matrix, (1, patch.shape[0] + 1, *patch.shape[1:]), align_corners=False)
    ones = torch.ones_like(patch[:1])
    out = F.grid_sample(torch.cat([patch, ones])[None], grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[0]
    return out[:-1], out[-1] > 0.5


def colour_jitter(patch: torch.Tensor, choice: int, amount: float) -> torch.Tensor:
    """One of three jitters of a (3, h, w) float 0-255 patch: brightness, contrast, saturation.
    ``amount`` in [0, 1) maps to a factor in [0.5, 1.5) away from 1 by at least 0.2."""
    factor = 0.5 + amount  # [0.5, 1.5)
    if abs(factor - 1.0) < 0.2:
        factor = 1.2 if factor >= 1.0 else 0.8
    if choice == 0:
        return patch * factor
    if choice == 1:
        mean = patch.mean()
        return (patch - mean) * factor + mean
    grey = patch.mean(dim=0, keepdim=True)
    return (patch - grey) * factor + grey


def box_blur(patch: torch.Tensor, radius: int) -> torch.Tensor:
    """(3, h, w) box blur of side 2 * radius + 1, replicate padding."""
    k = 2 * radius + 1
    padded = F.pad(patch[None], (radius,) * 4, mode="replicate")
    return F.avg_pool2d(padded, k, stride=1)[0]


class AnomalySynthesizer:
    """Applies an ``AnomalyMix`` to batches of normal images; masks rendered on ``device``'s renderer."""

    def __init__(self, mix: AnomalyMix, *, seed: int = 0, device: str = "cpu"):
        check_range("seed", seed, 0, 2**32 - 1, integer=True)
        self.mix, self.seed, self.device = mix, seed, device
        self._recipe = mask_recipe(mix)
        self._renderers: dict[int, object] = {}
        self._bank = None

    def _renderer(self, side: int):
        if side not in self._renderers:
            render_device = "cpu" if not str(self.device).startswith("cuda") else str(self.device)
            renderer = make_renderer(self._recipe, size=side, seed=self.seed, device=render_device,
                                     bank=self._bank)
            self._bank = renderer.bank  # one bank for every side
            self._renderers[side] = renderer
        return self._renderers[side]

    def fractal_masks(self, side: int, indices: np.ndarray, epoch: int) -> torch.Tensor:
        """(B, side, side) bool binary IFS masks for the samples ``indices`` (key = (seed, epoch, index))."""
        images, _ = self._renderer(side).render_tensor(indices, epoch, dtype="uint8")
        return (images.to(self.device) > 0).any(dim=1)

    def mask_side(self, word: int, height: int, width: int) -> int:
        low, high = self.mix.patch_side
        side = float(rng.to_range(np.uint32(word), low, high)) * min(height, width)
        side = max(MIN_MASK_SIDE, int(round(side / MASK_QUANTUM)) * MASK_QUANTUM)
        return min(side, min(height, width))

    def apply(self, images: torch.Tensor, indices, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomalous copies of ``images`` and their masks.

        Args:
            images: (B, 3, H, W) uint8 normal images.
            indices: (B,) global sample indices (the keys of the draws, with ``seed`` and ``epoch``).
            epoch: the key's epoch word.

        Returns:
            (B, 3, H, W) uint8 images, (B, H, W) bool masks; an image without a defect is returned
            unchanged with an all-False mask.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"images: need (B, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        batch, _, height, width = images.shape
        if len(indices) != batch:
            raise ConfigError(f"indices: {len(indices)} keys for {batch} images")
        words = sample_words(self.seed, epoch, indices)
        out = images.clone()
        masks = torch.zeros(batch, height, width, dtype=torch.bool, device=images.device)
        plans = []
        for b in range(batch):
            w = words[b]
            if float(rng.to_uniform(np.uint32(w[W_ANOMALOUS]))) >= self.mix.anomaly_p:
                continue
            kind = choose_kind(int(w[W_KIND]), self.mix.weights)
            plans.append((b, kind, self.mask_side(int(w[W_SIDE]), height, width)))
        masks_by_side: dict[int, dict[int, torch.Tensor]] = {}
        for side in sorted({side for _, kind, side in plans if KINDS[kind] != "scar"}):
            members = [b for b, kind, s in plans if s == side and KINDS[kind] != "scar"]
            rendered = self.fractal_masks(side, indices[members], epoch)
            masks_by_side[side] = dict(zip(members, rendered, strict=False))
        for b, kind, side in plans:
            region_mask = masks_by_side.get(side, {}).get(b)
            self._defect(out, masks, images, b, KINDS[kind], side, words[b], region_mask, int(indices[b]), epoch)
        return out, masks

    def _defect(self, out, masks, images, b, kind, side, w, fractal_mask, index, epoch) -> None:
        """Writes one defect into ``out[b]`` and its mask into ``masks[b]``: the defect's region where the
        rounded new value differs from the old one."""
        _, _, height, width = images.shape
        u = lambda k: float(rng.to_uniform(np.uint32(w[k])))  # noqa: E731 - one uniform of this sample
        dst_y, dst_x = int(u(W_DST_Y) * (height - side + 1)), int(u(W_DST_X) * (width - side + 1))
        target = images[b, :, dst_y:dst_y + side, dst_x:dst_x + side].float()
        if kind in ("fractal_paste", "scar"):
            source = images[int(rng.to_int(np.uint32(w[W_SOURCE]), images.shape[0]))]
            band_y, band_x = int(0.1 * height), int(0.1 * width)
            span_y = max(0, int(0.9 * height) - side - band_y)
            span_x = max(0, int(0.9 * width) - side - band_x)
            src_y = min(band_y + int(u(W_SRC_Y) * (span_y + 1)), height - side)
            src_x = min(band_x + int(u(W_SRC_X) * (span_x + 1)), width - side)
            patch = source[:, src_y:src_y + side, src_x:src_x + side].float()
            patch = colour_jitter(patch, int(rng.to_int(np.uint32(w[W_JITTER]), 3)), u(W_JITTER_AMOUNT))
            if u(W_FLIP_H) < 0.5:
                patch = patch.flip(-1)
            if u(W_FLIP_V) < 0.5:
                patch = patch.flip(-2)
            low, high = self.mix.rotation
            if kind == "scar":
                angle = low + u(W_ANGLE) * (high - low)
                region, _ = rotate(self._scar_region(side, u(W_SCAR_ASPECT), patch.device)[None].float(), angle)
                region = region[0] > 0.5  # the rotated scar samples only inside the box: no uncovered corners
                patch, _ = rotate(patch, angle)
            else:
                patch, inside = rotate(patch, low + u(W_ANGLE) * (high - low))
                region = dilate(fractal_mask, self.mix.dilation) & inside
            if kind == "fractal_paste" and u(W_NOISE) < self.mix.noise_p and self.mix.noise_amplitude > 0:
                noise = gaussian_noise(self.seed, epoch, index, patch.numel())
                patch = patch + self.mix.noise_amplitude * torch.from_numpy(noise).view_as(patch).to(patch.device)
            content = patch
        else:
            region = dilate(fractal_mask, self.mix.dilation)
            amount = u(W_JITTER_AMOUNT)
            if kind == "blur":
                content = box_blur(target, 1 + int(amount * 3))
            elif kind == "contrast":
                content = colour_jitter(target, 1, amount)
            else:  # colour: a per-channel shift of 20-60 grey levels, sign per channel
                shift = torch.tensor([(20 + 40 * amount) * (1 if u(k) < 0.5 else -1)
                                      for k in (W_FLIP_H, W_FLIP_V, W_SPARE)], device=target.device)
                content = target + shift.view(3, 1, 1)
        content = content.round().clamp(0, 255).to(torch.uint8)
        box = out[b, :, dst_y:dst_y + side, dst_x:dst_x + side]
        changed = region & (content != box).any(dim=0)
        box[:, changed] = content[:, changed]
        masks[b, dst_y:dst_y + side, dst_x:dst_x + side] |= changed

    @staticmethod
    def _scar_region(side: int, aspect_u: float, device) -> torch.Tensor:
        """A centred thin rectangle: full length, width 10-25% of the side (CutPaste scar proportions)."""
        thickness = max(1, int(round(side * (0.1 + 0.15 * aspect_u))))
        region = torch.zeros(side, side, dtype=torch.bool, device=device)
        start = (side - thickness) // 2
        region[start:start + thickness, :] = True
        return region
