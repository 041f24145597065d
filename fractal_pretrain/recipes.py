"""Fractal dataset recipes: declarative, validated configs of one generator (no code forks).

A recipe says how classes are built from IFS systems and which random augmentations each image gets.
The renderers (``render/reference.py`` for NumPy, ``render/cupy_renderer.py`` for the GPU) read only
these fields. References: fractal_anchors.md in ../shared/reference (Anderson & Farrell 2022,
FractalDB, fractal4AD).

| recipe        | classes x systems | objects / image       | label     | source                        |
|---------------|-------------------|-----------------------|-----------|-------------------------------|
| anderson      | 1000 x 1          | 1, fills the frame    | class     | Anderson & Farrell, frac.yaml |
| fractal4ad    | 1000 x 50         | 1, fills the frame    | class     | fractal4AD "Fractals"         |
| multiformula  | 1000 x 50         | 4-10 of its class     | class     | fractal4AD "Multi-Formula"    |
| multiinstance | 1000 x 1          | 1-5 of any class      | multi-hot | Anderson multi-instance       |
| fractaldb     | 1000 x 1          | 1, fills the frame    | class     | FractalDB-1k                  |
| ofdb          | 1000 x 1, once    | 1, fills the frame    | class     | OFDB-4AD (one image per class)|
| selfsup       | 1000 x 1          | 2 views of 1 fractal  | (system)  | Anderson SimSiam, ssfractal   |

``views`` = 2 makes a recipe *two-view* (self-supervised): each sample is one fractal (system, jitter,
window, chaos game, patch drawn from the sample's key) pasted into two canvases, each with its own flips,
colours, size ``object_scale`` x size, position, plasma and blur drawn from the view's key
(``render/params.py plan_views``). A batch of B samples renders as 2B images: all first views, then all
second views.

``images_per_class`` > 0 makes a recipe a *fixed image set*: indices ``[0, images_per_class * num_classes)``
of epoch 0 are rendered once (index i has class i % num_classes) and training draws from that set
(``train/images.py``), with all per-sample variety coming from ``data.augment``.

The Mandelbulb-variation recipes (``mandelbulbvar``, ``multimandelbulb``) are ``MandelbulbRecipe``s
(``mandelbulb/recipe.py``): ray-marched 3D formulas instead of IFS systems, listed and overridden here too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fractal_pretrain.config import ConfigError, check_choice, check_pair, check_range, replace_checked
from fractal_pretrain.ifs.bank import BankSpec
from fractal_pretrain.ifs.sample import MAX_MAPS
from fractal_pretrain.mandelbulb.recipe import RECIPES as MANDELBULB_RECIPES
from fractal_pretrain.mandelbulb.recipe import MandelbulbRecipe

MAX_OBJECTS = 16  # object slots per image (the slot number has 8 bits in the RNG tag)
# Choices whose position is what the kernels see (render/kernel_constants.py generates JITTER_*, PATCH_*).
JITTERS = ("none", "basic", "fractaldb", "svd")
PATCHES = ("none", "image", "point")
FLIP_BITS = {"none": 0, "hv": 6, "dihedral": 7}  # bits: 1 transpose, 2 flip rows, 4 flip columns
VIEW_CHOICES = (0, 2)  # views per sample: 0 = one plain image
MAX_CHAINS = 1024  # chains per fractal = CUDA threads per block
RENDER_SIZE = 256  # image side of fresh renders when none is given
FIXED_SET_SIZE = 512  # image side of a render-once set when none is given (OFDB-4AD rendered its images at 512 px)


@dataclass(frozen=True)
class Recipe:
    """One way of turning IFS systems into labelled images. Every field is validated."""

    name: str = "custom"
    description: str = ""
    # --- classes and the system bank ---
    num_classes: int = 1000  # labels
    systems_per_class: int = 1  # bank size = num_classes * systems_per_class
    sampler: str = "svd"  # "svd" (Anderson, contractive) | "fractaldb" (unconstrained + fill filter)
    min_maps: int = 2  # maps per system, inclusive range
    max_maps: int = 4
    fill_threshold: float = 0.2  # fractaldb bank: minimum fill rate of an accepted system
    # --- chaos game ---
    num_points: int = 100_000  # recorded points per fractal
    chains: int = 256  # parallel chains per fractal, each started at the fixed point of map 0
    burn_in: int = 20  # unrecorded steps per chain (decorrelates chains that share a start)
    # --- per-fractal augmentation ---
    # "none" | "basic" (one map's row x U(jitter_range)) | "fractaldb" (weights) | "svd" (Anderson's: one map's
    # U or V rotated by U(-0.5, 0.5) rad, or its translation shifted by U(-0.5, 0.5)^2)
    jitter: str = "basic"
    jitter_range: tuple[float, float] = (0.8, 1.1)
    jitter_tries: int = 4  # basic jitter: attempts before falling back to the unjittered system
    window_translate: float = 0.2  # window centre shift, fraction of the extent per axis
    window_scale: tuple[float, float] = (0.5, 2.0)  # window size, fraction of the extent per axis
    render_mode: str = "graded"  # "graded" (count / max) | "binary"
    patch: str = "image"  # "none" | "image" (one 3x3 mask per fractal) | "point" (a mask per point)
    flips: str = "dihedral"  # "none" | "hv" (4 flips, FractalDB) | "dihedral" (8 flips, Anderson)
    color: bool = True  # HSV colouring with hue following density; False: grey
    grey_level: int = 127  # grey value of a full-density pixel when color is False
    saturation: tuple[float, float] = (0.3, 1.0)
    value: tuple[float, float] = (0.5, 1.0)
    # --- per-image ---
    background: bool = True  # diamond-square plasma background; False: black
    blur_p: float = 0.5  # probability of a 3x3 Gaussian blur
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    # --- multi-object composition (objects = (1, 1) and object_scale None: one fractal, full frame) ---
    objects: tuple[int, int] = (1, 1)  # objects per image, inclusive
    object_scale: tuple[float, float] | None = None  # object side as a fraction of the image side
    object_source: str = "class"  # "class": the image class's own systems | "any": any class
    label: str = "class"  # "class" | "multihot" (one bit per object class)
    # --- fixed image set (OFDB) ---
    images_per_class: int = 0  # 0: every sample a fresh render; n: n images per class rendered once
    # --- two views of one fractal (self-supervised objectives) ---
    views: int = 0  # 0: one image per sample; 2: two views per sample (needs object_scale: the view size)

    def __post_init__(self):
        check_range("num_classes", self.num_classes, 1, integer=True)
        check_range("systems_per_class", self.systems_per_class, 1, integer=True)
        check_choice("sampler", self.sampler, ("svd", "fractaldb"))
        check_range("min_maps", self.min_maps, 2, MAX_MAPS, integer=True)
        check_range("max_maps", self.max_maps, self.min_maps, MAX_MAPS, integer=True)
        check_range("fill_threshold", self.fill_threshold, 0.0, 1.0)
        check_range("num_points", self.num_points, 1, 2**31 - 1, integer=True)
        check_range("chains", self.chains, 1, MAX_CHAINS, integer=True)
        check_range("burn_in", self.burn_in, 0, 10_000, integer=True)
        check_choice("jitter", self.jitter, JITTERS)
        check_pair("jitter_range", self.jitter_range, 0.0, 10.0)
        check_range("jitter_tries", self.jitter_tries, 1, 16, integer=True)
        check_range("window_translate", self.window_translate, 0.0, 10.0)
        check_pair("window_scale", self.window_scale, 1e-3, 100.0)
        check_choice("render_mode", self.render_mode, ("graded", "binary"))
        check_choice("patch", self.patch, PATCHES)
        if self.patch == "point" and self.render_mode != "binary":
            raise ConfigError("patch='point' needs render_mode='binary' (graded per-point stamps are not supported)")
        check_choice("flips", self.flips, tuple(FLIP_BITS))
        check_choice("color", self.color, (True, False))
        check_range("grey_level", self.grey_level, 1, 255, integer=True)
        check_pair("saturation", self.saturation, 0.0, 1.0)
        check_pair("value", self.value, 0.0, 1.0)
        check_choice("background", self.background, (True, False))
        check_range("blur_p", self.blur_p, 0.0, 1.0)
        check_pair("blur_sigma", self.blur_sigma, 0.4, 10.0)  # exp_neg is exact to ~1e-9 there
        check_pair("objects", self.objects, 1, MAX_OBJECTS)
        if any(not isinstance(n, int) for n in self.objects):
            raise ConfigError(f"objects={list(self.objects)!r}: must be integers")
        if self.object_scale is not None:
            check_pair("object_scale", self.object_scale, 0.01, 2.0)
        elif self.objects != (1, 1):
            raise ConfigError("objects other than [1, 1] need object_scale (the object size range)")
        check_choice("object_source", self.object_source, ("class", "any"))
        check_choice("label", self.label, ("class", "multihot"))
        if self.label == "multihot" and self.object_source != "any":
            raise ConfigError("label='multihot' needs object_source='any' (labels come from the objects)")
        check_range("images_per_class", self.images_per_class, 0, 1_000_000, integer=True)
        if self.images_per_class and self.multi_label:
            raise ConfigError("images_per_class > 0 needs a single-label recipe (label='class')")
        check_choice("views", self.views, VIEW_CHOICES)
        if self.views:
            if self.object_scale is None or self.objects != (1, 1):
                raise ConfigError("views=2 needs objects=[1, 1] and object_scale (the view size range)")
            if self.multi_label or self.images_per_class:
                raise ConfigError("views=2 needs label='class' and images_per_class=0 (every view rendered fresh)")

    @property
    def multi_object(self) -> bool:
        """True when images are composed of pasted, resized fractals."""
        return self.object_scale is not None

    @property
    def multi_label(self) -> bool:
        return self.label == "multihot"

    @property
    def fixed_images(self) -> int:
        """Size of the fixed image set (0: no fixed set, every sample is rendered afresh)."""
        return self.images_per_class * self.num_classes

    @property
    def num_systems(self) -> int:
        return self.num_classes * self.systems_per_class

    def bank_spec(self) -> BankSpec:
        """The system bank this recipe draws from (system k belongs to class k // systems_per_class)."""
        return BankSpec(
            sampler=self.sampler,
            num_systems=self.num_systems,
            min_maps=self.min_maps,
            max_maps=self.max_maps,
            fill_threshold=self.fill_threshold,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_IFS_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="anderson",
            description="Anderson & Farrell: 1000 classes x 1 system, variety from full augmentation",
        ),
        Recipe(
            name="fractal4ad",
            description="fractal4AD 'Fractals': 1000 classes x 50 systems, no patch, black background",
            systems_per_class=50,
            patch="none",
            background=False,
        ),
        Recipe(
            name="multiformula",
            description="fractal4AD 'Multi-Formula': 4-10 objects of the class's 50 systems, one label",
            systems_per_class=50,
            background=False,
            objects=(4, 10),
            object_scale=(0.15, 0.6),
            object_source="class",
        ),
        Recipe(
            name="multiinstance",
            description="Anderson multi-instance: 1-5 objects of any class at 15-60% size, multi-hot label",
            jitter="none",
            objects=(1, 5),
            object_scale=(0.15, 0.6),
            object_source="any",
            label="multihot",
        ),
        Recipe(
            name="fractaldb",
            description="FractalDB-1k: unconstrained maps, fill >= 0.2, weight instances, grey patches",
            sampler="fractaldb",
            min_maps=2,
            max_maps=7,
            jitter="fractaldb",
            window_translate=0.0,
            window_scale=(1.0, 1.0),
            render_mode="binary",
            patch="point",
            flips="hv",
            color=False,
            background=False,
            blur_p=0.0,
        ),
        Recipe(
            name="ofdb",
            description="OFDB-4AD: 1000 classes x 1 system, one fractal4AD-style image per class rendered once",
            patch="none",
            background=False,
            images_per_class=1,
        ),
        Recipe(
            name="selfsup",
            description="Anderson SimSiam (ssfractal): two views of one fractal, each its own look, 25-125% size",
            jitter="svd",
            window_translate=0.0,  # ssfractal renders over the points' bounding box: no window zoom or shift
            window_scale=(1.0, 1.0),
            blur_sigma=(0.5, 2.0),
            object_scale=(0.25, 1.25),
            views=2,
        ),
    )
}


_RECIPES: dict[str, Recipe | MandelbulbRecipe] = {**_IFS_RECIPES, **{r.name: r for r in MANDELBULB_RECIPES}}


def list_recipes(family: str | None = None) -> dict[str, str]:
    """Recipe name -> one-line description; ``family`` "ifs" or "mandelbulb" lists only those."""
    return {name: recipe.description for name, recipe in _RECIPES.items()
            if family is None or recipe_family(recipe) == family}


def recipe_family(recipe) -> str:
    """"ifs" (Recipe: chaos-game renderers) or "mandelbulb" (MandelbulbRecipe: the ray marcher)."""
    return "mandelbulb" if isinstance(recipe, MandelbulbRecipe) else "ifs"


def default_size(recipe: Recipe | MandelbulbRecipe) -> int:
    """The image side a recipe renders at when ``data.size`` / ``--size`` is not given."""
    return FIXED_SET_SIZE if recipe.fixed_images else RENDER_SIZE


def get_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe | MandelbulbRecipe:
    """A named recipe, optionally with some fields replaced (validated; unknown keys are errors)."""
    if name not in _RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; allowed: {', '.join(_RECIPES)}")
    overrides = dict(overrides or {})
    if "name" in overrides or "description" in overrides:
        raise ConfigError("recipe overrides may not change 'name' or 'description'")
    return replace_checked(_RECIPES[name], overrides)
