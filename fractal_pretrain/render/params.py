"""Per-sample and per-fractal random parameters: the "plan" of a batch, in NumPy.

Mirrors ``kernels/plan.cu`` operation for operation in float32, so both renderers build the same
systems, windows, masks and colours from the same keys. A batch of B samples has ``slots`` fractal
*items* per sample (1 for single-object recipes, ``objects[1]`` otherwise); item ``b * slots + s`` is
slot s of sample b. Items beyond a sample's object count are inactive.

Every draw comes from ``rng.draw_words(seed, epoch, index, stream, draw, slot)``; the draw numbers
below (``DRAW_*``) are part of the format and shared with the CUDA side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fractal_pretrain import rng
from fractal_pretrain.ifs.bank import SystemBank
from fractal_pretrain.ifs.sample import MAX_MAPS
from fractal_pretrain.recipes import FLIP_BITS, Recipe

F32 = np.float32

# Draw numbers of the sample stream.
DRAW_SAMPLE_MAIN = 0  # object count, blur flag, blur sigma, plasma decay
DRAW_SAMPLE_CORNERS = 1  # plasma corner values
DRAW_SAMPLE_BG_HS = 2  # plasma hue/saturation gain and offset
DRAW_SAMPLE_BG_V = 3  # plasma value gain and offset
# Draw numbers of the item stream; jitter tries use DRAW_ITEM_JITTER + try.
DRAW_ITEM_SYSTEM = 0  # class, system, FractalDB weight vector
DRAW_ITEM_JITTER = 1
DRAW_ITEM_WINDOW = 20  # centre shift x, y; scale x, y
DRAW_ITEM_LOOK = 21  # patch mask, flips, hue shift, saturation
DRAW_ITEM_PLACE = 22  # value, object side, top, left

PLASMA_DECAY = (0.4, 0.8)  # Anderson's diamond-square roughness decay
PLASMA_HUE_GAIN, PLASMA_HUE_OFFSET = (0.25, 1.0), (0.0, 1.0)
PLASMA_SAT_GAIN, PLASMA_SAT_OFFSET = (0.1, 0.3), (0.4, 0.6)
PLASMA_VAL_GAIN, PLASMA_VAL_OFFSET = (0.3, 0.6), (0.4, 0.6)
HUE_SHIFT = (0.0, 255.0)
SVD_JITTER = (-0.5, 0.5)  # Anderson's svd jitter: rotation angle (rad) and translation shift range
PATCH_CENTRE_ONLY = 1 << 4  # mask of the centre cell alone: stamps nothing beyond the point itself

# FractalDB's 25 parameter-weight vectors (weights_0.4.csv): parameter a x {0.2, 0.6, 1.0, 1.4, 1.8},
# then each of b..f x {0.2, 0.6, 1.4, 1.8}. Parameters a b c d e f live at these flat positions of a
# map row [a b e | c d f].
FRACTALDB_PARAM_POSITION = (0, 1, 3, 4, 2, 5)
FRACTALDB_WEIGHTS = tuple(
    [(0, w) for w in (0.2, 0.6, 1.0, 1.4, 1.8)]
    + [(p, w) for p in range(1, 6) for w in (0.2, 0.6, 1.4, 1.8)]
)


def slots_per_sample(recipe: Recipe) -> int:
    return recipe.objects[1] if recipe.multi_object else 1


def object_size(recipe: Recipe, size: int) -> int:
    """Side of one rendered fractal: the image side, or half of it for pasted objects (Anderson's
    multi-instance cache); two-view recipes render at the image side and resize per view (ssfractal)."""
    return size // 2 if recipe.multi_object and not recipe.views else size


# Two-view recipes: view v of sample i draws its look from the key index + (v + 1) * VIEW_KEY_STRIDE, a key no
# sample index reaches (they stay below the stride), so views never share draws with any sample or each other.
VIEW_KEY_STRIDE = 1 << 48


def view_keys(index: np.ndarray, views: int) -> np.ndarray:
    """Keys of the views' canvases, view-major: (views * B,) int64 = all first views, then all second views."""
    index = np.asarray(index, dtype=np.int64)
    return np.concatenate([index + (v + 1) * VIEW_KEY_STRIDE for v in range(views)])


# ItemPlan fields a view draws for itself; every other field (system, jitter, window, patch mask, hence the
# chaos game and the density image) is the sample's fractal, shared by its views.
VIEW_ITEM_FIELDS = ("flips", "hue_shift", "sat8", "val8", "side", "top", "left")


def plan_views(recipe: Recipe, bank: SystemBank, size: int, seed: int, epoch: int, index: np.ndarray):
    """(fractal SamplePlan (B), view SamplePlan (V*B), view ItemPlan (V*B)) of a two-view recipe.

    The fractal of sample i is planned from its own key; the views' canvases (plasma, blur) and looks
    (flips, colours, size, position) from the view keys. View items keep the sample's index and slot 0,
    so both views run the same chaos game: identical points, identical density.
    """
    samples = plan_samples(recipe, seed, epoch, index)
    fractal = plan_items(recipe, bank, size, seed, epoch, samples)
    view_samples = plan_samples(recipe, seed, epoch, view_keys(index, recipe.views))
    looks = plan_items(recipe, bank, size, seed, epoch, view_samples)
    merged = {k: np.concatenate([v] * recipe.views) for k, v in vars(fractal).items()}
    merged.update({k: getattr(looks, k) for k in VIEW_ITEM_FIELDS})
    return samples, view_samples, ItemPlan(**merged)


@dataclass
class SamplePlan:
    """Per-sample draws, arrays of length B."""

    index: np.ndarray  # int64 global sample index
    label: np.ndarray  # int64 class of the image (multi-hot recipes: -1)
    num_objects: np.ndarray  # int64
    blur: np.ndarray  # bool
    blur_k0: np.ndarray  # float32 centre weight of the normalised 1-D blur kernel
    blur_k1: np.ndarray  # float32 side weight
    blur_sigma: np.ndarray  # float32
    decay: np.ndarray  # float32 plasma decay factor exp(-d)
    corners: np.ndarray  # float32 (B, 4)
    bg_hsv: np.ndarray  # float32 (B, 6): hue gain*255, hue offset*255, sat .., val ..


@dataclass
class ItemPlan:
    """Per-fractal draws, arrays of length I = B * slots."""

    index: np.ndarray  # int64 global sample index of the item
    slot: np.ndarray  # int64 object slot within its sample
    active: np.ndarray  # bool
    system: np.ndarray  # int64 bank index
    object_class: np.ndarray  # int64 class of the system
    maps: np.ndarray  # float32 (I, MAX_MAPS, 6): rows [a b e c d f] after jitter
    num_maps: np.ndarray  # int64
    cum: np.ndarray  # float32 (I, MAX_MAPS) cumulative map probabilities
    start: np.ndarray  # float32 (I, 2) fixed point of map 0
    jitter_try: np.ndarray  # int64: accepted basic-jitter try, -1 if none; FractalDB weight vector
    shift: np.ndarray  # float32 (I, 2) window centre shift, fraction of the extent
    scale: np.ndarray  # float32 (I, 2) window size, fraction of the extent
    mask: np.ndarray  # int64 3x3 patch mask bits (bit 3*dr + dc)
    flips: np.ndarray  # int64 bits: 1 transpose, 2 flip rows, 4 flip columns
    hue_shift: np.ndarray  # float32
    sat8: np.ndarray  # int64
    val8: np.ndarray  # int64
    side: np.ndarray  # int64 pasted object side (multi-object)
    top: np.ndarray  # int64
    left: np.ndarray  # int64


def exp_neg(x: np.ndarray) -> np.ndarray:
    """exp(-x) for 0 <= x <= 3 in float32, by a fixed Horner series (same bits as the CUDA side)."""
    z = -(np.asarray(x, dtype=F32) * F32(0.25))
    p = np.ones_like(z)
    for k in range(10, 0, -1):
        p = F32(1.0) + (z * p) * F32(1.0 / k)
    p = p * p
    return p * p


def plasma_draws(seed: int, epoch: int, index: np.ndarray, main: np.ndarray) -> dict[str, np.ndarray]:
    """A sample's plasma background draws (decay, corners, bg_hsv): the IFS and Mandelbulb plans share them.

    ``main`` is the sample's DRAW_SAMPLE_MAIN words; its word 3 is the decay.
    """
    corners = np.stack(rng.to_uniform(np.stack(
        rng.draw_words(seed, epoch, index, rng.STREAM_SAMPLE, DRAW_SAMPLE_CORNERS)))).T
    hs = rng.draw_words(seed, epoch, index, rng.STREAM_SAMPLE, DRAW_SAMPLE_BG_HS)
    v = rng.draw_words(seed, epoch, index, rng.STREAM_SAMPLE, DRAW_SAMPLE_BG_V)
    gains = [
        rng.to_range(hs[0], *PLASMA_HUE_GAIN), rng.to_range(hs[1], *PLASMA_HUE_OFFSET),
        rng.to_range(hs[2], *PLASMA_SAT_GAIN), rng.to_range(hs[3], *PLASMA_SAT_OFFSET),
        rng.to_range(v[0], *PLASMA_VAL_GAIN), rng.to_range(v[1], *PLASMA_VAL_OFFSET),
    ]
    return dict(
        decay=exp_neg(rng.to_range(main[3], *PLASMA_DECAY)),
        corners=corners.astype(F32),
        bg_hsv=np.stack([g * F32(255.0) for g in gains], axis=1),
    )


def plan_samples(recipe: Recipe, seed: int, epoch: int, index: np.ndarray) -> SamplePlan:
    index = np.asarray(index, dtype=np.int64)
    main = rng.draw_words(seed, epoch, index, rng.STREAM_SAMPLE, DRAW_SAMPLE_MAIN)
    lo, hi = recipe.objects
    num_objects = lo + rng.to_int(main[0], hi - lo + 1)
    blur = rng.to_uniform(main[1]) < F32(recipe.blur_p)
    sigma = rng.to_range(main[2], *recipe.blur_sigma)
    inv = F32(1.0) / ((sigma * sigma) * F32(2.0))
    w1 = exp_neg(inv)
    norm = (F32(1.0) + w1) + w1
    label = index % recipe.num_classes if not recipe.multi_label else np.full_like(index, -1)
    return SamplePlan(
        index=index,
        label=label,
        num_objects=num_objects,
        blur=blur,
        blur_k0=F32(1.0) / norm,
        blur_k1=w1 / norm,
        blur_sigma=sigma,
        **plasma_draws(seed, epoch, index, main),
    )


def _singular_value_too_big(row: np.ndarray) -> np.ndarray:
    """sigma_max([[a, b], [c, d]]) > 1 from a row [a b e c d f], in float32 (closed form)."""
    a, b, c, d = row[..., 0], row[..., 1], row[..., 3], row[..., 4]
    s = ((a * a + b * b) + c * c) + d * d
    det = a * d - b * c
    disc = s * s - (F32(4.0) * det) * det
    root = np.sqrt(np.maximum(disc, F32(0.0)))
    return (s + root) * F32(0.5) > F32(1.0)


def _basic_jitter(recipe, seed, epoch, index, slot, maps, num_maps):
    """Anderson's jitter: one map's row x U(jitter_range); retried while sigma_max > 1."""
    accepted = np.full(len(index), -1, dtype=np.int64)
    rows = np.arange(len(index))
    for attempt in range(recipe.jitter_tries):
        w = rng.draw_words(seed, epoch, index, rng.STREAM_ITEM, DRAW_ITEM_JITTER + attempt, slot)
        k = rng.to_int(w[0], num_maps)
        factor = rng.to_range(w[1], *recipe.jitter_range)
        row = maps[rows, k] * factor[:, None]
        take = (accepted < 0) & ~_singular_value_too_big(row)
        maps[rows[take], k[take]] = row[take]
        accepted[take] = attempt
    return accepted


def sin_cos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of |x| <= 0.5 in float32 by fixed Horner series in x^2 (same bits as common.cuh sin_cos)."""
    x = np.asarray(x, dtype=F32)
    x2 = x * x
    s = np.ones_like(x)
    c = np.ones_like(x)
    for k in range(6, 0, -1):  # sin: terms to x^13; cos: to x^12; error < 1e-12 at 0.5
        s = F32(1.0) - (x2 * s) * F32(1.0 / ((2 * k) * (2 * k + 1)))
        c = F32(1.0) - (x2 * c) * F32(1.0 / ((2 * k - 1) * (2 * k)))
    return x * s, c


def rotate_row(row: np.ndarray, part: np.ndarray, s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """A of a row [a b e c d f] rotated: part 0 -> R A (U rotated), part 1 -> A R (V rotated, in distribution)."""
    a, b, e, cc, d, f = (row[..., i] for i in range(6))
    left = [c * a - s * cc, c * b - s * d, e, s * a + c * cc, s * b + c * d, f]
    right = [a * c + b * s, b * c - a * s, e, cc * c + d * s, d * c - cc * s, f]
    return np.stack([np.where(part == 0, lv, rv) for lv, rv in zip(left, right, strict=True)], axis=-1)


def _svd_jitter(recipe, seed, epoch, index, slot, maps, num_maps):
    """Anderson's 'svd' jitter: one map, one of its 3 parts: U or V rotated by U(-0.5, 0.5) rad (A = U S V, so
    R(t) A, or U S R(t) V, which is A R(+-t) for V = R(phi) D: the same law as A R(t)), or b + U(-0.5, 0.5)^2.
    Retried while sigma_max > 1 (only float rounding can push a rotation over; a shift never changes it)."""
    accepted = np.full(len(index), -1, dtype=np.int64)
    rows = np.arange(len(index))
    for attempt in range(recipe.jitter_tries):
        w = rng.draw_words(seed, epoch, index, rng.STREAM_ITEM, DRAW_ITEM_JITTER + attempt, slot)
        k = rng.to_int(w[0], num_maps)
        part = rng.to_int(w[1], 3)
        u, v = rng.to_range(w[2], *SVD_JITTER), rng.to_range(w[3], *SVD_JITTER)
        s, c = sin_cos(u)
        row = maps[rows, k]
        shifted = row.copy()
        shifted[:, 2] = row[:, 2] + u
        shifted[:, 5] = row[:, 5] + v
        row = np.where((part == 2)[:, None], shifted, rotate_row(row, part, s, c))
        take = (accepted < 0) & ~_singular_value_too_big(row)
        maps[rows[take], k[take]] = row[take]
        accepted[take] = attempt
    return accepted


def _fractaldb_weights(w: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """FractalDB instance: one parameter type of every map x one weight, chosen by the key."""
    choice = rng.to_int(w, len(FRACTALDB_WEIGHTS))
    table = np.array(FRACTALDB_WEIGHTS, dtype=np.float64)
    position = np.array(FRACTALDB_PARAM_POSITION)[table[choice, 0].astype(np.int64)]
    weight = table[choice, 1].astype(F32)
    rows = np.arange(len(w))
    maps[rows, :, position] = maps[rows, :, position] * weight[:, None]
    return choice


def map_cumulative(maps: np.ndarray, num_maps: np.ndarray) -> np.ndarray:
    """Cumulative probabilities proportional to |det A_i| (uniform if all are zero), float32."""
    a, b, c, d = maps[..., 0], maps[..., 1], maps[..., 3], maps[..., 4]
    det = np.abs(a * d - b * c)
    used = np.arange(MAX_MAPS)[None, :] < num_maps[:, None]
    det = np.where(used, det, F32(0.0))
    total = np.zeros(len(maps), dtype=F32)
    for i in range(MAX_MAPS):  # sequential float32 sum, as on the GPU
        total = total + det[:, i]
    degenerate = ~(total > F32(0.0)) | ~np.isfinite(total)
    det = np.where(degenerate[:, None] & used, F32(1.0), det)
    total = np.where(degenerate, num_maps.astype(F32), total)
    cum = np.zeros_like(det)
    running = np.zeros(len(maps), dtype=F32)
    for i in range(MAX_MAPS):
        running = running + det[:, i]
        cum[:, i] = running / total
    return cum


def fixed_point(row: np.ndarray) -> np.ndarray:
    """The fixed point of one map (I - A) v = b, float32; (0, 0) when singular or non-finite."""
    a, b, e, c, d, f = (row[:, i] for i in range(6))
    m = F32(1.0) - a
    n = F32(1.0) - d
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        det = m * n - b * c
        x = (n * e + b * f) / det
        y = (c * e + m * f) / det
    ok = np.isfinite(x) & np.isfinite(y)
    return np.stack([np.where(ok, x, F32(0.0)), np.where(ok, y, F32(0.0))], axis=1).astype(F32)


def plan_items(recipe: Recipe, bank: SystemBank, size: int, seed: int, epoch: int,
               samples: SamplePlan) -> ItemPlan:
    slots = slots_per_sample(recipe)
    index = np.repeat(samples.index, slots)
    slot = np.tile(np.arange(slots, dtype=np.int64), len(samples.index))
    active = slot < np.repeat(samples.num_objects, slots)
    spc = recipe.systems_per_class

    w = rng.draw_words(seed, epoch, index, rng.STREAM_ITEM, DRAW_ITEM_SYSTEM, slot)
    if recipe.object_source == "any":
        object_class = rng.to_int(w[0], recipe.num_classes)
    else:
        object_class = np.repeat(samples.label, slots)
    system = object_class * spc + rng.to_int(w[1], spc)

    maps = np.zeros((len(index), MAX_MAPS, 6), dtype=F32)
    maps[:, :, :] = bank.maps[system].reshape(len(index), MAX_MAPS, 6).astype(F32)
    num_maps = bank.num_maps[system].astype(np.int64)
    if recipe.jitter == "basic":
        jitter_try = _basic_jitter(recipe, seed, epoch, index, slot, maps, num_maps)
    elif recipe.jitter == "svd":
        jitter_try = _svd_jitter(recipe, seed, epoch, index, slot, maps, num_maps)
    elif recipe.jitter == "fractaldb":
        jitter_try = _fractaldb_weights(w[2], maps)
    else:
        jitter_try = np.full(len(index), -1, dtype=np.int64)

    win = rng.draw_words(seed, epoch, index, rng.STREAM_ITEM, DRAW_ITEM_WINDOW, slot)
    t = recipe.window_translate
    shift = np.stack([rng.to_range(win[0], -t, t), rng.to_range(win[1], -t, t)], axis=1)
    scale = np.stack([rng.to_range(win[2], *recipe.window_scale),
                      rng.to_range(win[3], *recipe.window_scale)], axis=1)

    look = rng.draw_words(seed, epoch, index, rng.STREAM_ITEM, DRAW_ITEM_LOOK, slot)
    # Never an empty mask (FractalDB's randrange(1, 512)); "none" stamps the centre cell only.
    mask = 1 + rng.to_int(look[0], 511) if recipe.patch == "image" else np.full(len(index), PATCH_CENTRE_ONLY)
    flip_bits = FLIP_BITS[recipe.flips]
    flips = (look[1].astype(np.int64) >> 29) & flip_bits
    place = rng.draw_words(seed, epoch, index, rng.STREAM_ITEM, DRAW_ITEM_PLACE, slot)
    if recipe.multi_object:
        side = np.maximum(1, (rng.to_range(place[1], *recipe.object_scale) * F32(size)).astype(np.int64))
        top = rng.to_int(place[2], size) - side // 2
        left = rng.to_int(place[3], size) - side // 2
    else:
        side = np.full(len(index), size, dtype=np.int64)
        top = left = np.zeros(len(index), dtype=np.int64)
    return ItemPlan(
        index=index,
        slot=slot,
        active=active,
        system=system,
        object_class=object_class,
        maps=maps,
        num_maps=num_maps,
        cum=map_cumulative(maps, num_maps),
        start=fixed_point(maps[:, 0]),
        jitter_try=jitter_try,
        shift=shift.astype(F32),
        scale=scale.astype(F32),
        mask=mask.astype(np.int64),
        flips=flips,
        hue_shift=rng.to_range(look[2], *HUE_SHIFT),
        sat8=(rng.to_range(look[3], *recipe.saturation) * F32(255.0)).astype(np.int64),
        val8=(rng.to_range(place[0], *recipe.value) * F32(255.0)).astype(np.int64),
        side=side,
        top=top,
        left=left,
    )
