"""NumPy reference of the Mandelbulb-variation ray marcher: the exact semantics ``kernels/mandelbulb.cu`` mirrors.

The published generator's fragment shader (RistoranteRist/MandelbulbVariationsGenerator, strong_recipes.md
section 2.2), per ray of a pixel:

* distance estimator from a point c: z <- c, dr <- 1; up to 100 iterations while r = |z| <= 4:
  theta = acos(z_z / r), phi = atan2(z_y, z_x), dr <- r^p p dr + 1 (``derivative``), and each axis of
  z <- r^p (+-sin|cos of p theta|p phi, by the rule bits) + c; orbit traps min |z_z|, min |z|_1 / 1.5,
  min |z| after each step; DE = 0.5 ln(r) r / dr (r of the last iteration's start);
* sphere tracing from the camera (distance 2.5, screen [-0.5, 0.5]^2 at depth 1): up to 1000 steps,
  a hit when DE <= 1e-3, object pixel when the distance L < 10;
* colour col1 clamp(trap_0) + col2 clamp(trap_1^10) + col3 clamp(trap_2^10), times 0.3 + 0.9 max(0, l . -n)
  (n = normalised central-difference gradient, eps 1e-3; light at (-10, 10, 10); ``diffuse_normal``),
  times r^2 (r = |hit|), plus 0.2 when a shadow ray from hit + n / 1e5 toward the light escapes
  (10000 steps, threshold 1e-4, L >= 10000; ``shadow``); clamped to [0, 1] per ray.

Bit-identical by construction, not by tolerance: everything here is float32 +, -, *, /, sqrt and
comparisons (IEEE-exact in NumPy, in g++ with -ffp-contract=off and in NVRTC with --fmad=false), in one
fixed order. The transcendental functions of the shader are avoided or written out:

* cos/sin(p theta) and cos/sin(p phi) are the real/imaginary parts of (cos t + i sin t)^p, with
  cos theta = z_z / r, sin theta = rho / r, cos phi = z_x / rho, sin phi = z_y / rho (rho = |(z_x, z_y)|;
  phi = 0 when rho = 0): no acos, atan2, sin or cos; the integer power is a fixed square-and-multiply;
* r^p by the same square-and-multiply (p is an integer), the trap powers ^10 likewise, and the
  trap |z_z|^0.1 stored as |z_z| (the shader raises it to the power 10 again: the same weight);
* ln r by Cephes' float32 logf (frexp is exact everywhere).

Mathematically this is the shader's estimator; numerically it differs from GLSL's pow/acos/atan2 in the
last bits, as GLSL implementations differ among themselves, which moves individual surface pixels but not
the distribution (tests/fractal_pretrain/test_mandelbulb.py checks the published coverage statistics).

Cheaper in the same floats (the kernel's cost, benchmarks/PENDING_GPU.md): marching evaluates only the DE;
the orbit traps are computed once, at the primary ray's last DE point (``orbit_traps``); an iteration's
closing |z| is the next one's r; the powers start their product at the lowest set bit of p.

``early_exit`` stops a primary ray once L >= 10 and a shadow ray once L >= 10000: L only grows (a step
adds DE > threshold > 0), so the outcome is already decided and the image is identical.

The constants (iterations, bailout, steps, thresholds, light, weights, ...) are ``mandelbulb/constants.py``'s,
the same the kernels get as -D options.

Images: a sprite per object (premultiplied RGB and alpha, uint8, ``supersample``^2 rays per pixel averaged
with a box filter), pasted in slot order over the background with its own alpha.
"""

from __future__ import annotations

import types

import numpy as np

from fractal_pretrain.mandelbulb import params as P
from fractal_pretrain.mandelbulb.constants import (
    AMBIENT,
    BAILOUT,
    DIFFUSE,
    LIGHT,
    MAX_ITERATIONS,
    NORMAL_EPS,
    POWER_BITS,
    PRIMARY_LIMIT,
    PRIMARY_STEPS,
    PRIMARY_THRESHOLD,
    SHADOW_LIGHT,
    SHADOW_LIMIT,
    SHADOW_OFFSET_DIVISOR,
    SHADOW_STEPS,
    SHADOW_THRESHOLD,
    TRAP_EXPONENT,
    TRAP_L1_DIVISOR,
    TRAP_START,
)
from fractal_pretrain.mandelbulb.params import MandelbulbItems, MandelbulbSamples
from fractal_pretrain.mandelbulb.recipe import MandelbulbRecipe
from fractal_pretrain.render import reference as ifs_reference

F32 = np.float32
BACKGROUND_LEVEL = {"white": 255, "black": 0}

# Cephes logf.
_SQRTHF = F32(0.707106781186547524)
_LOG_P = tuple(F32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                 3.3333331174e-1))
_LOG_Q1, _LOG_Q2 = F32(-2.12194440e-4), F32(0.693359375)


def log32(x: np.ndarray) -> np.ndarray:
    """Natural log in float32 arithmetic (Cephes logf) for x > 0; -inf for 0 and NaN below or for NaN."""
    x = np.asarray(x, dtype=F32)
    m, e = np.frexp(x)
    m = m.astype(F32)
    small = m < _SQRTHF
    e = (e - small.astype(e.dtype)).astype(F32)
    m = np.where(small, (m + m) - F32(1.0), m - F32(1.0)).astype(F32)
    z = m * m
    y = _LOG_P[0]
    for c in _LOG_P[1:]:
        y = y * m + c
    y = (y * m) * z
    y = y + _LOG_Q1 * e
    y = y - F32(0.5) * z
    out = m + y
    out = out + _LOG_Q2 * e
    out = np.where(x > F32(0.0), out, np.where(x == F32(0.0), F32(-np.inf), F32(np.nan)))
    return out.astype(F32)


def _multiply_in(bit: np.ndarray, started: np.ndarray, acc: tuple, base: tuple, times) -> tuple:
    """One square-and-multiply round for the lanes of ``bit``: ``base`` where the product has not started
    (the lowest set bit), ``times(acc, base)`` after; other lanes keep ``acc``. Skips the arithmetic no lane
    needs (a batch of one power takes the whole-array branches)."""
    if not bit.any():
        return acc
    first = bit & ~started
    if first.all():
        return base
    later = bit & started
    product = times(acc, base) if later.any() else acc
    if later.all():
        return product
    return tuple(np.where(first, b, np.where(later, v, a)) for a, b, v in zip(acc, base, product, strict=True))


def _times(acc, base):
    return (acc[0] * base[0],)


def _complex_times(acc, base):
    (rc, rs), (c, s) = acc, base
    return (rc * c - rs * s, rc * s + rs * c)


def _power(base: tuple, p, one: tuple, times) -> tuple:
    """``base``^p (a real or complex number as a tuple of arrays) for integers 0 <= p < 32: square-and-multiply
    over the bits of p, squaring by ``times(base, base)``, the product starting at the lowest set bit."""
    p = np.broadcast_to(np.asarray(p), np.shape(base[0]))
    acc = one
    started = np.zeros(np.shape(base[0]), dtype=bool)
    for k in range(POWER_BITS):
        bit = (p >> k) & 1 == 1
        acc = _multiply_in(bit, started, acc, base, times)
        started |= bit
        if not (p >> (k + 1)).any():
            break
        base = times(base, base)
    return acc


def ipow(x: np.ndarray, p) -> np.ndarray:
    """x^p for integers 0 <= p < 32 by square-and-multiply over the bits of p (float32), the product
    starting at the lowest set bit (1 * x == x: the same floats as a product from 1)."""
    return _power((x,), p, (np.ones_like(x),), _times)[0]


def cpow(c: np.ndarray, s: np.ndarray, p) -> tuple[np.ndarray, np.ndarray]:
    """(cos p t, sin p t) from (cos t, sin t): (c + i s)^p by the same square-and-multiply.

    The product starts at the lowest set bit's square instead of multiplying it by 1 + 0i: that changes
    at most the sign of a zero (c - 0 s is +0 where c = -0 and s < 0), and nothing downstream turns a zero's
    sign into another value: the divisors (r, rho, dr, norms) are square roots or sums >= 1, the orbit traps
    take absolute values, the rest are products, sums and comparisons. NaN goes with NaN (cos and sin of
    theta are both NaN or neither; those of phi are finite)."""
    return _power((c, s), p, (np.ones_like(c), np.zeros_like(s)), _complex_times)


def _lt_min(v, t):
    """min in the kernels' form ``v < t ? v : t`` (the NaN case must match too)."""
    return np.where(v < t, v, t)


def rule_bits(rule: np.ndarray) -> np.ndarray:
    """(9, N) bool: per axis x, y, z the bits sin (vs cos), theta (vs phi), negative, MSB first."""
    return np.stack([((np.asarray(rule) >> (8 - k)) & 1) == 1 for k in range(9)])


def _orbit(cx, cy, cz, power, rule, textbook: bool, traps: bool):
    """Iterates points c (float32 arrays, per-point power and rule): r at the start of the last iteration,
    dr, and (traps only) the three orbit traps. An iteration's closing |z| is the next one's r (the same
    expression); min |z|_1 / 1.5 is min |z|_1 divided once (IEEE division is monotonic)."""
    n = len(cx)
    zx, zy, zz = cx.copy(), cy.copy(), cz.copy()
    dr = np.ones(n, dtype=F32)
    last = np.zeros(n, dtype=F32)
    t0, l1, t2 = np.full(n, TRAP_START, dtype=F32), np.full(n, np.inf, dtype=F32), np.full(n, TRAP_START, dtype=F32)
    bits = rule_bits(rule)
    pw = F32(1.0) * power.astype(F32)
    live = np.arange(n)
    with np.errstate(all="ignore"):
        rr = np.sqrt((cx * cx + cy * cy) + cz * cz)
        for _ in range(MAX_ITERATIONS):
            last[live] = rr
            going = ~(rr > BAILOUT)
            live, rr = live[going], rr[going]
            if live.size == 0:
                break
            x, y, z = zx[live], zy[live], zz[live]
            p = power[live]
            rho = np.sqrt(x * x + y * y)
            ct, st = z / rr, rho / rr
            flat = ~(rho > F32(0.0))
            cp = np.where(flat, F32(1.0), x / rho)
            sp = np.where(flat, F32(0.0), y / rho)
            rp = ipow(rr, p)
            grow = ipow(rr, p - 1) if textbook else rp
            dr[live] = (grow * pw[live]) * dr[live] + F32(1.0)
            cpt, spt = cpow(ct, st, p)
            cpp, spp = cpow(cp, sp, p)
            b = bits[:, live]
            new = []
            for axis, c in enumerate((cx, cy, cz)):
                is_sin, is_theta, is_neg = b[3 * axis], b[3 * axis + 1], b[3 * axis + 2]
                v = np.where(is_sin, np.where(is_theta, spt, spp), np.where(is_theta, cpt, cpp))
                v = np.where(is_neg, -v, v)
                new.append(rp * v + c[live])
            x, y, z = new
            zx[live], zy[live], zz[live] = x, y, z
            rr = np.sqrt((x * x + y * y) + z * z)
            if traps:
                az = np.abs(z)
                t0[live] = _lt_min(az, t0[live])
                l1[live] = _lt_min((np.abs(x) + np.abs(y)) + az, l1[live])
                t2[live] = _lt_min(rr, t2[live])
        t1 = l1 / TRAP_L1_DIVISOR
    return last, dr, (t0, _lt_min(t1, TRAP_START), t2)


def distance(cx, cy, cz, power, rule, textbook: bool):
    """DE = 0.5 ln(r) r / dr of points c (float32 arrays), per-point power and rule."""
    r, dr, _ = _orbit(cx, cy, cz, power, rule, textbook, traps=False)
    with np.errstate(all="ignore"):
        return (((F32(0.5) * log32(r)) * r) / dr).astype(F32)


def orbit_traps(cx, cy, cz, power, rule, textbook: bool):
    """min |z_z|, min |z|_1 / 1.5 and min |z| after each step of the DE's iteration (1e20 when none).

    Marching needs only the DE: the traps are computed once, at the primary ray's last DE point."""
    return _orbit(cx, cy, cz, power, rule, textbook, traps=True)[2]


def march(origin, direction, power, rule, textbook: bool, steps: int, threshold, limit, early_exit: bool):
    """Sphere tracing of N rays: L (where DE <= threshold, or after the step limit or the early exit) and
    the L of the last DE evaluation (the point whose orbit traps colour a hit)."""
    n = len(power)
    length = np.zeros(n, dtype=F32)
    probe = np.zeros(n, dtype=F32)
    live = np.arange(n)
    with np.errstate(all="ignore"):
        for _ in range(steps):
            if live.size == 0:
                break
            L = length[live]
            probe[live] = L
            p = [origin[a][live] + L * direction[a][live] for a in range(3)]
            de = distance(*p, power[live], rule[live], textbook)
            stop = ~(de > threshold)
            L = np.where(stop, L, L + de)
            length[live] = L
            going = ~stop
            if early_exit:
                going &= ~(L >= limit)
            live = live[going]
    return length, probe


def normalise(v):
    n = np.sqrt((v[0] * v[0] + v[1] * v[1]) + v[2] * v[2])
    return [c / n for c in v]


def clamp01(x):
    return np.where(x > F32(1.0), F32(1.0), np.where(x > F32(0.0), x, F32(0.0)))


def shade(recipe: MandelbulbRecipe, hit, ray, colours, traps, power, rule):
    """(3, N) float32 colour of hit points (before the [0, 1] clamp)."""
    textbook = recipe.derivative == "r^(p-1)"
    with np.errstate(all="ignore"):
        r = np.sqrt((hit[0] * hit[0] + hit[1] * hit[1]) + hit[2] * hit[2])
        grad = []
        for a in range(3):
            plus = [h + NORMAL_EPS if k == a else h for k, h in enumerate(hit)]
            minus = [h - NORMAL_EPS if k == a else h for k, h in enumerate(hit)]
            grad.append(distance(*plus, power, rule, textbook) - distance(*minus, power, rule, textbook))
        normal = normalise(grad)
        light = normalise([LIGHT[a] - hit[a] for a in range(3)])
        facing = [-c for c in normal] if recipe.diffuse_normal == "negated" else normal
        d = (light[0] * facing[0] + light[1] * facing[1]) + light[2] * facing[2]
        diffuse = DIFFUSE * np.where(d > F32(0.0), d, F32(0.0))
        weights = (clamp01(traps[0]), clamp01(ipow(traps[1], TRAP_EXPONENT)), clamp01(ipow(traps[2], TRAP_EXPONENT)))
        col = [((colours[:, 0, c] * weights[0] + colours[:, 1, c] * weights[1]) + colours[:, 2, c] * weights[2])
               for c in range(3)]
        col = [(c * (diffuse + AMBIENT)) * (r * r) for c in col]
        if recipe.shadow:
            start = [hit[a] + normal[a] / SHADOW_OFFSET_DIVISOR for a in range(3)]
            ll, _ = march(start, light, power, rule, textbook, SHADOW_STEPS, SHADOW_THRESHOLD, SHADOW_LIMIT,
                          recipe.early_exit)
            lit = ll >= SHADOW_LIMIT
            col = [np.where(lit, c + SHADOW_LIGHT, c) for c in col]
    return np.stack(col).astype(F32)


def screen(coord: np.ndarray, n: int) -> np.ndarray:
    """The shader's (fragCoord * 2 - res) / res / 2 for fragment coordinates coord + 0.5 (float32)."""
    nf = F32(n)
    return (((coord.astype(F32) + F32(0.5)) * F32(2.0) - nf) / nf) / F32(2.0)


def primary_rays(camera: np.ndarray, side: int, ss: int):
    """Origins and directions (3 lists of (side, side, ss, ss) arrays) of one object's rays; the image row
    0 is the top (the published PNGs are flipped so)."""
    n = side * ss
    i, j, a, b = np.meshgrid(np.arange(side), np.arange(side), np.arange(ss), np.arange(ss), indexing="ij")
    row, col = i * ss + a, j * ss + b
    px, py = screen(col, n), screen((n - 1) - row, n)
    pos, s, u, d = camera
    ray = normalise([(s[k] * px + u[k] * py) + d[k] for k in range(3)])
    origin = [np.full(px.shape, pos[k], dtype=F32) for k in range(3)]
    return origin, ray


def render_sprites(recipe: MandelbulbRecipe, items: MandelbulbItems, max_side: int) -> np.ndarray:
    """(I, max_side, max_side, 4) uint8 premultiplied RGB + alpha of each active object (zeros elsewhere).

    The rays of all objects march together (one NumPy pass per step, not per object)."""
    ss = recipe.supersample
    textbook = recipe.derivative == "r^(p-1)"
    sprites = np.zeros((len(items.index), max_side, max_side, 4), dtype=np.uint8)
    active = np.flatnonzero(items.active)
    if active.size == 0:
        return sprites
    rays = [primary_rays(items.camera[item], int(items.side[item]), ss) for item in active]
    counts = [r[1][0].size for r in rays]
    origin = [np.concatenate([r[0][k].reshape(-1) for r in rays]) for k in range(3)]
    ray = [np.concatenate([r[1][k].reshape(-1) for r in rays]) for k in range(3)]
    owner = np.repeat(active, counts)
    power, rule = items.power[owner], items.rule[owner]
    length, probe = march(origin, ray, power, rule, textbook, PRIMARY_STEPS, PRIMARY_THRESHOLD,
                          PRIMARY_LIMIT, recipe.early_exit)
    hit = length < PRIMARY_LIMIT
    col = np.zeros((3, len(owner)), dtype=F32)
    h = np.flatnonzero(hit)
    if h.size:
        probes = [origin[k][h] + probe[h] * ray[k][h] for k in range(3)]
        traps = orbit_traps(*probes, power[h], rule[h], textbook)
        points = [origin[k][h] + ray[k][h] * length[h] for k in range(3)]
        col[:, h] = clamp01(shade(recipe, points, [d[h] for d in ray], items.colours[owner[h]], traps,
                                  power[h], rule[h]))
    start = 0
    for item, count in zip(active, counts, strict=True):
        side = int(items.side[item])
        c = col[:, start:start + count].reshape(3, side, side, ss, ss)
        hits = hit[start:start + count].reshape(side, side, ss, ss).sum(axis=(2, 3))
        start += count
        acc = np.zeros((3, side, side), dtype=F32)
        for a in range(ss):  # box filter: the sub-rays in row-major order
            for b in range(ss):
                acc = acc + c[:, :, :, a, b]
        premult = acc / F32(ss * ss)
        rgb = np.clip(np.rint(premult * F32(255.0)), 0, 255).astype(np.uint8)
        sprites[item, :side, :side, :3] = rgb.transpose(1, 2, 0)
        sprites[item, :side, :side, 3] = alpha8(hits, ss)
    return sprites


def alpha8(hits: np.ndarray, ss: int) -> np.ndarray:
    """Coverage hits / ss^2 as uint8, rounded half up in integers."""
    n = ss * ss
    return ((hits * 510 + n) // (2 * n)).astype(np.uint8)


def background(recipe: MandelbulbRecipe, seed: int, epoch: int, samples: MandelbulbSamples, size: int):
    """(B, size, size, 3) uint8: white, black, or the IFS recipes' coloured plasma for the same key."""
    b = len(samples.index)
    if recipe.background == "plasma":
        return ifs_reference.background(types.SimpleNamespace(background=True), seed, epoch, samples, size)
    return np.full((b, size, size, 3), BACKGROUND_LEVEL[recipe.background], dtype=np.uint8)


def paste(canvas: np.ndarray, sprites: np.ndarray, items: MandelbulbItems, slots: int) -> None:
    """Each active object over the canvas in slot order: rint(rgb + canvas (255 - alpha) / 255)."""
    size = canvas.shape[1]
    for item in np.flatnonzero(items.active):
        b = item // slots
        side, top, left = int(items.side[item]), int(items.top[item]), int(items.left[item])
        window = ifs_reference.clipped_window(top, left, side, size)
        if window is None:
            continue
        r0, r1, c0, c1 = window
        sprite = sprites[item, r0 - top:r1 - top, c0 - left:c1 - left]
        keep = (F32(255.0) - sprite[..., 3:].astype(F32)) * F32(1.0 / 255.0)
        value = sprite[..., :3].astype(F32) + canvas[b, r0:r1, c0:c1].astype(F32) * keep
        canvas[b, r0:r1, c0:c1] = np.minimum(np.rint(value), F32(255.0)).astype(np.uint8)


def resize_sprite(sprite: np.ndarray, side: int) -> np.ndarray:
    """A bank view (bs, bs, 4) bilinearly resized to (side, side, 4), as the IFS paste_objects resizes."""
    src = sprite.shape[0]
    ratio = F32(src) / F32(side)
    ra, rb, fr = ifs_reference.bilinear_taps(np.arange(side), ratio, src)
    fr, fc = fr[:, None, None], fr[None, :, None]
    obj = sprite.astype(F32)
    top_row = obj[ra][:, ra] * (F32(1.0) - fc) + obj[ra][:, rb] * fc
    bottom_row = obj[rb][:, ra] * (F32(1.0) - fc) + obj[rb][:, rb] * fc
    value = top_row * (F32(1.0) - fr) + bottom_row * fr
    return np.clip(np.rint(value), 0, 255).astype(np.uint8)


def bank_sprites(recipe: MandelbulbRecipe, seed: int, items: MandelbulbItems, members: np.ndarray,
                 size: int, march=render_sprites) -> np.ndarray:
    """view_bank mode: each active object's bank view, resized to its side (the views are rendered here,
    only those the batch uses: the same pixels the device renders for its whole bank)."""
    bs = P.bank_side(recipe, size)
    rows = P.bank_row(recipe, items)
    wanted = np.unique(rows[items.active])
    views = march(recipe, P.plan_bank(recipe, seed, wanted, members, bs), bs)
    max_side = int(items.side.max())
    sprites = np.zeros((len(items.index), max_side, max_side, 4), dtype=np.uint8)
    for item in np.flatnonzero(items.active):
        side = int(items.side[item])
        sprites[item, :side, :side] = resize_sprite(views[np.searchsorted(wanted, rows[item])], side)
    return sprites


def render(recipe: MandelbulbRecipe, seed: int, epoch: int, samples: MandelbulbSamples, items: MandelbulbItems,
           size: int, members: np.ndarray, march=render_sprites) -> np.ndarray:
    """Final (B, size, size, 3) uint8 images. ``march(recipe, items, max_side)`` renders the sprites
    (``mandelbulb/cpu.py`` passes its compiled march: the same bytes)."""
    if recipe.mode == "view_bank":
        sprites = bank_sprites(recipe, seed, items, members, size, march)
    else:
        sprites = march(recipe, items, int(items.side.max()))
    canvas = background(recipe, seed, epoch, samples, size)
    paste(canvas, sprites, items, P.slots_per_sample(recipe))
    return canvas
