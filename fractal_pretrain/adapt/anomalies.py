"""Synthetic anomalies with exact pixel masks, made from fractals (FractalAD-style) and local defects.

``AnomalySynthesizer.apply(images, indices, epoch)`` takes a batch of normal uint8 images (B, 3, H, W) on
any device and returns anomalous copies and their masks. Each image is, with probability ``anomaly_p``,
given one defect of a kind drawn by the ``AnomalyMix`` weights:

* ``fractal_paste`` (FractalAD ``fag.py``, strong_recipes.md §5): a square patch of side U(patch_side) x
  min(H, W) cut from the central 10-90% band of the same or another image of the batch, colour-jittered
  (one of three jitters), flipped h/v with p 0.5 each, rotated U(rotation) degrees, multiplied by a fresh
  binary N = 2 IFS mask rendered *at the patch size* by our renderer, the mask dilated 3x3 ``dilation``
  times, pasted elsewhere, Gaussian noise inside with p ``noise_p``;
* ``scar``: a CutPaste scar (``CutPasteScar``, ad_methods.md §2.1): a thin rectangle of U(scar_width) x
  U(scar_height) pixels at 256 px (scaled by min(H, W) / 256) cut from another place of the same image,
  colour-jittered, flipped as the paste, rotated U(scar_rotation) degrees about its centre, pasted elsewhere;
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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fractal_pretrain import rng
from fractal_pretrain.augment.augmenter import upload
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
    mask_points: int = 100_000  # chaos-game points of one mask (FractalAD: 100k)
    scar_width: tuple[float, float] = (2.0, 16.0)  # CutPaste scar, pixels at 256 px (scaled to the image)
    scar_height: tuple[float, float] = (10.0, 25.0)
    scar_rotation: tuple[float, float] = (-45.0, 45.0)  # degrees

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
        check_pair("scar_width", self.scar_width, 1.0, 256.0)
        check_pair("scar_height", self.scar_height, 1.0, 256.0)
        check_pair("scar_rotation", self.scar_rotation, -360.0, 360.0)

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


def _in(u: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Uniforms in [0, 1) mapped to [low, high)."""
    return bounds[0] + u * (bounds[1] - bounds[0])


def sample_words(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """(B, 16) uint32: the anomaly draws of each sample."""
    words = [np.stack(rng.draw_words(seed, epoch, indices, rng.STREAM_ANOMALY, draw), axis=-1)
             for draw in range(4)]
    return np.concatenate(words, axis=-1)


def choose_kinds(words: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """Indices into KINDS for uniform words, by cumulative weights."""
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
    u = rng.to_uniform(words).astype(np.float64) * cumulative[-1]
    return np.minimum(np.searchsorted(cumulative, u, side="right"), len(weights) - 1)


def gaussian_noise(seed: int, epoch: int, indices: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """(n, width) float32: row i holds ``counts[i]`` standard normal values (Box-Muller on Philox words, the
    cosines of all blocks first, then the sines), zeros after; pure in the key (seed, epoch, index)."""
    blocks = (np.asarray(counts) + 1) // 2
    w = rng.draw_words(seed, epoch, np.asarray(indices)[:, None], rng.STREAM_ANOMALY_NOISE,
                       np.arange(max(1, int(blocks.max(initial=1))))[None, :])
    u1 = 1.0 - rng.to_uniform(w[0]).astype(np.float64)  # (0, 1]: log is finite
    u2 = rng.to_uniform(w[1]).astype(np.float64)
    position = np.arange(width)[None, :]
    second = position >= blocks[:, None]
    block = np.clip(np.where(second, position - blocks[:, None], position), 0, u1.shape[1] - 1)
    radius = np.sqrt(-2.0 * np.log(np.take_along_axis(u1, block, 1)))
    angle = 2 * np.pi * np.take_along_axis(u2, block, 1)
    normal = radius * np.where(second, np.sin(angle), np.cos(angle))
    return np.where(position < np.asarray(counts)[:, None], normal, 0.0).astype(np.float32)


def dilate(masks: torch.Tensor, times: int) -> torch.Tensor:
    """Binary 3x3 dilation of (n, h, w) bool masks, ``times`` times."""
    x = masks[:, None].float()
    for _ in range(times):
        x = F.max_pool2d(x, 3, stride=1, padding=1)
    return x[:, 0] > 0


def jitter_factor(amount: np.ndarray) -> np.ndarray:
    """``amount`` in [0, 1) -> a factor in [0.5, 1.5) away from 1 by at least 0.2."""
    factor = 0.5 + amount.astype(np.float64)
    return np.where(np.abs(factor - 1.0) < 0.2, np.where(factor >= 1.0, 1.2, 0.8), factor)


def colour_jitter(pixels: torch.Tensor, choice: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor):
    """One of three jitters (per sample ``choice``: brightness, contrast about the patch ``mean``,
    saturation about the pixel's grey) of (n, 3, H, W) float 0-255 pixels; per-sample (n,) parameters."""
    f, m = factor.view(-1, 1, 1, 1), mean.view(-1, 1, 1, 1)
    grey = pixels.mean(dim=1, keepdim=True)
    choice = choice.view(-1, 1, 1, 1)
    return torch.where(choice == 0, pixels * f,
                       torch.where(choice == 1, (pixels - m) * f + m, (pixels - grey) * f + grey))


def gather_pixels(images: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) images sampled at per-sample integer coordinates (n, h, w), clamped into the image."""
    n, c, height, width = images.shape
    flat = (y.clamp(0, height - 1) * width + x.clamp(0, width - 1)).expand(n, -1, -1)
    h, w = flat.shape[-2:]
    return images.flatten(2).gather(2, flat.reshape(n, 1, -1).expand(n, c, -1)).view(n, c, h, w)


def window_mean(window: torch.Tensor, in_box: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """(n,) mean over channels and the box of (n, 3, S, S) windows whose box is ``in_box`` (n, S, S)."""
    return (window * in_box[:, None]).sum(dim=(1, 2, 3)) / (3 * side.float() ** 2)


def box_blur(window: torch.Tensor, side: torch.Tensor, radius: torch.Tensor, max_radius: int = 3) -> torch.Tensor:
    """Per-sample box blur of side 2 radius + 1 of (n, 3, S, S) windows whose box is [0, side)^2,
    replicate padding at the box's edges (separable: rows then columns, coordinates clamped into the box)."""
    n, _, size, _ = window.shape
    ys = torch.arange(size, device=window.device).view(1, -1, 1).expand(n, -1, size)
    xs = torch.arange(size, device=window.device).view(1, 1, -1).expand(n, size, -1)
    last, r = side.view(-1, 1, 1) - 1, radius.view(-1, 1, 1, 1)
    out = window
    for along_x in (True, False):
        total = torch.zeros_like(out)
        for d in range(-max_radius, max_radius + 1):
            if along_x:
                shifted = gather_pixels(out, ys, torch.minimum((xs + d).clamp(min=0), last))
            else:
                shifted = gather_pixels(out, torch.minimum((ys + d).clamp(min=0), last), xs)
            total = total + shifted * (abs(d) <= r).float()
        out = total / (2 * r + 1).float()
    return out


class AnomalySynthesizer:
    """Applies an ``AnomalyMix`` to batches of normal images; masks rendered on ``device``'s renderer.

    Every per-sample decision is drawn on the host (NumPy, vectorised over the batch) and goes to the
    images' device in one copy (``augment.augmenter.upload``); the defects themselves are batched tensor
    ops in the full image frame (a pixel's source coordinate through the paste, flips and rotation), so a
    batch costs no per-sample host loop. Fractal masks: one renderer call per distinct patch side.
    """

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

    def mask_sides(self, words: np.ndarray, height: int, width: int) -> np.ndarray:
        low, high = self.mix.patch_side
        side = rng.to_range(words, low, high).astype(np.float64) * min(height, width)
        side = np.maximum(MIN_MASK_SIDE, np.round(side / MASK_QUANTUM).astype(np.int64) * MASK_QUANTUM)
        return np.minimum(side, min(height, width))

    def plan(self, words: np.ndarray, height: int, width: int, batch: int) -> dict[str, np.ndarray]:
        """Every per-sample parameter of the anomalous samples (host, vectorised over them)."""
        u = rng.to_uniform(words).astype(np.float64)
        chosen = np.flatnonzero(u[:, W_ANOMALOUS] < self.mix.anomaly_p)
        w, u = words[chosen], u[chosen]
        kind = choose_kinds(w[:, W_KIND], self.mix.weights)
        scar = kind == KINDS.index("scar")
        # A scar's window holds its rectangle at any rotation: side = the diagonal (W_SIDE draws its height).
        scale = min(height, width) / 256.0
        scar_w = np.maximum(1, np.round(scale * _in(u[:, W_SCAR_ASPECT], self.mix.scar_width))).astype(np.int64)
        scar_h = np.maximum(1, np.round(scale * _in(u[:, W_SIDE], self.mix.scar_height))).astype(np.int64)
        scar_side = np.minimum(np.ceil(np.hypot(scar_w, scar_h)).astype(np.int64) + 1, min(height, width))
        side = np.where(scar, scar_side, self.mask_sides(w[:, W_SIDE], height, width))
        band_y, band_x = int(0.1 * height), int(0.1 * width)
        span_y = np.maximum(0, int(0.9 * height) - side - band_y)
        span_x = np.maximum(0, int(0.9 * width) - side - band_x)
        theta = np.radians(np.where(scar, _in(u[:, W_ANGLE], self.mix.scar_rotation),
                                    _in(u[:, W_ANGLE], self.mix.rotation)))
        amount = u[:, W_JITTER_AMOUNT]
        noisy = ((kind == KINDS.index("fractal_paste")) & (u[:, W_NOISE] < self.mix.noise_p)
                 & (self.mix.noise_amplitude > 0))
        signs = np.where(u[:, [W_FLIP_H, W_FLIP_V, W_SPARE]] < 0.5, 1.0, -1.0)
        return {
            "chosen": chosen, "kind": kind, "side": side, "noisy": noisy,
            "dst_y": (u[:, W_DST_Y] * (height - side + 1)).astype(np.int64),
            "dst_x": (u[:, W_DST_X] * (width - side + 1)).astype(np.int64),
            "src_y": np.minimum(band_y + (u[:, W_SRC_Y] * (span_y + 1)).astype(np.int64), height - side),
            "src_x": np.minimum(band_x + (u[:, W_SRC_X] * (span_x + 1)).astype(np.int64), width - side),
            "source": np.where(scar, chosen, rng.to_int(w[:, W_SOURCE], batch)),  # CutPaste: the same image
            "jitter": rng.to_int(w[:, W_JITTER], 3), "factor": jitter_factor(amount.astype(np.float32)),
            "flip_h": u[:, W_FLIP_H] < 0.5, "flip_v": u[:, W_FLIP_V] < 0.5,
            "cos": np.cos(theta).astype(np.float32), "sin": np.sin(theta).astype(np.float32),
            "scar_w": np.minimum(scar_w, side), "scar_h": np.minimum(scar_h, side),
            "blur_radius": 1 + (amount * 3).astype(np.int64),
            "shift": (20 + 40 * amount)[:, None] * signs,
        }

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
        plan = self.plan(sample_words(self.seed, epoch, indices), height, width, batch)
        masks = torch.zeros(batch, height, width, dtype=torch.bool, device=images.device)
        if len(plan["chosen"]) == 0:
            return images.clone(), masks
        fractal = self.placed_fractal_masks(plan, indices, epoch, images.device)
        noise_rows = np.flatnonzero(plan["noisy"])
        width_noise = 3 * int(plan["side"].max()) ** 2
        noise = gaussian_noise(self.seed, epoch, indices[plan["chosen"][noise_rows]],
                               3 * plan["side"][noise_rows] ** 2, width_noise) * self.mix.noise_amplitude
        noise_row = np.full(len(plan["chosen"]), -1)
        noise_row[noise_rows] = np.arange(len(noise_rows))
        names = ("chosen", "kind", "side", "dst_y", "dst_x", "src_y", "src_x", "source", "jitter", "factor",
                 "flip_h", "flip_v", "cos", "sin", "scar_w", "scar_h", "blur_radius", "shift")
        staged = upload([plan[n] for n in names] + [noise_row, noise.reshape(-1)], images.device)
        p = dict(zip(names, staged[:-2], strict=True))
        ints = {n: p[n].long() for n in names if n not in ("factor", "cos", "sin", "shift")}
        noise = staged[-1].float().view(len(noise_rows), width_noise) if len(noise_rows) else None
        # Every defect lives in the S x S window at its destination (S the batch's largest side): work there,
        # on a canvas padded by S so that each window's pixels are distinct positions.
        size = int(plan["side"].max())
        canvas = F.pad(images.index_select(0, ints["chosen"]), (0, size, 0, size))
        local = torch.arange(size, device=images.device)
        position = ((ints["dst_y"].view(-1, 1, 1) + local.view(1, -1, 1)) * (width + size)
                    + ints["dst_x"].view(-1, 1, 1) + local.view(1, 1, -1))  # (n, S, S) into the canvas
        target = canvas.flatten(2).gather(2, position.flatten(1)[:, None].expand(-1, 3, -1)).view(-1, 3, size, size)
        content, region = self.defects(images, target.float(), ints, p, fractal, staged[-2].long(), noise,
                                       set(plan["kind"].tolist()))
        content = content.round().clamp(0, 255).to(torch.uint8)
        changed = region & (content != target).any(dim=1)
        written = torch.where(changed[:, None], content, target)
        canvas = canvas.flatten(2).scatter(2, position.flatten(1)[:, None].expand(-1, 3, -1), written.flatten(2))
        out = images.clone()
        out.index_copy_(0, ints["chosen"], canvas.view(-1, 3, height + size, width + size)[..., :height, :width])
        flags = torch.zeros(len(plan["chosen"]), (height + size) * (width + size), dtype=torch.uint8,
                            device=images.device)
        flags = flags.scatter(1, position.flatten(1), changed.flatten(1).to(torch.uint8))
        masks.index_copy_(0, ints["chosen"], flags.view(-1, height + size, width + size)[:, :height, :width] > 0)
        return out, masks

    def placed_fractal_masks(self, plan, indices: np.ndarray, epoch: int, device) -> torch.Tensor:
        """(n, S, S) dilated fractal masks of the anomalous samples (S the largest side, zero-padded);
        one renderer call per distinct side, scars get none."""
        sides, kinds = plan["side"], plan["kind"]
        biggest = int(sides.max())
        out = torch.zeros(len(sides), biggest, biggest, dtype=torch.bool, device=device)
        scar = KINDS.index("scar")
        for side in np.unique(sides[kinds != scar]):
            rows = np.flatnonzero((sides == side) & (kinds != scar))
            rendered = dilate(self.fractal_masks(int(side), indices[plan["chosen"][rows]], epoch).to(device),
                              self.mix.dilation)
            padded = F.pad(rendered, (0, biggest - int(side), 0, biggest - int(side)))
            out.index_copy_(0, torch.as_tensor(rows, device=device), padded)
        return out

    def defects(self, images, target, ints, p, fractal, noise_row, noise, kinds: set):
        """(content (n, 3, S, S) float, region (n, S, S) bool) of the anomalous samples in their windows;
        ``target`` (n, 3, S, S) the windows' current pixels, ``kinds`` the kind indices present (the host
        knows them: absent kinds cost nothing)."""
        device = images.device
        n, _, size, _ = target.shape
        s = ints["side"].view(n, 1, 1)
        ly = torch.arange(size, device=device).view(1, -1, 1)
        lx = torch.arange(size, device=device).view(1, 1, -1)
        in_box = (ly < s) & (lx < s)
        # Rotation about the patch centre, nearest, as affine_grid + grid_sample (align_corners=False).
        sf = s.float()
        xn, yn = (2 * lx.float() + 1) / sf - 1, (2 * ly.float() + 1) / sf - 1
        c, sn = p["cos"].float().view(n, 1, 1), p["sin"].float().view(n, 1, 1)
        ix = torch.round(((c * xn - sn * yn + 1) * sf - 1) / 2).long()
        iy = torch.round(((sn * xn + c * yn + 1) * sf - 1) / 2).long()
        inside = (ix >= 0) & (ix < s) & (iy >= 0) & (iy < s)
        kind = ints["kind"].view(n, 1, 1)
        content, region = target, torch.zeros_like(in_box)
        fractal_here = fractal[:, :size, :size] & in_box
        if kinds & {KINDS.index("fractal_paste"), KINDS.index("scar")}:
            # The flipped, jittered crop of the source image at the rotated coordinate.
            px = torch.where(ints["flip_h"].bool().view(n, 1, 1), s - 1 - ix, ix)
            py = torch.where(ints["flip_v"].bool().view(n, 1, 1), s - 1 - iy, iy)
            source = images.index_select(0, ints["source"]).float()
            src_y, src_x = ints["src_y"].view(n, 1, 1), ints["src_x"].view(n, 1, 1)
            crop_mean = window_mean(gather_pixels(source, src_y + ly, src_x + lx), in_box, ints["side"])
            pasted = gather_pixels(source, src_y + py, src_x + px)
            pasted = colour_jitter(pasted, ints["jitter"], p["factor"].float(), crop_mean)
            pasted = pasted * inside[:, None]  # grid_sample's zero padding outside the patch
            if noise is not None:
                where = (torch.arange(3, device=device).view(1, 3, 1, 1) * s.view(n, 1, 1, 1) ** 2
                         + (ly * s + lx)[:, None]).clamp(0, noise.shape[1] - 1)
                values = noise.index_select(0, noise_row.clamp(min=0)).gather(1, where.flatten(1)).view_as(pasted)
                pasted = pasted + values * (noise_row >= 0).view(n, 1, 1, 1)
            # The scar: the centred scar_w x scar_h rectangle of the (rotated) source window.
            scar_w, scar_h = ints["scar_w"].view(n, 1, 1), ints["scar_h"].view(n, 1, 1)
            left, top = (s - scar_w) // 2, (s - scar_h) // 2
            scar_region = (inside & (ix >= left) & (ix < left + scar_w) & (iy >= top) & (iy < top + scar_h)
                           & in_box)
            pasting = (kind == KINDS.index("fractal_paste")) | (kind == KINDS.index("scar"))
            content = torch.where(pasting[:, None], pasted, content)
            region = torch.where(kind == KINDS.index("scar"), scar_region,
                                 torch.where(kind == KINDS.index("fractal_paste"), fractal_here & inside, region))
        # Local kinds: the window's own box, blurred, contrast-changed or colour-shifted, under the fractal mask.
        local = {"blur": lambda: box_blur(target, ints["side"], ints["blur_radius"]),
                 "contrast": lambda: colour_jitter(target, torch.ones_like(ints["jitter"]), p["factor"].float(),
                                                   window_mean(target, in_box, ints["side"])),
                 "colour": lambda: target + p["shift"].float().view(n, 3, 1, 1)}
        for name, make in local.items():
            if KINDS.index(name) in kinds:
                mine = kind == KINDS.index(name)
                content = torch.where(mine[:, None], make(), content)
                region = torch.where(mine, fractal_here, region)
        return content, region
