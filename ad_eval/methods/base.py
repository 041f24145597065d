"""What every AD method returns for one cell, whatever its internals (anomalib or implemented here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")
LAYER_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}  # input pixels per feature cell


def feature_side(side: int, layer: str) -> int:
    """The side of a ResNet layer's feature map for a ``side`` x ``side`` input (each stride-2 step rounds up)."""
    return -(-side // LAYER_STRIDES[layer])


@dataclass
class MethodScores:
    """Per-test-image outputs of a fitted method, in the order of ``split.test``.

    image_scores: (N,) float, higher = more anomalous.
    image_labels: (N,) int 0/1.
    anomaly_maps: (N, H, W) float32 at the evaluation size, or None for image-level methods (spec.pixel_maps False).
    masks: (N, H, W) bool ground truth at the same size, or None when anomaly_maps is None.
    """

    image_scores: np.ndarray
    image_labels: np.ndarray
    anomaly_maps: np.ndarray | None = None
    masks: np.ndarray | None = None


def balanced_batch_sizes(count: int, batch_size: int) -> list[int]:
    """Sizes of the fewest batches of at most ``batch_size`` holding ``count`` items, differing by at most one.

    17 at 16: [9, 8], not [16, 1] -- no short last batch (CFlow needs enough feature vectors in every batch).
    """
    batches = -(-count // batch_size)
    return [count // batches + (i < count % batches) for i in range(batches)]


def layer_set_label(layers) -> str:
    """("layer1", "layer2") -> "1+2", the paper's j in {1, 2} (cell ids, reports, ``ad-eval methods``)."""
    return "+".join(name[5:] if name.startswith("layer") and name[5:].isdigit() else name for name in layers)


def check_layers(layers) -> tuple[str, ...]:
    """Normalise a layer set: (2, 3), "2,3", ["layer2", "layer3"] -> ("layer2", "layer3"), sorted, no repeats."""
    if isinstance(layers, str):
        layers = [part.strip() for part in layers.split(",") if part.strip()]
    names = []
    for layer in layers:
        name = f"layer{layer}" if str(layer).isdigit() else str(layer)
        if name not in LAYER_NAMES:
            raise ValueError(f"layers={list(layers)!r}: {layer!r} is not one of 1, 2, 3, 4 (or layer1..layer4)")
        names.append(name)
    if not names:
        raise ValueError("layers: at least one of layer1..layer4 is needed")
    return tuple(sorted(set(names)))
