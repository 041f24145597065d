"""C-Flow (anomalib 2.7): conditional normalising flows per layer with positional encoding, fixed epochs.

Built, fitted and scored by the anomalib adapter (``anomalib_models.py``); this module holds what is
CFlow's own: its config, its construction, where its frozen encoder lives and its layer sets (any
non-empty subset of layer1..layer4, reference layer2-4).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ad_eval.backbones import Backbone
from ad_eval.methods.anomalib_models import AnomalibModel, TrainedConfig, register_anomalib, run_anomalib
from ad_eval.methods.base import MethodScores, feature_side
from ad_eval.methods.registry import ANY_LAYER_SET, MethodSpec
from fractal_pretrain.config import check_choice, check_range

# anomalib 2.7's CflowModel stores ``decoder`` but always builds freia's coupling flow (cflow_head): another
# name would be recorded (and change the cell id) while running the same model.
DECODERS = ("freia-cflow",)


@dataclass(frozen=True)
class CflowConfig(TrainedConfig):
    """CFlow; B * H * W of every layer's feature map must be >= fiber_batch_size."""

    max_epochs: int = 50  # full passes over the train images
    fiber_batch_size: int = 64  # feature vectors per flow step
    decoder: str = "freia-cflow"  # normalising-flow decoder type (anomalib 2.7 builds only this one: DECODERS)
    condition_vector: int = 128  # positional-encoding channels
    coupling_blocks: int = 8  # coupling layers per decoder
    clamp_alpha: float = 1.9  # soft clamp of the coupling scales
    permute_soft: bool = False  # random orthogonal (True) or hard permutations between couplings
    lr: float = 1e-4  # Adam learning rate

    def __post_init__(self):
        super().__post_init__()
        check_range("fiber_batch_size", self.fiber_batch_size, 1, integer=True)
        check_choice("decoder", self.decoder, DECODERS)
        check_range("condition_vector", self.condition_vector, 1, integer=True)
        check_range("coupling_blocks", self.coupling_blocks, 1, integer=True)
        check_range("clamp_alpha", self.clamp_alpha, 1e-6)
        check_choice("permute_soft", self.permute_soft, (False, True))
        check_range("lr", self.lr, 1e-12)


def construct(backbone: Backbone, layers: tuple[str, ...], hyper: dict, common: dict) -> nn.Module:
    from anomalib.models import Cflow

    return Cflow(backbone=backbone.arch, layers=layers, pre_trained=False, **hyper, **common)


def min_train_images(config: CflowConfig, layers: tuple[str, ...], side: int) -> int:
    """Fewest images of one training batch whose feature vectors fill one flow step on every layer.

    anomalib's CFlow trains each layer on the batch's B * H * W feature vectors in steps of
    ``fiber_batch_size`` and raises (mid-fit, a bare ValueError) when there is not one full step: every batch
    needs this many (the spec's ``min_batch_images``; the train batches are balanced, so none is short).
    """
    return max(-(-config.fiber_batch_size // feature_side(side, layer) ** 2) for layer in layers)


def run(backbone: Backbone, split, **cell) -> MethodScores:
    """The registry's ``run`` (arguments: ``ad_eval.methods.registry``)."""
    return run_anomalib("cflow", backbone, split, **cell)


SPEC = register_anomalib(
    AnomalibModel(construct=construct, extractors={"encoder": "model.encoder.feature_extractor"}),
    MethodSpec(name="cflow", label="C-Flow", config=CflowConfig, run=run, default_layers=("layer2", "layer3", "layer4"),
               allowed_layer_sets=ANY_LAYER_SET, pixel_maps=True, min_train_images=min_train_images,
               min_batch_images=min_train_images),
)
