"""FastFlow (anomalib 2.7): 2D normalising flows on frozen features, trained for fixed epochs.

Built, fitted and scored by the anomalib adapter (``anomalib_models.py``); this module holds what is
FastFlow's own: its config, its construction, where its frozen extractor lives, its only layer set
(layer1-3: anomalib builds the timm model with ``out_indices=[1, 2, 3]``) and its archs (anomalib's
table names resnet18 and wide_resnet50_2 among the ResNets).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ad_eval.backbones import Backbone
from ad_eval.methods.anomalib_models import AnomalibModel, TrainedConfig, register_anomalib, run_anomalib
from ad_eval.methods.base import MethodScores
from ad_eval.methods.registry import MethodSpec
from fractal_pretrain.config import check_choice, check_range

LAYERS = ("layer1", "layer2", "layer3")  # fixed by anomalib (out_indices=[1, 2, 3])


@dataclass(frozen=True)
class FastflowConfig(TrainedConfig):
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


def construct(backbone: Backbone, layers: tuple[str, ...], hyper: dict, common: dict) -> nn.Module:
    """``layers`` is always LAYERS: anomalib's FastFlow takes none."""
    from anomalib.models import Fastflow

    return Fastflow(backbone=backbone.arch, pre_trained=False, **hyper, **common)


def run(backbone: Backbone, split, **cell) -> MethodScores:
    """The registry's ``run`` (arguments: ``ad_eval.methods.registry``)."""
    return run_anomalib("fastflow", backbone, split, **cell)


SPEC = register_anomalib(
    AnomalibModel(construct=construct, extractors={"feature_extractor": "model.feature_extractor"},
                  archs=("resnet18", "wide_resnet50_2")),
    MethodSpec(name="fastflow", label="FastFlow", config=FastflowConfig, run=run, default_layers=LAYERS,
               allowed_layer_sets=(LAYERS,), pixel_maps=True),
)
