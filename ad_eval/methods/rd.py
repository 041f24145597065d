"""Reverse Distillation (anomalib 2.7): a student decoder reconstructs the frozen encoder's features.

Built, fitted and scored by the anomalib adapter (``anomalib_models.py``); this module holds what is
RD's own: its config, its construction (``anomaly_map_mode`` as anomalib's enum), where its frozen
encoder lives, its only layer set (layer1-3: the bottleneck fuses exactly three scales) and its archs
(the ResNets its decoder table names).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ad_eval.backbones import Backbone
from ad_eval.methods.anomalib_models import AnomalibModel, TrainedConfig, register_anomalib, run_anomalib
from ad_eval.methods.base import MethodScores
from ad_eval.methods.registry import MethodSpec
from fractal_pretrain.config import check_choice

LAYERS = ("layer1", "layer2", "layer3")  # fixed by anomalib (the bottleneck fuses three scales)
ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
)  # fmt: skip


@dataclass(frozen=True)
class RdConfig(TrainedConfig):
    """Reverse Distillation; Adam lr 5e-3, betas (0.5, 0.99) (fixed in anomalib)."""

    max_epochs: int = 200  # full passes over the train images
    anomaly_map_mode: str = "add"  # how the per-scale maps combine: add or multiply

    def __post_init__(self):
        super().__post_init__()
        check_choice("anomaly_map_mode", self.anomaly_map_mode, ("add", "multiply"))


def construct(backbone: Backbone, layers: tuple[str, ...], hyper: dict, common: dict) -> nn.Module:
    from anomalib.models import ReverseDistillation
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode

    hyper = dict(hyper)
    mode = AnomalyMapGenerationMode(hyper.pop("anomaly_map_mode"))
    return ReverseDistillation(
        backbone=backbone.arch, layers=layers, anomaly_map_mode=mode, pre_trained=False, **hyper, **common
    )


def run(backbone: Backbone, split, **cell) -> MethodScores:
    """The registry's ``run`` (arguments: ``ad_eval.methods.registry``)."""
    return run_anomalib("rd", backbone, split, **cell)


SPEC = register_anomalib(
    AnomalibModel(construct=construct, extractors={"encoder": "model.encoder.feature_extractor"}, archs=ARCHS),
    MethodSpec(name="rd", label="RD", config=RdConfig, run=run, default_layers=LAYERS, allowed_layer_sets=(LAYERS,),
               pixel_maps=True),
)
