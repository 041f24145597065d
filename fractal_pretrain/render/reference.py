"""NumPy reference renderer: the exact semantics of a fractal image, mirrored by ``kernels/*.cu``.

Per fractal item (Anderson & Farrell's generator, fractal_anchors.md section 7, with the changes below):

1. plan (``params.py``): system from the bank, jitter, window, patch mask, flips, colours.
2. chaos game: ``chains`` chains start at the fixed point of map 0 (on the attractor), run ``burn_in``
   unrecorded steps, then record points; point p = step * chains + chain is kept while
   p < num_points. If any chain meets a non-finite point the system escapes: the item records no
   point and is counted as degenerate (background only). Map choice: count of u >= cum[k].
   All arithmetic is float32 in a fixed order, so the GPU produces the same point stream.
3. window: bounding box of all recorded points, centre shifted and size scaled per axis; x -> row,
   y -> column, pixel = floor((x - lo) * (size - 1) / span); points outside are dropped.
4. histogram of points per pixel, then the 3x3 patch stamp as a correlation (identical to stamping
   every point); ``point`` patches OR each point's own mask into its pixel (binary mode only).
5. graded = count / max (float32) or binary; flips (transpose, rows, columns); HSV colour whose hue
   follows density, or grey.
6. image: the fractal over a diamond-square plasma (or black); multi-object recipes paste objects
   rendered at size // 2, bilinearly resized, in slot order; then the 3x3 Gaussian blur.

Differences from Anderson's code, on purpose: many short chains with a burn-in instead of one long
chain (same attractor, and it parallelises); a patch mask is never empty; every draw comes from the
counter-based generator in ``rng.py``.
"""

from __future__ import annotations

import numpy as np

from fractal_pretrain import rng
from fractal_pretrain.recipes import Recipe
from fractal_pretrain.render.params import F32, ItemPlan, SamplePlan

# ----------------------------------------------------------------------------- chaos game

def chaos_words(recipe: Recipe, seed: int, epoch: int, index: np.ndarray, slot: np.ndarray):
    """Random words of the chaos game: (map words, mask words or None), each (I, chains, steps)."""
    chains = recipe.chains
    steps = recipe.burn_in + -(-recipe.num_points // chains)
    per_step = 2 if recipe.patch == "point" else 1
    blocks = -(-steps * per_step // 4)
    lane = np.arange(chains, dtype=np.uint32)[None, :, None]
    draw = np.arange(blocks, dtype=np.uint32)[None, None, :]
    words = rng.draw_words(seed, epoch, index[:, None, None], rng.STREAM_CHAOS, draw,
                           slot=slot[:, None, None], lane=lane)
    flat = np.stack(words, axis=-1).reshape(len(index), chains, blocks * 4)
    if per_step == 1:
        return flat[:, :, :steps], None
    return flat[:, :, 0:2 * steps:2], flat[:, :, 1:2 * steps:2]


def chaos_game(recipe: Recipe, plan: ItemPlan, map_words: np.ndarray):
    """Point stream of every item: x, y float32 and a recorded mask, all (I, chains, steps)."""
    items, chains, steps = map_words.shape
    u = rng.to_uniform(map_words)
    k = np.zeros(u.shape, dtype=np.int64)
    for j in range(plan.cum.shape[1] - 1):  # count thresholds passed: a linear scan, as on the GPU
        used = (j < plan.num_maps - 1)[:, None, None]
        k += (used & (u >= plan.cum[:, j][:, None, None])).astype(np.int64)
    x = np.empty(u.shape, dtype=F32)
    y = np.empty(u.shape, dtype=F32)
    alive = np.ones((items, chains), dtype=bool)
    recorded = np.zeros(u.shape, dtype=bool)
    px = np.broadcast_to(plan.start[:, 0][:, None], (items, chains)).copy()
    py = np.broadcast_to(plan.start[:, 1][:, None], (items, chains)).copy()
    item = np.arange(items)[:, None]
    chain = np.arange(chains)[None, :]
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(steps):
            m = plan.maps[item, k[:, :, s]]  # (I, chains, 6)
            nx = (m[..., 0] * px + m[..., 1] * py) + m[..., 2]
            ny = (m[..., 3] * px + m[..., 4] * py) + m[..., 5]
            alive &= np.isfinite(nx) & np.isfinite(ny)
            px, py = nx, ny
            x[:, :, s], y[:, :, s] = nx, ny
            if s >= recipe.burn_in:
                point = (s - recipe.burn_in) * chains + chain
                recorded[:, :, s] = point < recipe.num_points
    # A non-finite point anywhere means the orbit escapes: the item is degenerate and records
    # nothing (finite points before the escape are astronomically far and would empty the window).
    recorded &= alive.all(axis=1)[:, None, None]
    return x, y, recorded


def bounding_box(x, y, recorded):
    """(I, 4) float32 [xmin, xmax, ymin, ymax] of recorded points and (I,) point counts."""
    big = F32(np.inf)
    xmin = np.where(recorded, x, big).min(axis=(1, 2))
    xmax = np.where(recorded, x, -big).max(axis=(1, 2))
    ymin = np.where(recorded, y, big).min(axis=(1, 2))
    ymax = np.where(recorded, y, -big).max(axis=(1, 2))
    return np.stack([xmin, xmax, ymin, ymax], axis=1), recorded.sum(axis=(1, 2))


def window(box: np.ndarray, count: np.ndarray, plan: ItemPlan, side: int):
    """Per-axis (lo, pixels per unit) of the augmented window; (I, 2) each, float32."""
    lo = np.zeros((len(box), 2), dtype=F32)
    sc = np.zeros((len(box), 2), dtype=F32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for axis in range(2):
            mn, mx = box[:, 2 * axis], box[:, 2 * axis + 1]
            extent = mx - mn
            half = (extent * plan.scale[:, axis]) * F32(0.5)
            # lo = centre - half, written so that an unshifted, unscaled window starts exactly at mn
            start = mn + ((extent * F32(0.5) + extent * plan.shift[:, axis]) - half)
            span = half + half
            pixels = F32(side - 1) / span
            bad = ~(span > F32(0.0)) | ~np.isfinite(pixels) | ~np.isfinite(start) | (count == 0)
            lo[:, axis] = np.where(bad, mn, start)
            sc[:, axis] = np.where(bad, F32(side - 1), pixels)
            lo[:, axis] = np.where(count == 0, F32(0.0), lo[:, axis])
    return lo, sc


def histogram(recipe: Recipe, x, y, recorded, lo, sc, side: int, mask_words=None):
    """Per-pixel point counts, or with 'point' patches the OR of the points' masks: (I, side, side)."""
    items = x.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        vr = (x - lo[:, 0][:, None, None]) * sc[:, 0][:, None, None]
        vc = (y - lo[:, 1][:, None, None]) * sc[:, 1][:, None, None]
    inside = recorded & (vr >= 0) & (vr < side) & (vc >= 0) & (vc < side)
    item = np.broadcast_to(np.arange(items)[:, None, None], x.shape)[inside]
    flat = (item * side + vr[inside].astype(np.int64)) * side + vc[inside].astype(np.int64)
    if mask_words is None:
        counts = np.bincount(flat, minlength=items * side * side)
        return counts.reshape(items, side, side).astype(np.uint32)
    masks = (1 + rng.to_int(mask_words[inside], 511)).astype(np.uint32)
    union = np.zeros(items * side * side, dtype=np.uint32)
    np.bitwise_or.at(union, flat, masks)
    return union.reshape(items, side, side)


def stamp(recipe: Recipe, hist: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The 3x3 patch: a point at (r, c) also lands on (r + dr - 1, c + dc - 1) for each set bit.

    Returns float32 (I, side, side) density g in [0, 1] (graded: count / max; binary: 0 or 1).
    """
    items, side, _ = hist.shape
    padded = np.zeros((items, side + 2, side + 2), dtype=np.uint32)
    padded[:, 1:-1, 1:-1] = hist
    stamped = np.zeros((items, side, side), dtype=np.uint32)
    for bit in range(9):
        dr, dc = divmod(bit, 3)
        # source pixel of target (r, c) is (r - dr + 1, c - dc + 1) -> padded (r - dr + 2, c - dc + 2)
        window_ = padded[:, 2 - dr:2 - dr + side, 2 - dc:2 - dc + side]
        if recipe.patch == "point":
            stamped |= (window_ >> np.uint32(bit)) & np.uint32(1)
        else:
            on = ((mask >> bit) & 1).astype(np.uint32)[:, None, None]
            stamped += window_ * on
    if recipe.render_mode == "binary" or recipe.patch == "point":
        return (stamped > 0).astype(F32)
    peak = stamped.reshape(items, -1).max(axis=1).astype(F32)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = stamped.astype(F32) / peak[:, None, None]
    return np.where(peak[:, None, None] > 0, g, F32(0.0)).astype(F32)


def flip(g: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Dihedral flips per item: transpose (bit 1), then flip rows (bit 2), then flip columns (bit 4)."""
    out = g.copy()
    for i, bits in enumerate(flips):
        img = out[i]
        if bits & 1:
            img = img.T
        if bits & 2:
            img = img[::-1, :]
        if bits & 4:
            img = img[:, ::-1]
        out[i] = img
    return out


# ----------------------------------------------------------------------------- colour

_HSCALE = F32(6.0 / 180.0)
_INV255 = F32(1.0 / 255.0)


def hsv_to_rgb(h8, s8, v8) -> np.ndarray:
    """OpenCV's 8-bit HSV -> RGB (hue in 2-degree units, wrapping at 180), float32: (..., 3) uint8."""
    h = np.asarray(h8).astype(F32) * _HSCALE
    h = np.where(h >= F32(6.0), h - F32(6.0), h)
    s = np.asarray(s8).astype(F32) * _INV255
    v = np.asarray(v8).astype(F32) * _INV255
    sector = np.floor(h).astype(np.int64)
    f = h - sector.astype(F32)
    p = v * (F32(1.0) - s)
    q = v * (F32(1.0) - s * f)
    t = v * (F32(1.0) - s * (F32(1.0) - f))
    tab = np.stack(np.broadcast_arrays(v, p, q, t), axis=-1)
    # (r, g, b) entries of tab = [v, p, q, t] per sector, as OpenCV's sector_data
    order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    rgb = np.take_along_axis(tab, order[sector], axis=-1)
    return np.clip(np.rint(rgb * F32(255.0)), 0, 255).astype(np.uint8)


def colorize(recipe: Recipe, g: np.ndarray, plan: ItemPlan) -> np.ndarray:
    """(I, side, side, 3) uint8 fractal colours; pixels with g == 0 are black."""
    if recipe.color:
        hue = g * F32(255.0) + plan.hue_shift[:, None, None]
        h8 = np.floor(hue).astype(np.int64) & 255
        rgb = hsv_to_rgb(h8, plan.sat8[:, None, None], plan.val8[:, None, None])
    else:
        grey = (g * F32(recipe.grey_level)).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    return np.where((g > 0)[..., None], rgb, np.uint8(0))


# ----------------------------------------------------------------------------- background

def plasma_grid_size(size: int) -> int:
    return (1 << max(1, int(np.ceil(np.log2(size))))) + 1


def plasma(seed: int, epoch: int, samples: SamplePlan, size: int) -> np.ndarray:
    """Diamond-square plasma, normalised to [0, 1]: (B, size, size) float32."""
    n = plasma_grid_size(size)
    b = len(samples.index)
    cells = np.arange(n * n, dtype=np.uint32)
    words = rng.draw_words(seed, epoch, samples.index[:, None], rng.STREAM_PLASMA, cells[None, :])[0]
    noise = (rng.to_uniform(words) * F32(2.0) - F32(1.0)).reshape(b, n, n)
    grid = np.zeros((b, n, n), dtype=F32)
    last = n - 1
    for i, (r, c) in enumerate(((0, 0), (0, last), (last, 0), (last, last))):
        grid[:, r, c] = samples.corners[:, i]
    amp = np.full(b, F32(0.5), dtype=F32)[:, None, None]
    step = last
    while step > 1:
        half = step // 2
        # diamond step: centres of squares
        tl = grid[:, 0:last:step, 0:last:step]
        tr = grid[:, 0:last:step, step::step]
        bl = grid[:, step::step, 0:last:step]
        br = grid[:, step::step, step::step]
        grid[:, half::step, half::step] = ((tl + tr) + (bl + br)) * F32(0.25) + noise[:, half::step, half::step] * amp
        # square step: edge midpoints, neighbours in the order up, left, right, down
        for r0 in (0, half):
            c0 = half - r0
            rows = np.arange(r0, n, step)
            cols = np.arange(c0, n, step)
            total = np.zeros((b, len(rows), len(cols)), dtype=F32)
            count = np.zeros((len(rows), len(cols)), dtype=F32)
            for dr, dc in ((-half, 0), (0, -half), (0, half), (half, 0)):
                rr, cc = rows + dr, cols + dc
                ok = ((rr >= 0) & (rr < n))[:, None] & ((cc >= 0) & (cc < n))[None, :]
                vals = grid[:, np.clip(rr, 0, last)][:, :, np.clip(cc, 0, last)]
                total = total + np.where(ok, vals, F32(0.0))
                count = count + ok.astype(F32)
            grid[:, r0::step, c0::step] = total / count + noise[:, r0::step, c0::step] * amp
        amp = amp * samples.decay[:, None, None]
        step = half
    crop = grid[:, :size, :size]
    mn = crop.min(axis=(1, 2))[:, None, None]
    mx = crop.max(axis=(1, 2))[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (crop - mn) / (mx - mn)
    return np.where(mx > mn, x, F32(0.0)).astype(F32)


def background(recipe: Recipe, seed: int, epoch: int, samples: SamplePlan, size: int) -> np.ndarray:
    """(B, size, size, 3) uint8: coloured plasma, or black."""
    b = len(samples.index)
    if not recipe.background:
        return np.zeros((b, size, size, 3), dtype=np.uint8)
    x = plasma(seed, epoch, samples, size)
    k = samples.bg_hsv[:, :, None, None]
    h8 = np.floor(x * k[:, 0] + k[:, 1]).astype(np.int64) & 255
    s8 = (x * k[:, 2] + k[:, 3]).astype(np.int64)
    v8 = (x * k[:, 4] + k[:, 5]).astype(np.int64)
    return hsv_to_rgb(h8, s8, v8)


# ----------------------------------------------------------------------------- composition

def clipped_window(top: int, left: int, side: int, size: int) -> tuple[int, int, int, int] | None:
    """Canvas rows r0:r1 and columns c0:c1 an object of ``side`` at (top, left) covers; None if it is off the canvas."""
    r0, r1 = max(top, 0), min(top + side, size)
    c0, c1 = max(left, 0), min(left + side, size)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def paste_objects(canvas: np.ndarray, objects: np.ndarray, plan: ItemPlan, slots: int) -> None:
    """Paste each active object, bilinearly resized to its side, where the result is not black."""
    size = canvas.shape[1]
    src = objects.shape[1]
    for item in np.flatnonzero(plan.active):
        b = item // slots
        side, top, left = int(plan.side[item]), int(plan.top[item]), int(plan.left[item])
        window = clipped_window(top, left, side, size)
        if window is None:
            continue
        r0, r1, c0, c1 = window
        ratio = F32(src) / F32(side)
        rows = bilinear_taps(np.arange(r0 - top, r1 - top), ratio, src)
        cols = bilinear_taps(np.arange(c0 - left, c1 - left), ratio, src)
        obj = objects[item].astype(F32)
        (ra, rb, fr), (ca, cb, fc) = rows, cols
        fr, fc = fr[:, None, None], fc[None, :, None]
        top_row = obj[ra][:, ca] * (F32(1.0) - fc) + obj[ra][:, cb] * fc
        bottom_row = obj[rb][:, ca] * (F32(1.0) - fc) + obj[rb][:, cb] * fc
        value = top_row * (F32(1.0) - fr) + bottom_row * fr
        rgb = np.clip(np.rint(value), 0, 255).astype(np.uint8)
        region = canvas[b, r0:r1, c0:c1]
        region[...] = np.where((rgb > 0).any(axis=-1, keepdims=True), rgb, region)


def bilinear_taps(dst: np.ndarray, ratio: np.float32, src: int):
    """Half-pixel-centre bilinear source taps (lower, upper, fraction) for destination pixels."""
    pos = (dst.astype(F32) + F32(0.5)) * ratio - F32(0.5)
    pos = np.maximum(pos, F32(0.0))
    lower = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    upper = np.minimum(lower + 1, src - 1)
    return lower, upper, (pos - lower.astype(F32)).astype(F32)


def blur(images: np.ndarray, samples: SamplePlan) -> np.ndarray:
    """3x3 Gaussian blur (reflect-101 borders) on flagged samples, float32, rounded to uint8."""
    out = images.copy()
    for b in np.flatnonzero(samples.blur):
        k0, k1 = samples.blur_k0[b], samples.blur_k1[b]
        img = images[b].astype(F32)
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="reflect")
        rows = (k1 * p[:, :-2] + k0 * p[:, 1:-1]) + k1 * p[:, 2:]
        total = (k1 * rows[:-2] + k0 * rows[1:-1]) + k1 * rows[2:]
        out[b] = np.clip(np.rint(total), 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- the pipeline

def render_items(recipe: Recipe, seed: int, epoch: int, plan: ItemPlan, side: int, chunk: int = 16):
    """Colour image, density and point count of each item: (I, side, side, 3), (I, side, side), (I,)."""
    n = len(plan.index)
    rgb = np.zeros((n, side, side, 3), dtype=np.uint8)
    density = np.zeros((n, side, side), dtype=F32)
    points = np.zeros(n, dtype=np.int64)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        sub = _subplan(plan, sl)
        map_words, mask_words = chaos_words(recipe, seed, epoch, sub.index, sub.slot)
        x, y, recorded = chaos_game(recipe, sub, map_words)
        recorded &= sub.active[:, None, None]
        box, count = bounding_box(x, y, recorded)
        lo, sc = window(box, count, sub, side)
        hist = histogram(recipe, x, y, recorded, lo, sc, side, mask_words)
        g = flip(stamp(recipe, hist, sub.mask), sub.flips)
        rgb[sl] = colorize(recipe, g, sub)
        density[sl] = g
        points[sl] = count
    return rgb, density, points


def _subplan(plan: ItemPlan, sl: slice) -> ItemPlan:
    return ItemPlan(**{k: v[sl] for k, v in vars(plan).items()})


def compose(recipe: Recipe, seed: int, epoch: int, samples: SamplePlan, plan: ItemPlan,
            rgb: np.ndarray, density: np.ndarray, size: int) -> np.ndarray:
    """Final (B, size, size, 3) uint8 images from the rendered items."""
    canvas = background(recipe, seed, epoch, samples, size)
    if recipe.multi_object:
        paste_objects(canvas, rgb, plan, recipe.objects[1])
    else:
        canvas = np.where((density > 0)[..., None], rgb, canvas)
    return blur(canvas, samples)
