"""The anomalib 2.7 adapter: one evaluation cell of an anomalib model around our backbone.

Each anomalib method is its own module -- ``patchcore.py``, ``padim.py``, ``fastflow.py``,
``cflow.py``, ``rd.py``, ``stfpm.py`` -- holding its config dataclass, its construction (the anomalib
class call), where its frozen extractor(s) live, the archs it can be built for and its layer sets; it
registers with ``register_anomalib(AnomalibModel(...), MethodSpec(...))``. This module is what they
share, with no per-method branches: ``build_model(method, ...)`` constructs offline and injects,
``run_anomalib(method, backbone, split, ...)`` fits on ``split.train`` with anomalib's ``Engine`` and
returns per-image scores and anomaly maps of ``split.test`` as ``MethodScores``; metrics are computed
by ``ad_eval.metrics``, not anomalib.

Backbone (shared/reference/anomalib.md, method A): each model is built with the *string*
backbone ``backbone.arch`` and ``pre_trained=False`` while ``timm.create_model`` is patched to
force ``pretrained=False`` (STFPM hard-codes a pretrained teacher), so construction never touches
the network; then our weights are loaded into the frozen timm extractor(s) named by the method's
``AnomalibModel.extractors`` with ``ad_eval.backbones.inject`` (every extractor key present, shapes
equal). ``frozen_extractors`` returns them.

Data: the images are decoded, resized (and centre-cropped) once by ``ADImageDataset`` -- the same
code and pixels every other ad_eval method sees -- with identity normalisation, kept in memory,
and fed through plain ``DataLoader``s as anomalib ``ImageBatch``es (train shuffled with a seeded
generator, in balanced batches of at most ``train_batch_size``: 17 images at 16 are 9 + 8, not 16 + 1).
The model's ``PreProcessor`` is ``Resize(out_size) + Normalize(backbone mean/std)``:
the resize is an exact no-op on images already at ``out_size`` (torchvision returns the input
unchanged) and is there because FastFlow and RD read their input size from it; normalisation
therefore happens exactly once, with the backbone's statistics. No anomalib datamodule is used:
it would rescan the folders with its own pairing rules and copy the test set as validation set.

Protocol: fixed epochs from the method's config (no validation loop, no early stopping, nothing
chosen on the test set); anomalib's post-processor, evaluator and visualizer are off, so the scores
are the raw model outputs; Lightning runs barebones (no checkpoints, logs or progress bar) under
``deterministic="warn"`` after ``seed_everything(seed)`` (PaDiM's channel subset, the coreset,
the random inits and the shuffling all depend on it).

Layer sets (``layers=None`` = the method's reference set, its spec's ``default_layers``) and archs
(``AnomalibModel.archs``) are declared by each method's module.

Example::

    backbone = load_backbone("runs/fractal/backbone.pt")
    split = scan("mvtec", "/data/mvtec_anomaly_detection", "bottle")
    scores = run_anomalib("patchcore", backbone, split, work_dir=Path("runs/cell"))
    compute_all(scores.image_scores, scores.image_labels, scores.anomaly_maps, scores.masks)
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ad_eval.backbones import Backbone, inject
from ad_eval.datasets import ADImageDataset, Sample, Split
from ad_eval.methods.base import LAYER_NAMES, MethodScores, balanced_batch_sizes
from ad_eval.methods.registry import MethodSpec, get_method, list_methods, register
from fractal_pretrain.config import ConfigError, check_range

# anomalib, lightning and timm are imported where used: importing anomalib takes seconds, and the
# registry imports this module (through the method modules) whenever any method is looked up.

LOADER_KEYS = ("train_batch_size", "eval_batch_size")


# ----------------------------------------------------------------------------- configuration
# Per-method hyper-parameters (each method's module): anomalib 2.7 defaults (= the papers'); epochs =
# the max_epochs of anomalib's examples/configs/model/*.yaml, run in full here since those configs'
# EarlyStopping monitors test pixel AUROC. Every config derives from one of these two.


@dataclass(frozen=True)
class LoaderConfig:
    """Loader settings every anomalib method has (anomalib's datamodule defaults)."""

    train_batch_size: int = 32  # images per training step
    eval_batch_size: int = 32  # images per prediction step

    def __post_init__(self):
        for key in LOADER_KEYS:
            check_range(key, getattr(self, key), 1, integer=True)


@dataclass(frozen=True)
class TrainedConfig(LoaderConfig):
    """A method trained for a fixed number of epochs (no early stopping: nothing is chosen on test data)."""

    max_epochs: int = 1  # full passes over the train images

    def __post_init__(self):
        super().__post_init__()
        check_range("max_epochs", self.max_epochs, 1, integer=True)


# ----------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class AnomalibModel:
    """What differs between the anomalib methods, declared by each method's module."""

    # (backbone, layers, hyper, common) -> the anomalib Lightning module, called while
    # ``offline_construction`` is active. hyper: the config's fields minus LOADER_KEYS and max_epochs;
    # common: pre-processor and the switched-off post-processor, evaluator and visualizer, as kwargs.
    construct: Callable[[Backbone, tuple[str, ...], dict, dict], nn.Module]
    extractors: Mapping[str, str]  # frozen timm module(s) that get our weights: name -> path from the module
    archs: tuple[str, ...] | None = None  # archs anomalib can build it for (looked up by name); None: any ResNet


_MODELS: dict[str, AnomalibModel] = {}  # method name -> its AnomalibModel, filled by register_anomalib


def register_anomalib(model: AnomalibModel, spec: MethodSpec) -> MethodSpec:
    """Registers ``spec`` (its ``run`` calls ``run_anomalib(spec.name, ...)``) and what builds its model."""
    registered = register(spec)
    _MODELS[spec.name] = model
    return registered


_DEVICES = ("auto", "cpu", "cuda", "gpu")
_LOAD_THREADS = 8  # image decoding threads (PIL and torch resize release the GIL)


def resolve_config(method: str, config: dict | None = None) -> dict:
    """The method's config with ``config`` applied, as a dict; unknown keys and bad values are ConfigErrors."""
    return dataclasses.asdict(_config(method, config))


def _config(method: str, config):
    """``config`` if it already is the method's dataclass, else one built from overrides."""
    spec = _spec(method)
    return config if isinstance(config, spec.config) else spec.make_config(config)


def resolve_layers(method: str, layers: Sequence[str] | str | None) -> tuple[str, ...]:
    """The layer set for ``method``: checked, sorted; None gives its default set."""
    return _spec(method).resolve_layers(layers)


def _anomalib_methods() -> tuple[str, ...]:
    """The registered anomalib methods, in ``list_methods`` order (which loads them all)."""
    return tuple(name for name in list_methods() if name in _MODELS)


def _spec(method: str) -> MethodSpec:
    methods = _anomalib_methods()
    if method not in methods:
        raise ConfigError(f"unknown method {method!r}: must be one of {', '.join(methods)}")
    return get_method(method)


def _check_arch(method: str, arch: str) -> None:
    allowed = _MODELS[method].archs
    if allowed is not None and arch not in allowed:
        raise ValueError(
            f"{method} does not support arch={arch} (anomalib looks the backbone up by name); "
            f"supported: {', '.join(allowed)}"
        )


def __getattr__(name: str):
    """Tables derived from the registry on first use (the method modules register after this one loads).

    METHODS: the anomalib methods' names; DEFAULTS: method -> its config's defaults as a dict;
    DEFAULT_LAYERS: method -> what ``layers=None`` means; FIXED_LAYERS: method -> its only layer set,
    for the methods whose anomalib implementation fixes it (FastFlow, RD).
    """
    if name == "METHODS":
        return _anomalib_methods()
    if name not in ("DEFAULTS", "DEFAULT_LAYERS", "FIXED_LAYERS"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    specs = [get_method(method) for method in _anomalib_methods()]
    if name == "DEFAULTS":
        return {spec.name: dataclasses.asdict(spec.config()) for spec in specs}
    if name == "DEFAULT_LAYERS":
        return {spec.name: spec.default_layers for spec in specs}
    return {spec.name: spec.allowed_layer_sets[0] for spec in specs if len(spec.allowed_layer_sets) == 1}


# ----------------------------------------------------------------------------- construction


@contextlib.contextmanager
def offline_construction() -> Iterator[None]:
    """While active, ``timm.create_model`` never loads pretrained weights (so never downloads).

    anomalib calls it through the module attribute (TimmFeatureExtractor, FastFlow), so patching
    ``timm.create_model`` catches every backbone it builds, STFPM's hard-coded pretrained teacher
    included. Not thread-safe: construct models from one thread at a time.
    """
    import timm

    real = timm.create_model

    def create_model(*args, **kwargs):
        kwargs["pretrained"] = False
        return real(*args, **kwargs)

    with mock.patch.object(timm, "create_model", create_model):
        yield


def make_pre_processor(
    out_size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    """Resize to ``out_size`` (a no-op on our already-sized batches) and normalise once."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    return PreProcessor(
        transform=Compose([Resize(list(out_size), antialias=True), Normalize(list(mean), list(std))])
    )


def build_model(
    method: str,
    backbone: Backbone,
    *,
    layers: Sequence[str] | str | None = None,
    out_size: tuple[int, int] = (256, 256),
    config: dict | None = None,
) -> nn.Module:
    """Construct ``method`` offline around ``backbone`` and inject its weights.

    Seed before calling (PaDiM draws its channel subset and the trained heads their init here).

    Args:
        method: a registered anomalib method (``METHODS``).
        backbone: the weights; ``backbone.arch`` names the timm model.
        layers: layer set (None: the method's ``default_layers``).
        out_size: (height, width) of the model input.
        config: the method's config dataclass, or overrides of ``DEFAULTS[method]``.

    Returns:
        The anomalib Lightning module, its frozen extractor(s) holding ``backbone``'s weights.
    """
    names = resolve_layers(method, layers)
    # Loaded before offline_construction patches timm: a module binding create_model at import binds the real one.
    import anomalib.models  # noqa: F401

    cfg = resolve_config(method, config)
    _check_arch(method, backbone.arch)
    hyper = {k: v for k, v in cfg.items() if k not in ("max_epochs", *LOADER_KEYS)}
    common = {
        "pre_processor": make_pre_processor(out_size, backbone.mean, backbone.std),
        "post_processor": False,  # raw scores: no thresholding or min-max normalisation
        "evaluator": False,  # metrics come from ad_eval.metrics
        "visualizer": False,
    }
    with offline_construction():
        model = _MODELS[method].construct(backbone, names, hyper, common)
    for where, extractor in frozen_extractors(method, model).items():
        inject(extractor, backbone, where=f"{method} {where}")
    return model


def frozen_extractors(method: str, model: nn.Module) -> dict[str, nn.Module]:
    """The timm modules of ``model`` that hold the evaluated backbone, by name."""
    _spec(method)
    return {name: operator.attrgetter(path)(model) for name, path in _MODELS[method].extractors.items()}


# ----------------------------------------------------------------------------- data


class _Items(Dataset):
    """Preloaded ``ADImageDataset`` items (the decoding is done once, not once per epoch)."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _load_items(samples: Sequence[Sample], size, crop) -> list[dict]:
    """Images resized/cropped in [0, 1] (normalisation is the PreProcessor's), with masks."""
    dataset = ADImageDataset(samples, size=size, crop=crop, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    threads = max(1, min(_LOAD_THREADS, os.cpu_count() or 1, len(dataset)))
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(dataset.__getitem__, range(len(dataset))))


def _collate(items: list[dict]):
    from anomalib.data import ImageBatch

    return ImageBatch(
        image=torch.stack([item["image"] for item in items]),
        gt_label=torch.tensor([item["label"] for item in items]),
        gt_mask=torch.stack([item["mask"][0] for item in items]),
        image_path=[item["path"] for item in items],
    )


# ----------------------------------------------------------------------------- running


def run_anomalib(
    method: str,
    backbone: Backbone,
    split: Split,
    *,
    layers: Sequence[str] | str | None = None,
    size: int | Sequence[int] = 256,
    crop: int | Sequence[int] | None = None,
    config: dict | None = None,
    device: str = "auto",
    seed: int = 0,
    work_dir: Path,
) -> MethodScores:
    """Fit ``method`` on ``split.train`` and score ``split.test``.

    Args:
        method: a registered anomalib method (``METHODS``).
        backbone: the evaluated weights and their normalisation.
        split: from ``ad_eval.datasets.scan``.
        layers: backbone stages used (None: the method's ``default_layers``); checked against the
            spec's ``allowed_layer_sets`` (FastFlow and RD: only layer1-3).
        size, crop: resize target and optional centre crop (as ``ADImageDataset``); the model
            input and the evaluation size are ``crop or size``.
        config: the method's config dataclass, or overrides of ``DEFAULTS[method]``.
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "gpu" or "cuda:N".
        seed: seeds everything before construction (PaDiM subset, coreset, inits, shuffling).
        work_dir: Lightning's default_root_dir (anomalib creates versioned folders there).

    Returns:
        Scores in the order of ``split.test``: raw ``pred_score`` per image and ``anomaly_map``
        resized (bilinear) to the mask size if needed, float32 (N, H, W), masks bool (N, H, W).
    """
    from lightning.pytorch import seed_everything

    names = resolve_layers(method, layers)
    cfg = resolve_config(method, config)
    _check_arch(method, backbone.arch)
    accelerator, devices = _accelerator(device)

    train_items = _load_items(split.train, size, crop)
    test_items = _load_items(split.test, size, crop)
    out_size = tuple(test_items[0]["image"].shape[-2:])

    with _caller_deterministic_flags():
        seed_everything(seed, workers=True, verbose=False)
        model = build_model(method, backbone, layers=names, out_size=out_size, config=cfg)
        project_features(method, model, backbone, names, size, crop)
        batches = _fit_and_predict(
            model, train_items, test_items, cfg, accelerator=accelerator, devices=devices, seed=seed,
            work_dir=Path(work_dir)
        )
    return _test_scores(method, batches, split, test_items, out_size)


def _accelerator(device: str) -> tuple[str, int | list[int]]:
    """Lightning's (accelerator, devices) for ``device``: "auto" is CUDA if available, else CPU; "cuda:N" is GPU
    N alone (ad_eval.cell resolves a cell's device to "cuda" or "cuda:N", which Lightning takes as devices)."""
    index = re.fullmatch(r"cuda:(\d+)", device)
    if index:
        return "cuda", [int(index[1])]
    if device not in _DEVICES:
        raise ValueError(f"device={device!r}: must be one of {', '.join(_DEVICES)} or cuda:N")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device, 1


@contextlib.contextmanager
def _caller_deterministic_flags() -> Iterator[None]:
    """Lightning's deterministic flags are process-global: restore the caller's afterwards."""
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = flags[2]


class BalancedBatches(Sampler[list[int]]):
    """Shuffled batches of ``balanced_batch_sizes(count, batch_size)``: no short last batch (17 at 16: 9 + 8).

    The order is ``torch.randperm(count, generator=generator)``, as a shuffled DataLoader draws it, so a count that
    ``batch_size`` divides gives the very batches of ``DataLoader(batch_size=..., shuffle=True, generator=...)``.
    """

    def __init__(self, count: int, batch_size: int, generator: torch.Generator) -> None:
        self.sizes = balanced_batch_sizes(count, batch_size)
        self.count = count
        self.generator = generator

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.count, generator=self.generator).tolist()
        start = 0
        for size in self.sizes:
            yield order[start:start + size]
            start += size


def train_loader_of(items: list[dict], batch_size: int, seed: int) -> DataLoader:
    """The train images in shuffled, seeded batches of at most ``batch_size``, balanced (see ``BalancedBatches``)."""
    generator = torch.Generator().manual_seed(seed)  # the loader draws its worker seed from it first, as before
    return DataLoader(_Items(items), batch_sampler=BalancedBatches(len(items), batch_size, generator),
                      generator=generator, collate_fn=_collate)


def _fit_and_predict(
    model: nn.Module,
    train_items: list[dict],
    test_items: list[dict],
    cfg: dict,
    *,
    accelerator: str,
    devices: int | list[int],
    seed: int,
    work_dir: Path,
) -> list:
    """Fits ``model`` on the train items with anomalib's ``Engine`` and returns its test batches' predictions."""
    from anomalib.engine import Engine

    train_loader = train_loader_of(train_items, cfg["train_batch_size"], seed)
    test_loader = DataLoader(
        _Items(test_items), batch_size=cfg["eval_batch_size"], shuffle=False, collate_fn=_collate
    )
    engine = Engine(
        accelerator=accelerator,
        devices=devices,
        max_epochs=cfg.get("max_epochs", 1),  # PatchCore and PaDiM force 1 themselves
        limit_val_batches=0,  # no validation: nothing is selected on held-out data
        deterministic="warn",
        barebones=True,  # no checkpoint, logger, progress bar or model summary
        default_root_dir=work_dir,
    )
    engine.fit(model=model, train_dataloaders=train_loader)
    return engine.predict(model=model, dataloaders=test_loader, return_predictions=True)


def _test_scores(
    method: str, batches: list, split: Split, test_items: list[dict], out_size: tuple[int, int]
) -> MethodScores:
    """The predicted batches as ``MethodScores`` in ``split.test`` order (a RuntimeError if they are not)."""
    paths = [path for batch in batches for path in batch.image_path]
    expected = [str(sample.path) for sample in split.test]
    if paths != expected:
        raise RuntimeError(f"{method}: predictions came back out of order or incomplete")
    scores = torch.cat([batch.pred_score.detach().reshape(-1).cpu() for batch in batches])
    maps = torch.cat([_as_nhw(batch.anomaly_map.detach().cpu(), out_size) for batch in batches])
    return MethodScores(
        image_scores=scores.double().numpy(),
        image_labels=np.array([sample.label for sample in split.test], dtype=np.int64),
        anomaly_maps=maps.float().numpy(),
        masks=torch.stack([item["mask"][0] for item in test_items]).numpy(),
    )


def project_features(method: str, model: nn.Module, backbone: Backbone, layers: Sequence[str], size, crop) -> None:
    """With a projector attached to ``backbone`` (``--projector``), PatchCore and PaDiM see projected
    residual features: their extractor is wrapped (``ad_eval.projection.ProjectedExtractor``), the
    references preprocessed exactly like the inputs (resized, cropped, normalised once)."""
    from ad_eval.projection import ProjectedExtractor, projection_of

    projection = projection_of(backbone)
    if projection is None:
        return
    if not _spec(method).accepts_projector:
        raise ConfigError(f"method={method!r} does not accept a projector (patchcore, padim, featurenorm do)")
    projection.check_layers(layers, method)
    images = torch.stack([item["image"] for item in _load_items(projection.references, size, crop)])
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    model.model.feature_extractor = ProjectedExtractor(model.model.feature_extractor, projection, (images - mean) / std)


def _as_nhw(anomaly_map: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) maps as (N, h, w) at ``out_size`` (bilinear if resized)."""
    maps = anomaly_map.float().reshape(anomaly_map.shape[0], 1, *anomaly_map.shape[-2:])
    if tuple(maps.shape[-2:]) != tuple(out_size):
        maps = F.interpolate(maps, size=list(out_size), mode="bilinear", align_corners=False)
    return maps[:, 0]


# Also METHODS, DEFAULTS, DEFAULT_LAYERS, FIXED_LAYERS: derived from the registry by __getattr__.
__all__ = [
    "LAYER_NAMES",
    "AnomalibModel",
    "LoaderConfig",
    "TrainedConfig",
    "build_model",
    "frozen_extractors",
    "make_pre_processor",
    "offline_construction",
    "project_features",
    "register_anomalib",
    "resolve_config",
    "resolve_layers",
    "run_anomalib",
]
