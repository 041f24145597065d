"""Per-sample and per-object random draws of a Mandelbulb batch (the plan), on the host in NumPy.

Every draw is ``rng.draw_words(seed, epoch, index, stream, draw, slot)``: a pure function of the key, the
same on any device, rank or batch split. The plan is small (a few dozen floats per object), so both
renderers compute it here and the device renderer uploads it in one pinned copy; the cameras need sin/cos,
computed by the fixed float32 polynomials below (not libm/SVML, whose last bits vary between machines).

Object slot s of sample b is item ``b * slots + s``; items beyond a sample's object count are inactive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fractal_pretrain import rng
from fractal_pretrain.mandelbulb.recipe import MandelbulbRecipe
from fractal_pretrain.render.params import DRAW_SAMPLE_MAIN, plasma_draws

F32 = np.float32

# Draw numbers of the item stream (rng.STREAM_ITEM, slot = object).
DRAW_VIEW = 0  # member formula, latitude, longitude, bank view
DRAW_COLOUR_A = 1  # col1 r g b, col2 r
DRAW_COLOUR_B = 2  # col2 g b, col3 r g
DRAW_PLACE = 3  # col3 b, side, top, left
BANK_EPOCH = 2**32 - 2  # key epoch of view-bank views (index = bank row); training never reaches it
CAMERA_DISTANCE = 2.5
DEG = np.pi / 180.0

# Cephes sinf/cosf: reduction by pi/4 in three parts (exact products for |x| < 8192), then polynomials.
_FOPI = F32(1.27323954473516)
_DP1, _DP2, _DP3 = F32(0.78515625), F32(2.4187564849853515625e-4), F32(3.77489497744594108e-8)
_SIN = (F32(-1.9515295891e-4), F32(8.3321608736e-3), F32(-1.6666654611e-1))
_COS = (F32(2.443315711809948e-5), F32(-1.388731625493765e-3), F32(4.166664568298827e-2))


def sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin x, cos x) in float32 arithmetic (Cephes), |x| < 8192; a few ulp, identical on every machine."""
    x = np.asarray(x, dtype=F32)
    sign_sin = np.where(x < 0, F32(-1.0), F32(1.0))
    a = np.abs(x)
    j = (a * _FOPI).astype(np.int64)
    j = j + (j & 1)
    y = j.astype(F32)
    a = ((a - y * _DP1) - y * _DP2) - y * _DP3
    octant = j & 7
    z = a * a
    s = a + (a * z) * ((_SIN[0] * z + _SIN[1]) * z + _SIN[2])
    c = (F32(1.0) - F32(0.5) * z) + (z * z) * ((_COS[0] * z + _COS[1]) * z + _COS[2])
    swap = (octant == 2) | (octant == 6)
    sin_v = np.where(swap, c, s)
    cos_v = np.where(swap, s, c)
    sin_v = np.where(octant >= 4, -sin_v, sin_v) * sign_sin
    cos_v = np.where((octant == 2) | (octant == 4), -cos_v, cos_v)
    return sin_v.astype(F32), cos_v.astype(F32)


@dataclass
class MandelbulbSamples:
    """Per-sample draws, arrays of length B (the plasma fields follow render/params.SamplePlan)."""

    index: np.ndarray  # int64
    label: np.ndarray  # int64 class
    num_objects: np.ndarray  # int64
    decay: np.ndarray  # float32 plasma decay exp(-d)
    corners: np.ndarray  # float32 (B, 4)
    bg_hsv: np.ndarray  # float32 (B, 6)


@dataclass
class MandelbulbItems:
    """Per-object draws, arrays of length I = B * slots."""

    index: np.ndarray  # int64 sample index
    slot: np.ndarray  # int64
    active: np.ndarray  # bool
    member: np.ndarray  # int64 position of the formula in class_members(...).ravel()
    view: np.ndarray  # int64 view of the formula in the view bank (view_bank mode; drawn in any mode)
    formula: np.ndarray  # int64 formula number (power-major)
    power: np.ndarray  # int64
    rule: np.ndarray  # int64 9-bit rule
    lat: np.ndarray  # float32 latitude as drawn (degrees)
    lng: np.ndarray  # float32 longitude as drawn (degrees)
    camera: np.ndarray  # float32 (I, 4, 3): position, side, up, direction
    colours: np.ndarray  # float32 (I, 3, 3): col1, col2, col3
    side: np.ndarray  # int64 object side in pixels
    top: np.ndarray  # int64
    left: np.ndarray  # int64


def slots_per_sample(recipe: MandelbulbRecipe) -> int:
    return min(recipe.objects[1], recipe.members_per_class) if recipe.multi_object else 1


def class_members(recipe: MandelbulbRecipe, seed: int) -> np.ndarray:
    """(num_classes, members) formula numbers of each class: listed order, or shuffled by the seed."""
    n, m = recipe.num_formulas, recipe.members_per_class
    order = np.arange(n, dtype=np.int64)
    if recipe.group_order == "shuffled":  # a permutation by sorting keyed words: a pure function of the seed
        words = rng.draw_words(seed, 0, order, rng.STREAM_GROUPS, 0)
        order = np.lexsort((order, words[1], words[0]))
    return order[:recipe.num_classes * m].reshape(recipe.num_classes, m)


def plan_samples(recipe: MandelbulbRecipe, seed: int, epoch: int, index: np.ndarray) -> MandelbulbSamples:
    index = np.asarray(index, dtype=np.int64)
    main = rng.draw_words(seed, epoch, index, rng.STREAM_SAMPLE, DRAW_SAMPLE_MAIN)
    lo, hi = recipe.objects
    drawn = lo + rng.to_int(main[0], hi - lo + 1)
    return MandelbulbSamples(
        index=index,
        label=index % recipe.num_classes,
        num_objects=np.minimum(drawn, recipe.members_per_class),  # fractal4AD: min(U{4..10}, members)
        **plasma_draws(seed, epoch, index, main),
    )


def view_angle(recipe: MandelbulbRecipe, degrees: np.ndarray) -> np.ndarray:
    """The angle the camera rotates by: the drawn value itself (published quirk) or converted to radians."""
    return degrees if recipe.view_angles == "radians" else (degrees * F32(DEG)).astype(F32)


def camera(lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
    """(I, 4, 3) float32 position, side, up, direction: the shader's rotZ(rotX(v, lat), lng) of
    direction (0, -1, 0) and up (0, 0, 1), side = direction x up, position = -2.5 direction."""
    s_lat, c_lat = sincos(lat)
    s_lng, c_lng = sincos(lng)

    def rotate(v):  # rotX by lat, then rotZ by lng, in the shader's operation order
        x, y, z = v
        y, z = c_lat * y - s_lat * z, s_lat * y + c_lat * z
        x, y = c_lng * x - s_lng * y, s_lng * x + c_lng * y
        return x, y, z

    zero, one = np.zeros_like(lat), np.ones_like(lat)
    d = rotate((zero, -one, zero))
    u = rotate((zero, zero, one))
    side = (d[1] * u[2] - d[2] * u[1], d[2] * u[0] - d[0] * u[2], d[0] * u[1] - d[1] * u[0])
    pos = tuple(F32(0.0) - F32(CAMERA_DISTANCE) * c for c in d)
    return np.stack([np.stack(v, axis=-1) for v in (pos, side, u, d)], axis=1).astype(F32)


def _look(recipe: MandelbulbRecipe, seed: int, epoch: int, index: np.ndarray, slot: np.ndarray):
    """View-word, latitude, longitude, camera and colours of objects keyed by (seed, epoch, index, slot)."""
    view = rng.draw_words(seed, epoch, index, rng.STREAM_ITEM, DRAW_VIEW, slot)
    lat = rng.to_range(view[1], *recipe.latitude)
    lng = rng.to_range(view[2], *recipe.longitude)
    cols = np.concatenate([np.stack(rng.draw_words(seed, epoch, index, rng.STREAM_ITEM, d, slot), axis=1)
                           for d in (DRAW_COLOUR_A, DRAW_COLOUR_B)], axis=1)
    place = rng.draw_words(seed, epoch, index, rng.STREAM_ITEM, DRAW_PLACE, slot)
    colours = rng.to_uniform(np.concatenate([cols, place[0][:, None]], axis=1)).reshape(-1, 3, 3).astype(F32)
    cam = camera(view_angle(recipe, lat), view_angle(recipe, lng))
    return view, place, lat, lng, cam, colours


def plan_items(recipe: MandelbulbRecipe, seed: int, size: int, epoch: int, samples: MandelbulbSamples,
               members: np.ndarray) -> MandelbulbItems:
    """Objects of a batch. In view_bank mode the view and colours come from the bank row instead
    (``member * bank_views + view``; see ``plan_bank``), the rest (formula, placement) from here."""
    slots = slots_per_sample(recipe)
    index = np.repeat(samples.index, slots)
    slot = np.tile(np.arange(slots, dtype=np.int64), len(samples.index))
    active = slot < np.repeat(samples.num_objects, slots)
    klass = np.repeat(samples.label, slots)
    view, place, lat, lng, cam, colours = _look(recipe, seed, epoch, index, slot)
    member = klass * members.shape[1] + rng.to_int(view[0], members.shape[1])
    formula = members.reshape(-1)[member]
    power, rule = recipe.formula(formula)
    if recipe.multi_object:
        side = np.maximum(1, (rng.to_range(place[1], *recipe.object_scale) * F32(size)).astype(np.int64))
        top = rng.to_int(place[2], size) - side // 2  # corner in [-s/2, size - s/2): may cross the border
        left = rng.to_int(place[3], size) - side // 2
    else:
        side = np.full(len(index), size, dtype=np.int64)
        top = left = np.zeros(len(index), dtype=np.int64)
    items = MandelbulbItems(
        index=index, slot=slot, active=active, member=member, view=rng.to_int(view[3], recipe.bank_views),
        formula=formula, power=power, rule=rule, lat=lat, lng=lng, camera=cam, colours=colours,
        side=side, top=top, left=left)
    if recipe.mode == "view_bank":  # the bank row's view and colours: what the image shows
        look = plan_bank(recipe, seed, bank_row(recipe, items), members, 1)
        items.lat, items.lng, items.camera, items.colours = look.lat, look.lng, look.camera, look.colours
    return items


def bank_row(recipe: MandelbulbRecipe, items: MandelbulbItems) -> np.ndarray:
    return items.member * recipe.bank_views + items.view


def bank_side(recipe: MandelbulbRecipe, size: int) -> int:
    """Side of the bank's views: the image (one object) or the largest object side (resized down per sample)."""
    if not recipe.multi_object:
        return size
    return max(1, int(F32(recipe.object_scale[1]) * F32(size)))


def plan_bank(recipe: MandelbulbRecipe, seed: int, rows: np.ndarray, members: np.ndarray, side: int) -> MandelbulbItems:
    """Bank views of the given rows (row = member * bank_views + view), each keyed by (seed, BANK_EPOCH, row)."""
    rows = np.asarray(rows, dtype=np.int64)
    member = rows // recipe.bank_views
    formula = members.reshape(-1)[member]
    power, rule = recipe.formula(formula)
    _, _, lat, lng, cam, colours = _look(recipe, seed, BANK_EPOCH, rows, np.zeros_like(rows))
    n = len(rows)
    return MandelbulbItems(
        index=rows, slot=np.zeros(n, dtype=np.int64), active=np.ones(n, dtype=bool), member=member,
        view=rows % recipe.bank_views, formula=formula, power=power, rule=rule, lat=lat, lng=lng, camera=cam,
        colours=colours, side=np.full(n, side, dtype=np.int64), top=np.zeros(n, dtype=np.int64),
        left=np.zeros(n, dtype=np.int64))
