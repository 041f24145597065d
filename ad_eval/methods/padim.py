"""PaDiM (anomalib 2.7): a Gaussian per feature position over a random channel subset, Mahalanobis score.

Built, fitted and scored by the anomalib adapter (``anomalib_models.py``); this module holds what is
PaDiM's own: its config, its construction (the channel-subset size ``n_features``), where its frozen
extractor lives, its layer sets (any non-empty subset of layer1..layer4, reference layer1-3) and its
minimum of two train images. It accepts a projector (``--projector``, ``ad_eval.projection``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ad_eval.backbones import Backbone
from ad_eval.methods.anomalib_models import AnomalibModel, LoaderConfig, register_anomalib, run_anomalib
from ad_eval.methods.base import MethodScores
from ad_eval.methods.registry import ANY_LAYER_SET, MethodSpec
from fractal_pretrain.config import check_range

# PaDiM's random channel subset: anomalib's sizes (resnet18: 100, wide_resnet50_2: 550), by block
# type for the other ResNets, capped at the channels of the chosen layers.
PADIM_N_FEATURES = {"basic": 100, "bottleneck": 550}


@dataclass(frozen=True)
class PadimConfig(LoaderConfig):
    """PaDiM: one pass fits the per-position Gaussians."""

    n_features: int | None = None  # random channel subset; None: PADIM_N_FEATURES, capped at the layers'

    def __post_init__(self):
        super().__post_init__()
        if self.n_features is not None:
            check_range("n_features", self.n_features, 1, integer=True)


def _layer_channels(backbone: Backbone, layer: str) -> int:
    """Output channels of ``layer``: the size of its last BatchNorm."""
    pattern = re.compile(rf"^{layer}\.\d+\.bn\d+\.weight$")
    return [v for k, v in backbone.state_dict.items() if pattern.match(k)][-1].shape[0]


def padim_n_features(backbone: Backbone, layers: Sequence[str]) -> int:
    """PaDiM's default channel-subset size for this arch, capped at the layers' channels."""
    block = "bottleneck" if "layer1.0.bn3.weight" in backbone.state_dict else "basic"
    return min(PADIM_N_FEATURES[block], sum(_layer_channels(backbone, name) for name in layers))


def construct(backbone: Backbone, layers: tuple[str, ...], hyper: dict, common: dict) -> nn.Module:
    """Seed before (the channel subset is drawn here)."""
    from anomalib.models import Padim

    if hyper["n_features"] is None:
        hyper = {**hyper, "n_features": padim_n_features(backbone, layers)}
    return Padim(backbone=backbone.arch, layers=list(layers), pre_trained=False, **hyper, **common)


def run(backbone: Backbone, split, **cell) -> MethodScores:
    """The registry's ``run`` (arguments: ``ad_eval.methods.registry``)."""
    return run_anomalib("padim", backbone, split, **cell)


SPEC = register_anomalib(
    AnomalibModel(construct=construct, extractors={"feature_extractor": "model.feature_extractor.feature_extractor"}),
    MethodSpec(name="padim", label="PaDiM", config=PadimConfig, run=run, default_layers=("layer1", "layer2", "layer3"),
               allowed_layer_sets=ANY_LAYER_SET, pixel_maps=True,
               min_train_images=lambda config, layers, side: 2,  # a covariance needs two samples
               accepts_projector=True),
)
