"""Tests of dataset recipes (fractal_pretrain.recipes) and renderer argument checks.

Covers: the five named recipes are listed and constructible; ``get_recipe`` errors (unknown recipe,
unknown override key, name/description overrides); one-line ``ConfigError`` messages naming the
field for out-of-range values; list -> tuple coercion of pair fields; recipe properties
(multi_object, multi_label, num_systems, bank_spec); ``make_renderer`` argument validation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fractal_pretrain.config import ConfigError
from fractal_pretrain.ifs.bank import BankSpec, build_bank
from fractal_pretrain.recipes import Recipe, get_recipe, list_recipes
from fractal_pretrain.render import make_renderer

NAMES = ("anderson", "fractal4ad", "multiformula", "multiinstance", "fractaldb", "ofdb", "selfsup")
SMALL = {"num_classes": 10, "num_points": 5000}


def test_all_recipes_listed():
    listed = list_recipes()
    assert set(listed) == set(NAMES) | {"mandelbulbvar", "multimandelbulb"}
    assert set(list_recipes("ifs")) == set(NAMES)
    assert all(isinstance(d, str) and d for d in listed.values())


@pytest.mark.parametrize("name", NAMES)
def test_recipe_constructible(name):
    recipe = get_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    assert recipe.num_classes == 1000
    small = get_recipe(name, SMALL)
    assert small.num_classes == 10 and small.num_points == 5000
    assert small.name == name
    # Overrides do not leak into the registry.
    assert get_recipe(name).num_classes == 1000
    # A recipe round-trips through its dict.
    data = small.to_dict()
    assert Recipe(**data) == small


def test_unknown_recipe_names_it_and_the_allowed_names():
    with pytest.raises(ConfigError) as err:
        get_recipe("mandelbrot")
    msg = str(err.value)
    assert "mandelbrot" in msg
    for name in NAMES:
        assert name in msg
    assert "\n" not in msg


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError) as err:
        get_recipe("anderson", {"num_pointz": 10})
    msg = str(err.value)
    assert "num_pointz" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("key", ["name", "description"])
def test_name_and_description_cannot_be_overridden(key):
    with pytest.raises(ConfigError, match=key):
        get_recipe("anderson", {key: "x"})


BAD_VALUES = [
    ("anderson", "num_points", 0),
    ("anderson", "chains", 0),
    ("anderson", "chains", 1025),
    ("anderson", "min_maps", 1),
    ("anderson", "max_maps", 9),
    ("anderson", "num_classes", 0),
    ("anderson", "objects", (0, 3)),
    ("multiinstance", "objects", (0, 3)),
    ("multiinstance", "objects", (3, 17)),
    ("anderson", "window_scale", (2.0, 1.0)),
    ("anderson", "render_mode", "x"),
    ("anderson", "patch", "point"),  # anderson is graded: point patches need binary
    ("anderson", "flips", "all"),
    ("anderson", "jitter", "big"),
    ("anderson", "sampler", "random"),
    ("anderson", "blur_p", 1.5),
    ("anderson", "saturation", (0.5, 1.5)),
    ("anderson", "grey_level", 0),
    ("anderson", "num_points", 1.5),
    ("anderson", "num_points", True),
]


@pytest.mark.parametrize("name, field, value", BAD_VALUES,
                         ids=[f"{n}-{f}-{v!r}" for n, f, v in BAD_VALUES])
def test_out_of_range_value_gives_one_line_error_naming_the_field(name, field, value):
    with pytest.raises(ConfigError) as err:
        get_recipe(name, {field: value})
    msg = str(err.value)
    assert field in msg, msg
    assert "\n" not in msg
    assert len(msg) < 300


def test_multi_object_needs_object_scale():
    with pytest.raises(ConfigError, match="object_scale"):
        get_recipe("anderson", {"objects": (1, 3)})


def test_multihot_needs_any_source():
    with pytest.raises(ConfigError, match="object_source"):
        get_recipe("multiinstance", {"object_source": "class"})


def test_list_values_are_coerced_to_tuples():
    recipe = get_recipe("anderson", {"window_scale": [0.5, 1.5], "jitter_range": [0.9, 1.0]})
    assert recipe.window_scale == (0.5, 1.5)
    assert isinstance(recipe.window_scale, tuple)
    assert isinstance(recipe.jitter_range, tuple)
    multi = get_recipe("multiinstance", {"objects": [2, 3]})
    assert multi.objects == (2, 3) and isinstance(multi.objects, tuple)
    hash(recipe)  # frozen and hashable after coercion
    hash(multi)
    # An int where a float is declared becomes a float.
    assert isinstance(get_recipe("anderson", {"window_translate": 0}).window_translate, float)


def test_optional_pair_list_is_coerced_to_tuple():
    multi = get_recipe("multiinstance", {"object_scale": [0.15, 0.6]})
    assert isinstance(multi.object_scale, tuple)
    assert multi == get_recipe("multiinstance")
    hash(multi)


def test_recipe_properties():
    for name in NAMES:
        recipe = get_recipe(name, SMALL)
        assert recipe.multi_label == (name == "multiinstance")
        assert recipe.multi_object == (name in ("multiformula", "multiinstance", "selfsup"))  # selfsup: pasted views
        assert recipe.num_systems == recipe.num_classes * recipe.systems_per_class
        spec = recipe.bank_spec()
        assert isinstance(spec, BankSpec)
        assert spec.num_systems == recipe.num_systems
        assert (spec.min_maps, spec.max_maps) == (recipe.min_maps, recipe.max_maps)
        assert spec.sampler == ("fractaldb" if name == "fractaldb" else "svd")
        assert spec.fill_threshold == recipe.fill_threshold
    assert get_recipe("fractal4ad", SMALL).num_systems == 500
    assert get_recipe("multiformula", SMALL).num_systems == 500
    assert get_recipe("anderson", SMALL).num_systems == 10


def test_recipe_is_frozen():
    recipe = get_recipe("anderson")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.num_points = 10  # type: ignore[misc]


@pytest.fixture(scope="module")
def small_bank():
    return build_bank(get_recipe("anderson", SMALL).bank_spec(), seed=0)


@pytest.mark.parametrize("kwargs, field", [
    ({"size": 4}, "size"),
    ({"size": 7}, "size"),
    ({"size": 5000}, "size"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"device": "tpu"}, "device"),
])
def test_make_renderer_rejects_bad_arguments(small_bank, kwargs, field):
    recipe = get_recipe("anderson", SMALL)
    with pytest.raises(ConfigError) as err:
        make_renderer(recipe, bank=small_bank, **kwargs)
    assert field in str(err.value)
    assert "\n" not in str(err.value)


def test_make_renderer_multi_object_minimum_size():
    recipe = get_recipe("multiinstance", SMALL)
    bank = build_bank(recipe.bank_spec(), seed=0)
    with pytest.raises(ConfigError, match="size"):
        make_renderer(recipe, size=12, bank=bank)
    assert make_renderer(recipe, size=16, bank=bank).size == 16


def test_make_renderer_bank_size_mismatch(small_bank):
    recipe = get_recipe("anderson", {**SMALL, "num_classes": 11})
    with pytest.raises(ConfigError, match="11"):
        make_renderer(recipe, size=32, bank=small_bank)


def test_plan_rejects_negative_indices_and_epochs(small_bank):
    renderer = make_renderer(get_recipe("anderson", SMALL), size=16, bank=small_bank)
    with pytest.raises(ConfigError, match="indices"):
        renderer.plan(np.array([0, -1]), 0)
    with pytest.raises(ConfigError, match="epoch"):
        renderer.plan(np.array([0]), -1)
