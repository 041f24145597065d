"""Every random choice of the augmentation, drawn on the host from ``rng.py`` (Philox, counter-based).

Per-sample draws are a pure function of ``(seed, epoch, global sample index)``; the batch mix of a
step is a pure function of ``(seed, epoch, step, rank)``. The draws are a few words per sample, so
they are made on the host in NumPy: the device never waits on them, and grouping samples by op
needs no device-to-host sync. Their semantics follow torchvision's ``get_params``/``make_params``.

Counter layout, stream ``STREAM_AUGMENT`` (index = global sample index):

| slot | draw    | words                                   | for                             |
|------|---------|-----------------------------------------|---------------------------------|
| 0    | 0..9    | area u, log-aspect u, top, left         | RandomResizedCrop, 10 attempts  |
| 1    | 0       | flip u, sub-policy, fire u 1, fire u 2  | hflip, AutoAugment              |
| 1    | 1       | sign 1, sign 2                          | AutoAugment signed magnitudes   |
| 2    | 0       | apply u                                 | RandomErasing                   |
| 2    | 1..10   | area u, log-aspect u, top, left         | RandomErasing, 10 attempts      |

Stream ``STREAM_MIX`` (index = step, lane = rank): slot 0 draw 0 = (mix u, CutMix u, lambda u),
slot 0 draw 1 = (box centre row, column), slot 1 draws 0.. = one sort key per batch position
(the partner permutation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fractal_pretrain import rng
from fractal_pretrain.augment.config import AugmentConfig
from fractal_pretrain.augment.policy import IMAGENET_POLICY

ATTEMPTS = 10  # torchvision's tries for RandomResizedCrop and RandomErasing
SLOT_CROP, SLOT_FLIP_AA, SLOT_ERASE = 0, 1, 2
MAX_RANK = 1 << 16  # the rank is the lane of the mix counter


@dataclass(frozen=True)
class SampleParams:
    """Per-sample choices of one batch, host arrays of length N (the batch)."""

    crop: np.ndarray  # (N, 4) int64: top, left, height, width of the crop in the source image
    hflip: np.ndarray  # (N,) bool
    policy: np.ndarray  # (N,) int64 AutoAugment sub-policy, -1: no AutoAugment
    fire: np.ndarray  # (N, 2) bool: the sub-policy's first / second op is applied
    negate: np.ndarray  # (N, 2) bool: that op's signed magnitude is negated
    erase: np.ndarray  # (N, 4) int64: top, left, height, width of the erased box; height 0: none


@dataclass(frozen=True)
class MixParams:
    """The batch mix of one (step, rank)."""

    mode: str  # "none" | "cutmix" | "mixup"
    lam: float  # weight of each sample's own image and label (CutMix: from the clipped box)
    partner: np.ndarray  # (N,) int64: the batch position mixed into each position
    box: tuple[int, int, int, int]  # CutMix: rows [top, bottom), columns [left, right) from the partner


def _words(seed: int, epoch: int, indices: np.ndarray, slot: int, draws: int) -> np.ndarray:
    """(N, draws, 4) uint32 words of STREAM_AUGMENT for each sample's ``slot``."""
    draw = np.arange(draws, dtype=np.uint32)[None, :]
    words = rng.draw_words(seed, epoch, indices[:, None], rng.STREAM_AUGMENT, draw, slot=slot)
    return np.stack(words, axis=-1)


def _uniform(word: np.ndarray, low: float, high: float) -> np.ndarray:
    # torch's uniform_(low, high) is low + u * (high - low); done in float64 like torchvision's .item() math
    return low + rng.to_uniform(word).astype(np.float64) * (high - low)


def _boxes(words: np.ndarray, height: int, width: int, scale, ratio, aspect_is_w_over_h: bool):
    """torchvision's 10-attempt box search, vectorised: (found, top, left, h, w) per sample.

    RandomResizedCrop takes w = sqrt(area * aspect) and accepts 0 < w <= W, 0 < h <= H;
    RandomErasing takes h = sqrt(area * aspect) and accepts h < H, w < W.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * _uniform(words[..., 0], scale[0], scale[1])
    aspect = np.exp(_uniform(words[..., 1], log_ratio[0], log_ratio[1]))
    long_side = np.round(np.sqrt(target * aspect)).astype(np.int64)
    short_side = np.round(np.sqrt(target / aspect)).astype(np.int64)
    if aspect_is_w_over_h:
        w, h = long_side, short_side
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    else:
        h, w = long_side, short_side
        ok = (h < height) & (w < width)
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(first))
    h, w = h[rows, first], w[rows, first]
    top = rng.to_int(words[rows, first, 2], np.maximum(height - h + 1, 1))
    left = rng.to_int(words[rows, first, 3], np.maximum(width - w + 1, 1))
    return ok.any(axis=1), top, left, h, w


def _crop_boxes(cfg: AugmentConfig, seed, epoch, indices, height, width) -> np.ndarray:
    n = len(indices)
    if not (cfg.enabled and cfg.crop):
        return np.tile(np.array([0, 0, height, width], dtype=np.int64), (n, 1))
    found, top, left, h, w = _boxes(_words(seed, epoch, indices, SLOT_CROP, ATTEMPTS), height, width,
                                    cfg.crop_scale, cfg.crop_ratio, aspect_is_w_over_h=True)
    # torchvision's fallback: a central crop clipped to the ratio range
    in_ratio = width / height
    if in_ratio < min(cfg.crop_ratio):
        fw, fh = width, int(round(width / min(cfg.crop_ratio)))
    elif in_ratio > max(cfg.crop_ratio):
        fh, fw = height, int(round(height * max(cfg.crop_ratio)))
    else:
        fw, fh = width, height
    top = np.where(found, top, (height - fh) // 2)
    left = np.where(found, left, (width - fw) // 2)
    return np.stack([top, left, np.where(found, h, fh), np.where(found, w, fw)], axis=1).astype(np.int64)


def sample_params(cfg: AugmentConfig, seed: int, epoch: int, indices, height: int, width: int) -> SampleParams:
    """All per-sample draws for source images of ``height x width`` (output side ``cfg.size``)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(indices)
    crop = _crop_boxes(cfg, seed, epoch, indices, height, width)
    choice = _words(seed, epoch, indices, SLOT_FLIP_AA, 2)
    hflip = cfg.enabled & (rng.to_uniform(choice[:, 0, 0]) < cfg.hflip_p)
    if cfg.enabled and cfg.autoaugment == "imagenet":
        policy = rng.to_int(choice[:, 0, 1], len(IMAGENET_POLICY))
        probs = np.array([[step[1] for step in sub] for sub in IMAGENET_POLICY])[policy]
        fire = rng.to_uniform(choice[:, 0, 2:4]).astype(np.float64) <= probs
        negate = rng.to_int(choice[:, 1, 0:2], 2) == 0  # torchvision: sign 0 negates
    else:
        policy = np.full(n, -1, dtype=np.int64)
        fire = negate = np.zeros((n, 2), dtype=bool)
    erase = np.zeros((n, 4), dtype=np.int64)
    if cfg.enabled and cfg.erase_p > 0:
        words = _words(seed, epoch, indices, SLOT_ERASE, 1 + ATTEMPTS)
        found, top, left, h, w = _boxes(words[:, 1:], cfg.size, cfg.size, cfg.erase_scale, cfg.erase_ratio,
                                        aspect_is_w_over_h=False)
        apply = found & (rng.to_uniform(words[:, 0, 0]) < cfg.erase_p)
        erase = np.where(apply[:, None], np.stack([top, left, h, w], axis=1), 0).astype(np.int64)
    return SampleParams(crop=crop, hflip=np.asarray(hflip, dtype=bool), policy=policy, fire=fire,
                        negate=negate, erase=erase)


def _beta(u: float, alpha: float) -> float:
    """Beta(alpha, alpha) by inverting its CDF at u (exact U(0, 1) for alpha = 1)."""
    if alpha == 1.0:
        return u
    from scipy.special import betaincinv

    return float(betaincinv(alpha, alpha, u))


def mix_params(cfg: AugmentConfig, seed: int, epoch: int, step: int, rank: int, batch: int,
               height: int, width: int) -> MixParams:
    """The mix of one rank's batch at one step (OFDB-4AD's ``Cutmix_Mixup``, one lambda per batch)."""
    identity = np.arange(batch, dtype=np.int64)
    if not cfg.mixing:
        return MixParams("none", 1.0, identity, (0, 0, 0, 0))
    if not 0 <= rank < MAX_RANK:
        raise ValueError(f"rank={rank}: must be in [0, {MAX_RANK})")

    def words(slot: int, draws: int) -> np.ndarray:
        draw = np.arange(draws, dtype=np.uint32)
        return np.stack(rng.draw_words(seed, epoch, step, rng.STREAM_MIX, draw, slot=slot, lane=rank), axis=-1)

    head = words(0, 2)
    if float(rng.to_uniform(head[0, 0])) >= cfg.mix_p:
        return MixParams("none", 1.0, identity, (0, 0, 0, 0))
    keys = words(1, -(-batch // 4)).reshape(-1)[:batch]
    partner = np.argsort(keys, kind="stable").astype(np.int64)
    lam = _beta(float(rng.to_uniform(head[0, 2])), cfg.mix_alpha)
    if float(rng.to_uniform(head[0, 1])) >= cfg.cutmix_p:
        return MixParams("mixup", lam, partner, (0, 0, 0, 0))
    cy, cx = int(rng.to_int(head[1, 0], height)), int(rng.to_int(head[1, 1], width))
    box, lam = cutmix_box(lam, cy, cx, height, width)
    return MixParams("cutmix", lam, partner, box)


def cutmix_box(lam: float, cy: int, cx: int, height: int, width: int) -> tuple[tuple[int, int, int, int], float]:
    """OFDB-4AD's ``rand_bbox`` (and torchvision's CutMix): a box of side sqrt(1 - lam) of the image centred at
    (cy, cx), clipped; returns ((top, bottom, left, right), lambda recomputed from the clipped area)."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    top, bottom = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    left, right = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / (height * width)
