"""STFPM (anomalib 2.7): a student network trained to match the frozen teacher's feature pyramid.

Built, fitted and scored by the anomalib adapter (``anomalib_models.py``); this module holds what is
STFPM's own: its config, its construction, where its teacher lives and its layer sets (any non-empty
subset of layer1..layer4, reference layer1-3). The teacher gets our weights; the student keeps its
seeded random init, as in the paper (anomalib hard-codes a pretrained teacher: ``offline_construction``
keeps it from downloading).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ad_eval.backbones import Backbone
from ad_eval.methods.anomalib_models import AnomalibModel, TrainedConfig, register_anomalib, run_anomalib
from ad_eval.methods.base import MethodScores
from ad_eval.methods.registry import ANY_LAYER_SET, MethodSpec


@dataclass(frozen=True)
class StfpmConfig(TrainedConfig):
    """STFPM; SGD lr 0.4, momentum 0.9, weight decay 1e-3 (fixed in anomalib)."""

    max_epochs: int = 100  # full passes over the train images


def construct(backbone: Backbone, layers: tuple[str, ...], hyper: dict, common: dict) -> nn.Module:
    from anomalib.models import Stfpm

    return Stfpm(backbone=backbone.arch, layers=layers, **hyper, **common)


def run(backbone: Backbone, split, **cell) -> MethodScores:
    """The registry's ``run`` (arguments: ``ad_eval.methods.registry``)."""
    return run_anomalib("stfpm", backbone, split, **cell)


SPEC = register_anomalib(
    AnomalibModel(construct=construct, extractors={"teacher": "model.teacher_model.feature_extractor"}),
    MethodSpec(name="stfpm", label="STFPM", config=StfpmConfig, run=run, default_layers=("layer1", "layer2", "layer3"),
               allowed_layer_sets=ANY_LAYER_SET, pixel_maps=True),
)
