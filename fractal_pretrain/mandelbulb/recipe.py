"""Mandelbulb-variation recipes: classes of (power, rule) formulas, ray-marched (strong_recipes.md section 2).

A *formula* is a power p in 2..18 and a 9-bit rule (for each output axis x, y, z: sin instead of cos,
theta instead of phi, negative sign; most significant bit first, as the published generator reads
``bin(rule)``). MandelbulbVAR-1k has one formula per class: 17 powers x the 61 rules of the published list
= 1037 classes, power-major (class k: power 2 + k // 61, rule ``rules[k % 61]``), one centred object per
image, white background. fractal4AD's MultiMandelbulbs groups the formulas: class k owns formulas
``order[k * m:(k + 1) * m]`` with m = formulas // num_classes (the published run: 1037 // 200 = 5, 37 unused)
and draws n = min(U{4..10}, m) objects per image, each of a member chosen with replacement.

The published generator's quirks are keys, defaulting to what the published datasets did:
``view_angles: radians`` (latitude/longitude drawn in degrees but used as radians), ``diffuse_normal:
negated`` (the diffuse term uses -grad DE) and ``derivative: r^p`` (dr <- r^p p dr + 1, not r^(p-1)).
``r^(p-1)`` meets float32 denormals, which the GPU build flushes (CuPy compiles with -ftz=true): with it a
few pixels differ between the GPU and the CPU renderers (5 of 6912 in test_mandelbulb.py's 24 px check).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fractal_pretrain.config import ConfigError, check_choice, check_pair, check_range

# The 61 rules of the MandelbulbVAR-1k command (generator README @ 538f5e1), in that order.
MANDELBULBVAR_1K_RULES = (
    107, 106, 263, 334, 205, 271, 434, 225, 331, 413, 141, 167, 424, 196, 222, 461, 488, 109, 151, 232, 42,
    188, 507, 32, 451, 132, 190, 481, 143, 96, 180, 388, 397, 68, 135, 197, 360, 40, 465, 243, 506, 160, 327,
    175, 105, 223, 198, 332, 452, 174, 281, 395, 238, 386, 161, 168, 204, 416, 244, 418, 297,
)
RULE_LISTS = {"mandelbulbvar-1k": MANDELBULBVAR_1K_RULES}
POWER_RANGE = (2, 18)  # published powers; the kernels' integer power loop covers 5 bits
MAX_RULE = 511
MAX_OBJECTS = 16  # object slots per image (8 bits of the RNG tag)
MAX_SUPERSAMPLE = 8
BACKGROUNDS = ("white", "black", "plasma")
MODES = ("on_the_fly", "view_bank")


@dataclass(frozen=True)
class MandelbulbRecipe:
    """One way of turning Mandelbulb-variation formulas into labelled images. Every field is validated."""

    name: str = "custom"
    description: str = ""
    # --- classes ---
    powers: tuple[int, int] = POWER_RANGE  # inclusive
    rules: str | tuple[int, ...] = "mandelbulbvar-1k"  # a name of RULE_LISTS or explicit rule numbers
    num_classes: int = 1037  # labels; each class owns formulas // num_classes formulas (1 for MandelbulbVAR)
    group_order: str = "listed"  # members of a class: "listed" (power-major order) | "shuffled" (by the seed)
    # --- objects per image ---
    objects: tuple[int, int] = (1, 1)  # drawn count, capped at the class's members (fractal4AD)
    object_scale: tuple[float, float] | None = None  # None: one centred object filling the frame
    background: str = "white"  # "white" (MandelbulbVAR) | "black" (fractal4AD) | "plasma" (-back)
    # --- view and colour draws ---
    view_angles: str = "radians"  # "radians": the published quirk (degrees used as radians) | "degrees"
    latitude: tuple[float, float] = (-90.0, 90.0)  # drawn in degrees
    longitude: tuple[float, float] = (0.0, 360.0)
    # --- ray marcher and shading ---
    supersample: int = 1  # rays per pixel side (published: 2 at 2x the size, then LANCZOS; here a box filter)
    shadow: bool = True  # the shadow ray toward the light (+0.2 grey where it escapes)
    diffuse_normal: str = "negated"  # "negated": the published 0.9 max(0, l . -n) | "outward": l . n
    derivative: str = "r^p"  # "r^p": the shader's dr <- r^p p dr + 1 | "r^(p-1)": the textbook estimator
    early_exit: bool = True  # stop rays at L >= 10 (primary) / 10000 (shadow): the same image, fewer steps
    # --- where objects come from ---
    # "view_bank": bank_views views per formula rendered on the device at setup (keyed by the seed, kept
    # resident), each sample composes a drawn view; "on_the_fly": every object ray-marched for its sample.
    # The default is the bank: on the fly is predicted at ~6k images/s on an H100 at 256 px, well under
    # wide_resnet50_2's ~2.3k images/s x 20 needed to stay >= 0.95 of its ceiling (benchmarks/PENDING_GPU.md).
    mode: str = "view_bank"
    bank_views: int = 64  # views per formula (the published dataset: 1000, as files)

    def __post_init__(self):
        if isinstance(self.rules, list):  # YAML / --set lists: stored as a tuple (the recipe is frozen, hashable)
            object.__setattr__(self, "rules", tuple(self.rules))
        check_pair("powers", self.powers, *POWER_RANGE)
        if any(isinstance(p, bool) or not isinstance(p, int) for p in self.powers):
            raise ConfigError(f"powers={list(self.powers)!r}: must be integers in [2, 18]")
        allowed_rules = f"a list name ({', '.join(RULE_LISTS)}) or a non-empty list of distinct rule numbers 0..511"
        if isinstance(self.rules, str):
            if self.rules not in RULE_LISTS:
                raise ConfigError(f"rules={self.rules!r}: must be {allowed_rules}")
        else:
            if not isinstance(self.rules, (tuple, list)) or not self.rules:
                shown = list(self.rules) if isinstance(self.rules, tuple) else self.rules
                raise ConfigError(f"rules={shown!r}: must be {allowed_rules}")
            for rule in self.rules:
                check_range("rules", rule, 0, MAX_RULE, integer=True)
            if len(set(self.rules)) != len(self.rules):
                raise ConfigError(f"rules={list(self.rules)!r}: rule numbers must be distinct")
        check_range("num_classes", self.num_classes, 1, self.num_formulas, integer=True)
        check_choice("group_order", self.group_order, ("listed", "shuffled"))
        check_pair("objects", self.objects, 1, MAX_OBJECTS)
        if any(isinstance(n, bool) or not isinstance(n, int) for n in self.objects):
            raise ConfigError(f"objects={list(self.objects)!r}: must be integers")
        if self.object_scale is not None:
            check_pair("object_scale", self.object_scale, 0.01, 2.0)
        elif self.objects != (1, 1):
            raise ConfigError("objects other than [1, 1] need object_scale (the object size range)")
        check_choice("background", self.background, BACKGROUNDS)
        check_choice("view_angles", self.view_angles, ("radians", "degrees"))
        check_pair("latitude", self.latitude, -360.0, 360.0)
        check_pair("longitude", self.longitude, -720.0, 720.0)
        check_range("supersample", self.supersample, 1, MAX_SUPERSAMPLE, integer=True)
        check_choice("shadow", self.shadow, (True, False))
        check_choice("diffuse_normal", self.diffuse_normal, ("negated", "outward"))
        check_choice("derivative", self.derivative, ("r^p", "r^(p-1)"))
        check_choice("early_exit", self.early_exit, (True, False))
        check_choice("mode", self.mode, MODES)
        check_range("bank_views", self.bank_views, 1, 2**16, integer=True)

    # --- derived (the interface the data module, export and CLI read from every recipe) ---
    multi_label = False
    fixed_images = 0  # every sample is ray-marched (or composed from the view bank) afresh: no fixed set
    views = 0  # one image per sample (no two-view objective)

    @property
    def rule_list(self) -> tuple[int, ...]:
        return RULE_LISTS[self.rules] if isinstance(self.rules, str) else tuple(self.rules)

    @property
    def num_formulas(self) -> int:
        return (self.powers[1] - self.powers[0] + 1) * len(self.rule_list)

    @property
    def members_per_class(self) -> int:
        return self.num_formulas // self.num_classes

    @property
    def multi_object(self) -> bool:
        return self.object_scale is not None

    def formula(self, k) -> tuple:
        """(power, rule) of formula k (power-major order); k may be an integer array."""
        import numpy as np

        rules = np.asarray(self.rule_list, dtype=np.int64)
        k = np.asarray(k, dtype=np.int64)
        return self.powers[0] + k // len(rules), rules[k % len(rules)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES = (
    MandelbulbRecipe(
        name="mandelbulbvar",
        description="MandelbulbVAR-1k: 17 powers x 61 rules = 1037 classes, one object, random view and colours",
    ),
    MandelbulbRecipe(
        name="multimandelbulb",
        description="fractal4AD MultiMandelbulbs: 200 classes x 5 formulas, 4-5 objects at 15-60%, black",
        num_classes=200,
        group_order="shuffled",
        objects=(4, 10),
        object_scale=(0.15, 0.6),
        background="black",
    ),
)
