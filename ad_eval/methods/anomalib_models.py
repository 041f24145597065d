"""One evaluation cell of an anomalib 2.7 model (PatchCore, PaDiM, FastFlow, CFlow, RD, STFPM).

``run_anomalib(method, backbone, split, ...)`` builds the anomalib model around our backbone, fits
it on ``split.train`` with anomalib's ``Engine`` and returns per-image scores and anomaly maps of
``split.test`` as ``MethodScores``; metrics are computed by ``ad_eval.metrics``, not anomalib.

Backbone (shared/reference/anomalib.md, method A): each model is built with the *string*
backbone ``backbone.arch`` and ``pre_trained=False`` while ``timm.create_model`` is patched to
force ``pretrained=False`` (STFPM hard-codes a pretrained teacher), so construction never touches
the network; then our weights are loaded into the frozen timm extractor with
``ad_eval.backbones.inject`` (every extractor key present, shapes equal). STFPM: the teacher gets
our weights, the student keeps its random init, as in the paper. ``frozen_extractors`` lists the
injected modules per method.

Data: the images are decoded, resized (and centre-cropped) once by ``ADImageDataset`` -- the same
code and pixels every other ad_eval method sees -- with identity normalisation, kept in memory,
and fed through plain ``DataLoader``s as anomalib ``ImageBatch``es (train shuffled with a seeded
generator). The model's ``PreProcessor`` is ``Resize(out_size) + Normalize(backbone mean/std)``:
the resize is an exact no-op on images already at ``out_size`` (torchvision returns the input
unchanged) and is there because FastFlow and RD read their input size from it; normalisation
therefore happens exactly once, with the backbone's statistics. No anomalib datamodule is used:
it would rescan the folders with its own pairing rules and copy the test set as validation set.

Protocol: fixed epochs from ``DEFAULTS`` (no validation loop, no early stopping, nothing chosen
on the test set); anomalib's post-processor, evaluator and visualizer are off, so the scores are
the raw model outputs; Lightning runs barebones (no checkpoints, logs or progress bar) under
``deterministic="warn"`` after ``seed_everything(seed)`` (PaDiM's channel subset, the coreset,
the random inits and the shuffling all depend on it).

Layer sets (``layers=None`` = the method's reference set, ``DEFAULT_LAYERS``): PatchCore, PaDiM,
CFlow and STFPM take any non-empty subset of layer1..layer4; FastFlow and RD only layer1-3
(FastFlow's timm model is built with ``out_indices=[1, 2, 3]``; RD's bottleneck fuses exactly
three scales). FastFlow supports the archs resnet18 and wide_resnet50_2 only, RD the ResNets its
decoder table names (``ARCHS_BY_METHOD``).

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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ad_eval.backbones import Backbone, inject
from ad_eval.datasets import ADImageDataset, Sample, Split
from ad_eval.methods.base import LAYER_NAMES, MethodScores
from ad_eval.methods.registry import ANY_LAYER_SET, MethodSpec, get_method, register
from fractal_pretrain.config import ConfigError, check_choice, check_range

# anomalib, lightning and timm are imported where used: importing anomalib takes seconds, and the
# registry imports this module whenever any method is looked up.

METHODS = ("patchcore", "padim", "fastflow", "cflow", "rd", "stfpm")

# Methods that look the backbone up by name (anomalib's tables); the others take any ResNet.
ARCHS_BY_METHOD = {
    "fastflow": ("resnet18", "wide_resnet50_2"),
    "rd": (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
        "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
    ),
}  # fmt: skip
# PaDiM's random channel subset: anomalib's sizes (resnet18: 100, wide_resnet50_2: 550), by block
# type for the other ResNets, capped at the channels of the chosen layers.
PADIM_N_FEATURES = {"basic": 100, "bottleneck": 550}
LOADER_KEYS = ("train_batch_size", "eval_batch_size")
LAYER_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}  # input pixels per feature cell


# ----------------------------------------------------------------------------- configuration
# Per-method hyper-parameters: anomalib 2.7 defaults (= the papers'); epochs = the max_epochs of
# anomalib's examples/configs/model/*.yaml, run in full here since those configs' EarlyStopping
# monitors test pixel AUROC.


@dataclass(frozen=True)
class _Loader:
    """Loader settings every anomalib method has (anomalib's datamodule defaults)."""

    train_batch_size: int = 32  # images per training step
    eval_batch_size: int = 32  # images per prediction step

    def __post_init__(self):
        for key in LOADER_KEYS:
            check_range(key, getattr(self, key), 1, integer=True)


@dataclass(frozen=True)
class _Trained(_Loader):
    """A method trained for a fixed number of epochs (no early stopping: nothing is chosen on test data)."""

    max_epochs: int = 1  # full passes over the train images

    def __post_init__(self):
        super().__post_init__()
        check_range("max_epochs", self.max_epochs, 1, integer=True)


@dataclass(frozen=True)
class PatchcoreConfig(_Loader):
    """PatchCore: one pass builds the memory bank."""

    coreset_sampling_ratio: float = 0.1  # share of the patch features kept by greedy coreset selection
    num_neighbors: int = 9  # memory-bank neighbours that reweight the image score

    def __post_init__(self):
        super().__post_init__()
        check_range("coreset_sampling_ratio", self.coreset_sampling_ratio, 1e-9, 1.0)
        check_range("num_neighbors", self.num_neighbors, 1, integer=True)


@dataclass(frozen=True)
class PadimConfig(_Loader):
    """PaDiM: one pass fits the per-position Gaussians."""

    n_features: int | None = None  # random channel subset; None: PADIM_N_FEATURES, capped at the layers'

    def __post_init__(self):
        super().__post_init__()
        if self.n_features is not None:
            check_range("n_features", self.n_features, 1, integer=True)


@dataclass(frozen=True)
class FastflowConfig(_Trained):
    """FastFlow; Adam lr 1e-3, weight decay 1e-5 (fixed in anomalib)."""

    max_epochs: int = 500  # full passes over the train images
    flow_steps: int = 8  # flow blocks per scale
    conv3x3_only: bool = False  # 3x3 convolutions only in the subnets (the paper's ResNet setting: False)
    hidden_ratio: float = 1.0  # subnet hidden channels / input channels

    def __post_init__(self):
        super().__post_init__()
        check_range("flow_steps", self.flow_steps, 1, integer=True)
        check_choice("conv3x3_only", self.conv3x3_only, (False, True))
        check_range("hidden_ratio", self.hidden_ratio, 1e-6)


@dataclass(frozen=True)
class CflowConfig(_Trained):
    """CFlow; B * H * W of every layer's feature map must be >= fiber_batch_size."""

    max_epochs: int = 50  # full passes over the train images
    fiber_batch_size: int = 64  # feature vectors per flow step
    decoder: str = "freia-cflow"  # normalising-flow decoder type
    condition_vector: int = 128  # positional-encoding channels
    coupling_blocks: int = 8  # coupling layers per decoder
    clamp_alpha: float = 1.9  # soft clamp of the coupling scales
    permute_soft: bool = False  # random orthogonal (True) or hard permutations between couplings
    lr: float = 1e-4  # Adam learning rate

    def __post_init__(self):
        super().__post_init__()
        check_range("fiber_batch_size", self.fiber_batch_size, 1, integer=True)
        check_range("condition_vector", self.condition_vector, 1, integer=True)
        check_range("coupling_blocks", self.coupling_blocks, 1, integer=True)
        check_range("clamp_alpha", self.clamp_alpha, 1e-6)
        check_choice("permute_soft", self.permute_soft, (False, True))
        check_range("lr", self.lr, 1e-12)


@dataclass(frozen=True)
class RdConfig(_Trained):
    """Reverse Distillation; Adam lr 5e-3, betas (0.5, 0.99) (fixed in anomalib)."""

    max_epochs: int = 200  # full passes over the train images
    anomaly_map_mode: str = "add"  # how the per-scale maps combine: add or multiply

    def __post_init__(self):
        super().__post_init__()
        check_choice("anomaly_map_mode", self.anomaly_map_mode, ("add", "multiply"))


@dataclass(frozen=True)
class StfpmConfig(_Trained):
    """STFPM; SGD lr 0.4, momentum 0.9, weight decay 1e-3 (fixed in anomalib)."""

    max_epochs: int = 100  # full passes over the train images


CONFIGS = {"patchcore": PatchcoreConfig, "padim": PadimConfig, "fastflow": FastflowConfig,
           "cflow": CflowConfig, "rd": RdConfig, "stfpm": StfpmConfig}
DEFAULTS: dict[str, dict] = {method: dataclasses.asdict(cls()) for method, cls in CONFIGS.items()}


# Where each model keeps the frozen backbone, relative to the Lightning module.
EXTRACTOR_PATHS = {
    "patchcore": {"feature_extractor": "model.feature_extractor.feature_extractor"},
    "padim": {"feature_extractor": "model.feature_extractor.feature_extractor"},
    "fastflow": {"feature_extractor": "model.feature_extractor"},
    "cflow": {"encoder": "model.encoder.feature_extractor"},
    "rd": {"encoder": "model.encoder.feature_extractor"},
    "stfpm": {"teacher": "model.teacher_model.feature_extractor"},
}

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


def _spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: must be one of {', '.join(METHODS)}")
    return get_method(method)


def _check_arch(method: str, arch: str) -> None:
    allowed = ARCHS_BY_METHOD.get(method)
    if allowed is not None and arch not in allowed:
        raise ValueError(
            f"{method} does not support arch={arch} (anomalib looks the backbone up by name); "
            f"supported: {', '.join(allowed)}"
        )


def _layer_channels(backbone: Backbone, layer: str) -> int:
    """Output channels of ``layer``: the size of its last BatchNorm."""
    pattern = re.compile(rf"^{layer}\.\d+\.bn\d+\.weight$")
    return [v for k, v in backbone.state_dict.items() if pattern.match(k)][-1].shape[0]


def padim_n_features(backbone: Backbone, layers: Sequence[str]) -> int:
    """PaDiM's default channel-subset size for this arch, capped at the layers' channels."""
    block = "bottleneck" if "layer1.0.bn3.weight" in backbone.state_dict else "basic"
    return min(PADIM_N_FEATURES[block], sum(_layer_channels(backbone, name) for name in layers))


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
        method: one of ``METHODS``.
        backbone: the weights; ``backbone.arch`` names the timm model.
        layers: layer set (None: the method's ``default_layers``).
        out_size: (height, width) of the model input.
        config: the method's config dataclass, or overrides of ``DEFAULTS[method]``.

    Returns:
        The anomalib Lightning module, its frozen extractor(s) holding ``backbone``'s weights.
    """
    names = resolve_layers(method, layers)
    from anomalib.models import Cflow, Fastflow, Padim, Patchcore, ReverseDistillation, Stfpm
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode

    cfg = resolve_config(method, config)
    _check_arch(method, backbone.arch)
    hyper = {k: v for k, v in cfg.items() if k not in ("max_epochs", *LOADER_KEYS)}
    common = {
        "pre_processor": make_pre_processor(out_size, backbone.mean, backbone.std),
        "post_processor": False,  # raw scores: no thresholding or min-max normalisation
        "evaluator": False,  # metrics come from ad_eval.metrics
        "visualizer": False,
    }
    arch = backbone.arch
    with offline_construction():
        if method == "patchcore":
            model = Patchcore(backbone=arch, layers=names, pre_trained=False, **hyper, **common)
        elif method == "padim":
            if hyper["n_features"] is None:
                hyper["n_features"] = padim_n_features(backbone, names)
            model = Padim(backbone=arch, layers=list(names), pre_trained=False, **hyper, **common)
        elif method == "fastflow":
            model = Fastflow(backbone=arch, pre_trained=False, **hyper, **common)
        elif method == "cflow":
            model = Cflow(backbone=arch, layers=names, pre_trained=False, **hyper, **common)
        elif method == "rd":
            mode = AnomalyMapGenerationMode(hyper.pop("anomaly_map_mode"))
            model = ReverseDistillation(
                backbone=arch, layers=names, anomaly_map_mode=mode, pre_trained=False, **hyper,
                **common,
            )
        else:  # stfpm
            model = Stfpm(backbone=arch, layers=names, **hyper, **common)
    for where, extractor in frozen_extractors(method, model).items():
        inject(extractor, backbone, where=f"{method} {where}")
    return model


def frozen_extractors(method: str, model: nn.Module) -> dict[str, nn.Module]:
    """The timm modules of ``model`` that hold the evaluated backbone, by name."""
    _spec(method)
    return {name: operator.attrgetter(path)(model) for name, path in EXTRACTOR_PATHS[method].items()}


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
        method: one of ``METHODS``.
        backbone: the evaluated weights and their normalisation.
        split: from ``ad_eval.datasets.scan``.
        layers: backbone stages used (None: the method's ``default_layers``); FastFlow and RD accept
            only layer1-3.
        size, crop: resize target and optional centre crop (as ``ADImageDataset``); the model
            input and the evaluation size are ``crop or size``.
        config: the method's config dataclass, or overrides of ``DEFAULTS[method]``.
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "gpu".
        seed: seeds everything before construction (PaDiM subset, coreset, inits, shuffling).
        work_dir: Lightning's default_root_dir (anomalib creates versioned folders there).

    Returns:
        Scores in the order of ``split.test``: raw ``pred_score`` per image and ``anomaly_map``
        resized (bilinear) to the mask size if needed, float32 (N, H, W), masks bool (N, H, W).
    """
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    names = resolve_layers(method, layers)
    cfg = resolve_config(method, config)
    _check_arch(method, backbone.arch)
    if device not in _DEVICES:
        raise ValueError(f"device={device!r}: must be one of {', '.join(_DEVICES)}")
    accelerator = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device

    train_items = _load_items(split.train, size, crop)
    test_items = _load_items(split.test, size, crop)
    out_size = tuple(test_items[0]["image"].shape[-2:])

    # Lightning's deterministic flags are process-global: restore the caller's afterwards.
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    try:
        seed_everything(seed, workers=True, verbose=False)
        model = build_model(method, backbone, layers=names, out_size=out_size, config=cfg)
        project_features(method, model, backbone, names, size, crop)
        train_loader = DataLoader(
            _Items(train_items),
            batch_size=cfg["train_batch_size"],
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=_collate,
        )
        test_loader = DataLoader(
            _Items(test_items), batch_size=cfg["eval_batch_size"], shuffle=False, collate_fn=_collate
        )
        engine = Engine(
            accelerator=accelerator,
            devices=1,
            max_epochs=cfg.get("max_epochs", 1),  # PatchCore and PaDiM force 1 themselves
            limit_val_batches=0,  # no validation: nothing is selected on held-out data
            deterministic="warn",
            barebones=True,  # no checkpoint, logger, progress bar or model summary
            default_root_dir=Path(work_dir),
        )
        engine.fit(model=model, train_dataloaders=train_loader)
        batches = engine.predict(model=model, dataloaders=test_loader, return_predictions=True)
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = flags[2]

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


def _patchcore_min_images(config: PatchcoreConfig, layers: tuple[str, ...], side: int) -> int:
    """Fewest train images whose coreset holds ``num_neighbors`` patches (anomalib's kNN reweighting).

    PatchCore's patch grid is the first layer's feature map; the coreset keeps
    ``int(images * patches * ratio)`` patches.
    """
    cells = -(-side // LAYER_STRIDES[layers[0]])  # ceil: the feature map's side
    need = 1
    while int(need * cells * cells * config.coreset_sampling_ratio) < config.num_neighbors:
        need += 1
    return need


def _runner(method: str):
    """The registry's ``run`` for one anomalib method."""

    def run(backbone: Backbone, split: Split, *, layers: tuple[str, ...] | None, size: int, crop: int | None,
            config, device: str, seed: int, work_dir: Path) -> MethodScores:
        return run_anomalib(method, backbone, split, layers=layers, size=size, crop=crop, config=config,
                            device=device, seed=seed, work_dir=work_dir)

    run.__qualname__ = f"run_{method}"
    return run


DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {}  # filled below: the reference layer sets (anomalib's = papers')
FIXED = (("layer1", "layer2", "layer3"),)  # FastFlow (out_indices=[1, 2, 3]) and RD (three scales)
for _spec_args in (
    dict(name="patchcore", label="PatchCore", default_layers=("layer2", "layer3"), allowed_layer_sets=ANY_LAYER_SET,
         min_train_images=_patchcore_min_images, accepts_projector=True),
    dict(name="padim", label="PaDiM", default_layers=("layer1", "layer2", "layer3"), allowed_layer_sets=ANY_LAYER_SET,
         min_train_images=lambda config, layers, side: 2,  # a covariance needs two samples
         accepts_projector=True),
    dict(name="fastflow", label="FastFlow", default_layers=FIXED[0], allowed_layer_sets=FIXED),
    dict(name="cflow", label="C-Flow", default_layers=("layer2", "layer3", "layer4"), allowed_layer_sets=ANY_LAYER_SET),
    dict(name="rd", label="RD", default_layers=FIXED[0], allowed_layer_sets=FIXED),
    dict(name="stfpm", label="STFPM", default_layers=("layer1", "layer2", "layer3"), allowed_layer_sets=ANY_LAYER_SET),
):
    _registered = register(MethodSpec(config=CONFIGS[_spec_args["name"]], run=_runner(_spec_args["name"]),
                                      pixel_maps=True, **_spec_args))
    DEFAULT_LAYERS[_registered.name] = _registered.default_layers  # what layers=None means
del _spec_args, _registered

FIXED_LAYERS = {m: FIXED[0] for m in ("fastflow", "rd")}  # layer sets fixed by the anomalib implementation


__all__ = [
    "DEFAULTS",
    "DEFAULT_LAYERS",
    "FIXED_LAYERS",
    "LAYER_NAMES",
    "METHODS",
    "build_model",
    "frozen_extractors",
    "offline_construction",
    "resolve_config",
    "resolve_layers",
    "run_anomalib",
]
