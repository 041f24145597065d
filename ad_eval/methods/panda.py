"""PANDA (Reiss et al., CVPR 2021): kNN on pooled ResNet features, optional compactness fine-tuning.

Reference: ``talreiss/PANDA`` at 6b5aac9 (``panda.py``, ``utils.py``, ``losses.py``); see
``shared/reference/ad_methods.md`` section 1. What the reference does, and what this module does:

- Features: ``ResNet._forward_impl`` returns the global-average-pooled ``layer4`` output (the
  penultimate, pre-fc features). Here ``layers`` picks the stages whose pooled outputs are
  concatenated; the default ``("layer4",)`` is the reference's feature and equals ``model(x)`` of a
  torchvision ResNet whose ``fc`` is ``nn.Identity``.
- Score: ``utils.knn_score`` builds a faiss ``IndexFlatL2`` on the train features and returns the
  **sum of the squared L2 distances** to the ``n_neighbours=2`` nearest ones. Same here, computed
  exactly in float64 (``torch.cdist`` without the matmul shortcut) instead of faiss's float32.
- ``finetune_epochs: 0`` (the default) is the reference's "Epoch 0" score: the frozen backbone
  (DN2). With ``finetune_epochs > 0`` the backbone (a copy) is fine-tuned as the reference's
  default, non-EWC variant: conv1/bn1/layer1/layer2 frozen (``utils.freeze_parameters``),
  SGD(lr 1e-2, momentum 0.9, weight decay 5e-5) on the compactness loss
  ``mean_b ||f(x_b) - c||^2 / D``, centre ``c`` fixed to the mean of the initial train features
  (``losses.CompactnessLoss``), ``clip_grad_norm_(1e-3)`` before each step, shuffled train
  batches, and the model left in eval mode (``train_model`` calls ``model.eval()`` and never
  ``train()``: BatchNorm statistics stay frozen). Train features are then recomputed with the
  fine-tuned model. The reference's CLI default is 15 epochs; its EWC variant (``--ewc``) needs
  an ImageNet-ResNet-152 Fisher diagonal and is not implemented.
- Deviations: the reference has no MVTec/VisA loader and resizes to 256 then centre-crops 224; here
  images come from ``ADImageDataset`` with the caller's ``size``/``crop`` (pass ``crop=224`` for
  the reference's transform) and the backbone's own normalisation.

The backbone helpers (``resolve_backbone``, ``extract_features``) live in ``features.py``.

Example::

    scores = run_panda((model, mean, std), scan("mvtec", root, "bottle"), size=256)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ad_eval.datasets import ADImageDataset, Split
from ad_eval.methods.base import MethodScores, check_layers
from ad_eval.methods.features import (
    deterministic_torch,
    extract_features,
    make_loader,
    pooled_features,
    resolve_backbone,
)
from ad_eval.methods.registry import ANY_LAYER_SET, MethodSpec, register
from fractal_pretrain.config import ConfigError, check_range

log = logging.getLogger(__name__)

DEFAULT_LAYERS = ("layer4",)  # the reference's feature: avgpool of the last stage


@dataclass(frozen=True)
class PandaConfig:
    """PANDA's hyper-parameters; the defaults are the reference's."""

    k: int = 2  # neighbours; utils.knn_score(n_neighbours=2)
    finetune_epochs: int = 0  # 0 = frozen backbone ("Epoch 0" / DN2); the reference CLI runs 15
    lr: float = 1e-2  # --lr
    momentum: float = 0.9  # optim.SGD in train_model
    weight_decay: float = 5e-5  # optim.SGD in train_model
    grad_clip_norm: float = 1e-3  # clip_grad_norm_ in run_epoch
    trainable: tuple[str, ...] = ("layer3", "layer4")  # freeze_parameters freezes conv1, bn1, layer1, layer2, fc

    def __post_init__(self):
        check_range("k", self.k, 1, integer=True)
        check_range("finetune_epochs", self.finetune_epochs, 0, integer=True)
        check_range("lr", self.lr, 1e-12)
        check_range("momentum", self.momentum, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("grad_clip_norm", self.grad_clip_norm, 1e-12)
        try:
            check_layers(self.trainable)
        except (TypeError, ValueError):  # an int, a bool, an unknown layer: name the key, not check_layers' "layers"
            raise ConfigError(f"trainable={self.trainable!r}: must be a list of layers from layer1..layer4 "
                              "(or 1-4)") from None


DEFAULTS: dict[str, Any] = dataclasses.asdict(PandaConfig())


# ----------------------------------------------------------------------------- PANDA


def knn_scores(
    train_features: np.ndarray | torch.Tensor, test_features: np.ndarray | torch.Tensor, k: int = 2
) -> np.ndarray:
    """Sum of the squared L2 distances of each test feature to its ``k`` nearest train features.

    As ``utils.knn_score`` of the reference (faiss ``IndexFlatL2`` returns squared distances,
    then ``np.sum(D, axis=1)``), but exact: float64 differences, not faiss's float32 expansion.

    Args:
        train_features: (M, D).
        test_features: (N, D).
        k: number of neighbours, 1 <= k <= M.

    Returns:
        (N,) float64 scores, higher = more anomalous.
    """
    train = torch.as_tensor(train_features).to(torch.float64)
    test = torch.as_tensor(test_features).to(torch.float64)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be (M, D) and (N, D): got {train.shape}, {test.shape}")
    if not 1 <= k <= len(train):
        raise ValueError(f"k={k}: must be between 1 and the number of train features {len(train)}")
    scores = []
    for chunk in test.split(256):  # bounds the (chunk, M) distance matrix
        dist = torch.cdist(chunk, train, compute_mode="donot_use_mm_for_euclid_dist")  # (n, M)
        scores.append(dist.square().topk(k, dim=1, largest=False).values.sum(dim=1))
    return torch.cat(scores).numpy()


def compactness_loss(features: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``losses.CompactnessLoss``: batch mean of ||f - c||^2 / D, features (B, D), centre (D,)."""
    return ((features - center).norm(dim=1).pow(2) / features.shape[1]).mean()


def finetune_compactness(
    model: nn.Module,
    train_set: Dataset,
    layers: Sequence[str],
    *,
    config: Mapping[str, Any],
    batch_size: int,
    device: str | torch.device,
    seed: int,
) -> list[float]:
    """Fine-tune ``model`` in place on the compactness loss, as the reference's ``train_model``.

    Args:
        model: the ResNet to change (pass a copy), already on ``device``.
        train_set: items are dicts with an ``"image"`` (3, H, W) normalised tensor.
        layers: the pooled stages that form the feature (and the loss).
        config: merged PANDA config (``finetune_epochs``, ``lr``, ``momentum``, ``weight_decay``,
            ``grad_clip_norm``, ``trainable``).
        batch_size: images per step (reference 32, last batch kept).
        device: where the model lives.
        seed: seeds the batch order.

    Returns:
        The mean loss of each epoch.
    """
    trainable = check_layers(config["trainable"])
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".")[0] in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()  # the reference never calls train(): BatchNorm keeps its running statistics
    center = extract_features(model, make_loader(train_set, batch_size), layers, device)
    center = center.mean(dim=0).to(device)  # fixed: the mean of the initial train features
    optimizer = torch.optim.SGD(
        params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    generator = torch.Generator().manual_seed(seed)
    epoch_losses = []
    with deterministic_torch():
        for epoch in range(config["finetune_epochs"]):
            losses = []
            for batch in make_loader(train_set, batch_size, generator=generator):
                optimizer.zero_grad()
                loss = compactness_loss(
                    pooled_features(model, batch["image"].to(device), layers), center
                )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config["grad_clip_norm"])
                optimizer.step()
                losses.append(loss.item())
            epoch_losses.append(float(np.mean(losses)))
            log.info("PANDA epoch %d: compactness loss %.6g", epoch + 1, epoch_losses[-1])
    for param in model.parameters():
        param.requires_grad_(False)
    return epoch_losses


def run_panda(
    backbone: Any,
    split: Split,
    *,
    layers: Sequence[str | int] | str | None = None,
    size: int | Sequence[int] = 256,
    crop: int | Sequence[int] | None = None,
    config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch_size: int = 32,
) -> MethodScores:
    """Score ``split.test`` with PANDA's kNN on pooled features (image level only).

    Args:
        backbone: ``(model, mean, std)`` or an object with ``.build()``, ``.mean``, ``.std``
            (see ``resolve_backbone``). The model is never modified: a copy is used.
        split: from ``ad_eval.datasets.scan``; train images are all normal.
        layers: stages whose pooled features are concatenated (``check_layers`` syntax);
            default ``("layer4",)`` as the reference.
        size, crop: image resize and optional centre crop (``ADImageDataset``).
        config: a ``PandaConfig``, or overrides of ``DEFAULTS`` (an unknown key raises ConfigError).
        device: torch device for the backbone.
        seed: seeds the fine-tuning batch order (unused when ``finetune_epochs`` is 0).
        batch_size: images per forward pass and fine-tuning step (reference 32).

    Returns:
        ``MethodScores`` in ``split.test`` order; ``anomaly_maps`` and ``masks`` are None.
    """
    cfg = dataclasses.asdict(as_config(config))
    layer_names = check_layers(DEFAULT_LAYERS if layers is None else layers)
    model, mean, std = resolve_backbone(backbone)
    model = copy.deepcopy(model).to(device).eval()
    train_set = ADImageDataset(split.train, size=size, crop=crop, mean=mean, std=std)
    test_set = ADImageDataset(split.test, size=size, crop=crop, mean=mean, std=std)
    if cfg["finetune_epochs"] > 0:
        finetune_compactness(
            model,
            train_set,
            layer_names,
            config=cfg,
            batch_size=batch_size,
            device=device,
            seed=seed,
        )
    train = extract_features(model, make_loader(train_set, batch_size), layer_names, device)
    test = extract_features(model, make_loader(test_set, batch_size), layer_names, device)
    return MethodScores(
        image_scores=knn_scores(train, test, k=cfg["k"]),
        image_labels=np.array([s.label for s in split.test], dtype=np.int64),
    )


def as_config(config: PandaConfig | Mapping[str, Any] | None) -> PandaConfig:
    """A ``PandaConfig`` as is, or one built from overrides of the defaults."""
    return config if isinstance(config, PandaConfig) else SPEC.make_config(config)


def run(backbone: Any, split: Split, *, layers: tuple[str, ...] | None, size: int, crop: int | None,
        config: PandaConfig, device: str, seed: int, work_dir: Path) -> MethodScores:
    """The registry's entry point (``registry.MethodSpec.run``)."""
    return run_panda(backbone, split, layers=layers, size=size, crop=crop, config=config, device=device, seed=seed)


SPEC = register(MethodSpec(
    name="panda", label="PANDA", config=PandaConfig, run=run, default_layers=DEFAULT_LAYERS,
    allowed_layer_sets=ANY_LAYER_SET, pixel_maps=False,
    min_train_images=lambda config, layers, side: config.k,  # k nearest train features
))
