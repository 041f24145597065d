"""The method registry: every AD method is one ``MethodSpec``, looked up by name.

A method module defines its config dataclass and its ``run`` and calls ``register(MethodSpec(...))`` at
import; adding a method is that module plus its line in ``BUILTIN_MODULES``. Everything else (the
``ad-eval`` CLI, cells, grids, reports) asks the registry: ``get_method(name)``, ``list_methods()``.

``run`` has one signature for every method::

    run(backbone, split, *, layers, size, crop, config, device, seed, work_dir) -> MethodScores

``backbone`` an ``ad_eval.backbones.Backbone``; ``split`` an ``ad_eval.datasets.Split`` (its ``train``
already reduced to the cell's few-shot images); ``layers`` the resolved layer set, or None for methods
without layers; ``config`` an instance of the spec's config dataclass; ``work_dir`` a scratch folder.

Plugins: ``AD_EVAL_METHODS=pkg.module,other.module`` names extra modules imported with the built-in
ones (each registers its methods); it is how a grid's worker processes see a method that is not built
in, e.g. the test-only method of ``tests/ad_eval/test_registry.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ad_eval.methods.base import LAYER_NAMES, MethodScores, balanced_batch_sizes, check_layers, layer_set_label
from fractal_pretrain.config import ConfigError, build_checked

# One line per method module (list_methods keeps this order); the anomalib ones share anomalib_models.py.
BUILTIN_MODULES = (
    "ad_eval.methods.patchcore",
    "ad_eval.methods.padim",
    "ad_eval.methods.fastflow",
    "ad_eval.methods.cflow",
    "ad_eval.methods.rd",
    "ad_eval.methods.stfpm",
    "ad_eval.methods.panda",
    "ad_eval.methods.cutpaste",
    "ad_eval.methods.featurenorm",
)
PLUGIN_ENV = "AD_EVAL_METHODS"  # comma-separated extra modules to import (see the module docstring)
# Every non-empty subset of layer1..layer4, sorted as check_layers sorts: "any layer set".
ANY_LAYER_SET = tuple(
    combo for n in range(1, len(LAYER_NAMES) + 1) for combo in itertools.combinations(LAYER_NAMES, n)
)

RunFn = Callable[..., MethodScores]


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of ad_eval needs to know about a method."""

    name: str  # registry key: ``--method``, the record's "method", the cell id's prefix
    label: str  # how reports print it (PatchCore, C-Flow, ...)
    config: type  # frozen dataclass of hyper-parameters; its defaults are the reference values
    run: RunFn  # run(backbone, split, *, layers, size, crop, config, device, seed, work_dir)
    default_layers: tuple[str, ...] | None = None  # what ``layers: null`` means; None: takes no layers
    allowed_layer_sets: tuple[tuple[str, ...], ...] | None = None  # None for layer-free methods
    pixel_maps: bool = True  # gives anomaly maps (pixel AUROC, AUPRO); False: image scores only
    # (config, layers, image side) -> the fewest train images it can fit on; None: 1
    min_train_images: Callable[[Any, tuple[str, ...] | None, int], int] | None = None
    # (config, layers, image side) -> the fewest images every training batch must hold; the batches are
    # ``balanced_batch_sizes(count, config.train_batch_size)``; None: no per-batch need
    min_batch_images: Callable[[Any, tuple[str, ...] | None, int], int] | None = None
    accepts_projector: bool = False  # runs on projected residual features (``--projector``, ad_eval/projection.py)

    def __post_init__(self):
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ConfigError(f"method name={self.name!r}: must be a lower-case identifier")
        if not dataclasses.is_dataclass(self.config):
            raise ConfigError(f"method {self.name}: config={self.config!r} must be a dataclass")
        if (self.default_layers is None) != (self.allowed_layer_sets is None):
            raise ConfigError(f"method {self.name}: default_layers and allowed_layer_sets are both None or neither")
        if self.default_layers is not None and self.default_layers not in self.allowed_layer_sets:
            raise ConfigError(f"method {self.name}: default_layers={self.default_layers} is not an allowed set")

    @property
    def takes_layers(self) -> bool:
        return self.default_layers is not None

    def resolve_layers(self, layers: Sequence[str | int] | str | None) -> tuple[str, ...] | None:
        """The layer set to run: checked and sorted; None gives ``default_layers``."""
        if layers is None:
            return self.default_layers
        if not self.takes_layers:
            raise ConfigError(f"method={self.name!r} takes no layers (got {list(layers)})")
        names = check_layers(layers)
        if names not in self.allowed_layer_sets:
            allowed = "; ".join(", ".join(s) for s in self.allowed_layer_sets)
            raise ConfigError(f"{self.name} only supports layers {allowed}, not {', '.join(names)}")
        return names

    def make_config(self, overrides: Mapping[str, Any] | None = None):
        """The config dataclass with ``overrides`` applied (``fractal_pretrain.config.build_checked``).

        Errors are one line naming the method, the key, the value and what is allowed:
        ``patchcore config: unknown key 'k' (allowed: ...)``, ``patchcore config: num_neighbors=0: must be ...``.
        """
        return build_checked(self.config, dict(overrides or {}), f"{self.name} config")

    def check_train_images(self, count: int, config, layers: tuple[str, ...] | None, side: int,
                           shots: int | None = None) -> None:
        """A one-line error when ``count`` train images are too few for this method and config."""
        need = self.min_train_images(config, layers, side) if self.min_train_images else 1
        what = f"shots={shots}" if shots is not None else f"{count} train image(s)"
        if count < need:
            raise ConfigError(f"{self.name} cannot run with {what}: it needs at least {need} train images "
                              f"at this config and image size")
        if self.min_batch_images is not None:
            per_batch = self.min_batch_images(config, layers, side)
            smallest = min(balanced_batch_sizes(count, config.train_batch_size))
            if smallest < per_batch:
                raise ConfigError(f"{self.name} cannot run with {what} at train_batch_size={config.train_batch_size}: "
                                  f"its smallest training batch has {smallest} images, every batch needs at least "
                                  f"{per_batch} at this config and image size")


_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    """Adds ``spec``; returns it. A second, different spec under the same name is an error."""
    _load()  # the built-in methods first, whoever registers first
    known = _REGISTRY.get(spec.name)
    if known is not None and known != spec:
        raise ConfigError(f"method {spec.name!r} is already registered (by {known.run.__module__})")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Removes a method (tests that register a throw-away one clean up with this)."""
    _REGISTRY.pop(name, None)


def _load() -> None:
    """Imports the built-in method modules and the ``AD_EVAL_METHODS`` plugins once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    plugins = [m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]
    for module in (*BUILTIN_MODULES, *plugins):
        try:
            importlib.import_module(module)
        except ImportError as err:
            if module in plugins and err.name == module:
                raise ConfigError(f"{PLUGIN_ENV}: cannot import {module!r}") from None
            raise


def list_methods() -> tuple[str, ...]:
    """Names of every registered method: built-in ones in ``BUILTIN_MODULES`` order, then the others
    in registration order (whichever module a process happened to import first)."""
    _load()
    order = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    ranked = sorted(enumerate(_REGISTRY.values()), key=lambda p: (order.get(p[1].run.__module__, len(order)), p[0]))
    return tuple(spec.name for _, spec in ranked)


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; an unknown name is a ConfigError listing the known ones."""
    _load()
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown method {name!r}: must be one of {', '.join(list_methods())}")
    return spec


def describe(spec: MethodSpec) -> str:
    """Two lines for ``ad-eval methods``: name, label, layers, what it gives; its config keys and defaults."""
    if not spec.takes_layers:
        layers = "no layers"
    elif spec.allowed_layer_sets == ANY_LAYER_SET:
        layers = f"layers {layer_set_label(spec.default_layers)} (any of 1-4)"
    else:
        layers = f"layers {layer_set_label(spec.default_layers)} (allowed: " + ", ".join(
            layer_set_label(s) for s in spec.allowed_layer_sets) + ")"
    gives = "pixel maps" if spec.pixel_maps else "image scores only"
    projector = ", accepts --projector" if spec.accepts_projector else ""
    config = spec.config()
    keys = "  ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config))
    return f"{spec.name:<12} {spec.label:<12} {layers}, {gives}{projector}\n{'':25}--set keys: {keys or '-'}"
