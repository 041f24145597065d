"""PatchCore (anomalib 2.7): a memory bank of locally aware patch features, greedy coreset, kNN score.

Built, fitted and scored by the anomalib adapter (``anomalib_models.py``); this module holds what is
PatchCore's own: its config, its construction, where its frozen extractor lives, its layer sets (any
non-empty subset of layer1..layer4, reference layer2+3) and the fewest train images its coreset needs.
It accepts a projector (``--projector``: the extractor is wrapped by ``ad_eval.projection``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ad_eval.backbones import Backbone
from ad_eval.methods.anomalib_models import AnomalibModel, LoaderConfig, register_anomalib, run_anomalib
from ad_eval.methods.base import MethodScores, feature_side
from ad_eval.methods.registry import ANY_LAYER_SET, MethodSpec
from fractal_pretrain.config import check_range


@dataclass(frozen=True)
class PatchcoreConfig(LoaderConfig):
    """PatchCore: one pass builds the memory bank."""

    coreset_sampling_ratio: float = 0.1  # share of the patch features kept by greedy coreset selection
    num_neighbors: int = 9  # memory-bank neighbours that reweight the image score

    def __post_init__(self):
        super().__post_init__()
        check_range("coreset_sampling_ratio", self.coreset_sampling_ratio, 1e-9, 1.0)
        check_range("num_neighbors", self.num_neighbors, 1, integer=True)


def construct(backbone: Backbone, layers: tuple[str, ...], hyper: dict, common: dict) -> nn.Module:
    from anomalib.models import Patchcore

    return Patchcore(backbone=backbone.arch, layers=layers, pre_trained=False, **hyper, **common)


def min_train_images(config: PatchcoreConfig, layers: tuple[str, ...], side: int) -> int:
    """Fewest train images whose coreset holds ``num_neighbors`` patches (anomalib's kNN reweighting).

    PatchCore's patch grid is the first layer's feature map; the coreset keeps
    ``int(images * patches * ratio)`` patches.
    """
    cells = feature_side(side, layers[0])
    need = 1
    while int(need * cells * cells * config.coreset_sampling_ratio) < config.num_neighbors:
        need += 1
    return need


def run(backbone: Backbone, split, **cell) -> MethodScores:
    """The registry's ``run`` (arguments: ``ad_eval.methods.registry``)."""
    return run_anomalib("patchcore", backbone, split, **cell)


SPEC = register_anomalib(
    AnomalibModel(construct=construct, extractors={"feature_extractor": "model.feature_extractor.feature_extractor"}),
    MethodSpec(name="patchcore", label="PatchCore", config=PatchcoreConfig, run=run,
               default_layers=("layer2", "layer3"), allowed_layer_sets=ANY_LAYER_SET, pixel_maps=True,
               min_train_images=min_train_images, accepts_projector=True),
)
