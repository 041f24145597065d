"""The contract between Python and the kernels, written once: every constant the ``.cu`` files (and
``fast_cpu.cpp``) use is generated here and passed as ``-D`` options to NVRTC, nvcc, the emulator's g++ and the
fast CPU build (``define_options()``). ``kernels/common.cuh`` refuses to compile without them, so no copy of
a constant can drift.

Generated: RNG stream ids (``rng.STREAM_*``), draw numbers (``render/params.DRAW_*``), recipe choices
(``JITTER_*``, ``PATCH_*`` from ``recipes.py``), the recipe-constant layouts (``RI_*``, ``RF_*``: the order
of ``RECIPE_INTS`` / ``RECIPE_FLOAT_PAIRS``), the plan layouts (``SAMPLE_FLOATS``, ``ITEM_INTS``,
``ITEM_FLOATS``, ``IF_*``), the Mandelbulb kernels' layouts and flags and the ray marcher's constants
(``MB_*``, the latter from ``mandelbulb/constants.py``). Floats are float32, written as exact hex-float literals.
"""

from __future__ import annotations

import numpy as np

from fractal_pretrain import rng
from fractal_pretrain.mandelbulb import constants as marcher
from fractal_pretrain.mandelbulb.recipe import POWER_RANGE
from fractal_pretrain.recipes import FLIP_BITS, JITTERS, PATCHES, Recipe
from fractal_pretrain.render import params as P

# IFS plan layouts (plan.cu). Per sample floats: blur flag, k0, k1, sigma; plasma decay, 4 corners, 6 colour
# gains x 255. Per item ints: active, system, class, num_maps, jitter, mask, flips, sat8, val8, side, top,
# left. Per item floats: maps (MAX_MAPS x ROW), cum (MAX_MAPS), start (2), shift (2), scale (2), hue shift.
ROW = 6  # a map row [a b e c d f]
SAMPLE_FLOATS = 15
ITEM_INTS = 12
ITEM_OFFSETS = {"CUM": P.MAX_MAPS * ROW, "START": P.MAX_MAPS * ROW + P.MAX_MAPS}
ITEM_OFFSETS.update(SHIFT=ITEM_OFFSETS["START"] + 2, SCALE=ITEM_OFFSETS["START"] + 4, HUE=ITEM_OFFSETS["START"] + 6)
ITEM_FLOATS = ITEM_OFFSETS["HUE"] + 1

# Mandelbulb layouts (mandelbulb.cu). Per object ints: active, power, rule, side, top, left, bank row.
# Floats: camera (position, side, up, direction: 12), colours (3 x RGB: 9).
MB_ITEM_INTS = 7
MB_IF_COLOURS = 12
MB_ITEM_FLOATS = MB_IF_COLOURS + 9
MB_FLAGS = {"SHADOW": 1, "NEGATED_NORMAL": 2, "TEXTBOOK_DERIVATIVE": 4, "EARLY_EXIT": 8}
MB_MIN_POWER, MB_MAX_POWER = POWER_RANGE  # march_sprites is specialised for each power of this range
MB_TILE_ROWS, MB_TILE_COLS = 4, 8  # march_sprites: the sprite pixels of one warp


def mb_march_threads(max_side: int) -> int:
    """Threads march_sprites needs per object: whole 4 x 8 tiles covering the max_side^2 sprite."""
    return -(-max_side // MB_TILE_ROWS) * -(-max_side // MB_TILE_COLS) * MB_TILE_ROWS * MB_TILE_COLS

# Order of the integer and float recipe constants: the RI_* and RF_* defines.
RECIPE_INTS = (
    "num_classes", "systems_per_class", "jitter", "jitter_tries", "patch", "flip_bits", "binary",
    "color", "grey", "background", "multi_object", "source_any", "multi_label", "objects_lo",
    "objects_hi", "num_points", "chains", "burn_in", "size", "side", "slots",
)
RECIPE_FLOAT_PAIRS = (
    "jitter", "translate", "scale", "sat", "val", "blur_p", "blur_sigma", "object_scale",
    "plasma_hue_gain", "plasma_hue_offset", "plasma_sat_gain", "plasma_sat_offset",
    "plasma_val_gain", "plasma_val_offset", "plasma_decay", "hue_shift", "svd_jitter",
)


def recipe_ints(recipe: Recipe, size: int) -> np.ndarray:
    """int32 constants read by the kernels (layout: RECIPE_INTS)."""
    values = {
        "num_classes": recipe.num_classes,
        "systems_per_class": recipe.systems_per_class,
        "jitter": JITTERS.index(recipe.jitter),
        "jitter_tries": recipe.jitter_tries,
        "patch": PATCHES.index(recipe.patch),
        "flip_bits": FLIP_BITS[recipe.flips],
        "binary": int(recipe.render_mode == "binary"),
        "color": int(recipe.color),
        "grey": recipe.grey_level,
        "background": int(recipe.background),
        "multi_object": int(recipe.multi_object),
        "source_any": int(recipe.object_source == "any"),
        "multi_label": int(recipe.multi_label),
        "objects_lo": recipe.objects[0],
        "objects_hi": recipe.objects[1],
        "num_points": recipe.num_points,
        "chains": recipe.chains,
        "burn_in": recipe.burn_in,
        "size": size,
        "side": P.object_size(recipe, size),
        "slots": P.slots_per_sample(recipe),
    }
    return np.array([values[k] for k in RECIPE_INTS], dtype=np.int32)


def recipe_floats(recipe: Recipe) -> np.ndarray:
    """float32 (low, width) pairs read by the kernels (layout: RECIPE_FLOAT_PAIRS, blur_p alone)."""
    t = recipe.window_translate
    pairs = {
        "jitter": recipe.jitter_range,
        "translate": (-t, t),
        "scale": recipe.window_scale,
        "sat": recipe.saturation,
        "val": recipe.value,
        "blur_sigma": recipe.blur_sigma,
        "object_scale": recipe.object_scale or (1.0, 1.0),
        "plasma_hue_gain": P.PLASMA_HUE_GAIN,
        "plasma_hue_offset": P.PLASMA_HUE_OFFSET,
        "plasma_sat_gain": P.PLASMA_SAT_GAIN,
        "plasma_sat_offset": P.PLASMA_SAT_OFFSET,
        "plasma_val_gain": P.PLASMA_VAL_GAIN,
        "plasma_val_offset": P.PLASMA_VAL_OFFSET,
        "plasma_decay": P.PLASMA_DECAY,
        "hue_shift": P.HUE_SHIFT,
        "svd_jitter": P.SVD_JITTER,
    }
    out: list[np.float32] = []
    for name in RECIPE_FLOAT_PAIRS:
        if name == "blur_p":  # a single value, not a range
            out.append(np.float32(recipe.blur_p))
        else:
            out.extend(rng.range_params(*pairs[name]))
    return np.array(out, dtype=np.float32)


def _float_offsets() -> dict[str, int]:
    at, offsets = 0, {}
    for name in RECIPE_FLOAT_PAIRS:
        offsets[name] = at
        at += 1 if name == "blur_p" else 2
    offsets["count"] = at
    return offsets


def mb_marcher_defines() -> dict[str, int | np.float32]:
    """The ray marcher's constants (mandelbulb/constants.py) as MB_<NAME>; LIGHT as MB_LIGHT_X/Y/Z."""
    out: dict[str, int | np.float32] = {}
    for name, value in vars(marcher).items():
        if not name.isupper():
            continue
        if isinstance(value, tuple):
            out.update({f"MB_{name}_{axis}": v for axis, v in zip("XYZ", value, strict=True)})
        else:
            out[f"MB_{name}"] = value
    return out


def kernel_defines() -> dict[str, int | np.float32]:
    """Every generated constant, name -> value."""
    d: dict[str, int | np.float32] = {"FRACTAL_CONSTANTS": 1, "MAX_MAPS": P.MAX_MAPS, "ROW": ROW}
    d.update({name: int(getattr(rng, name)) for name in dir(rng) if name.startswith("STREAM_")})
    d.update({name: int(getattr(P, name)) for name in dir(P) if name.startswith("DRAW_")})
    d["PATCH_CENTRE_ONLY"] = P.PATCH_CENTRE_ONLY
    d.update({f"JITTER_{name.upper()}": i for i, name in enumerate(JITTERS)})
    d.update({f"PATCH_{name.upper()}": i for i, name in enumerate(PATCHES)})
    d.update({f"RI_{name.upper()}": i for i, name in enumerate(RECIPE_INTS)})
    d["RI_COUNT"] = len(RECIPE_INTS)
    d.update({f"RF_{name.upper()}": at for name, at in _float_offsets().items()})
    d.update(SAMPLE_FLOATS=SAMPLE_FLOATS, ITEM_INTS=ITEM_INTS, ITEM_FLOATS=ITEM_FLOATS)
    d.update({f"IF_{name}": at for name, at in ITEM_OFFSETS.items()})
    d.update(MB_ITEM_INTS=MB_ITEM_INTS, MB_ITEM_FLOATS=MB_ITEM_FLOATS, MB_IF_COLOURS=MB_IF_COLOURS)
    d.update({f"MB_{name}": bit for name, bit in MB_FLAGS.items()})
    d.update(MB_MIN_POWER=MB_MIN_POWER, MB_MAX_POWER=MB_MAX_POWER, MB_TILE_ROWS=MB_TILE_ROWS,
             MB_TILE_COLS=MB_TILE_COLS)
    d.update(mb_marcher_defines())
    return d


UNSIGNED_PREFIXES = ("STREAM_", "DRAW_")  # u32 counter words in the kernels: unsigned literals


def literal(name: str, value: int | np.float32) -> str:
    """The C++ literal of a generated constant: a float32 as a hex float (its exact bits: no decimal
    rounding in any compiler), parenthesised when negative; an integer, unsigned for UNSIGNED_PREFIXES."""
    if isinstance(value, np.float32) and np.isfinite(value):
        digits, exponent = float(value).hex().split("p")  # 0x1.0624de0000000p-10: drop the trailing zeros
        text = f"{digits.rstrip('0').rstrip('.')}p{exponent}f"
        return f"({text})" if value < 0 else text
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return f"{int(value)}{'u' if name.startswith(UNSIGNED_PREFIXES) else ''}"
    raise TypeError(f"kernel constant {name}: {value!r} is neither an int nor a finite numpy float32")


def define_options() -> tuple[str, ...]:
    """``-DNAME=value`` for every generated constant, sorted (part of every build's cache key)."""
    return tuple(f"-D{name}={literal(name, value)}" for name, value in sorted(kernel_defines().items()))
