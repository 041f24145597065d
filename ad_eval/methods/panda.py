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

The backbone helpers here (``resolve_backbone``, ``merge_config``, ``extract_features``) are shared
with ``cutpaste.py``.

Example::

    scores = run_panda((model, mean, std), scan("mvtec", root, "bottle"), size=256)
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ad_eval.datasets import ADImageDataset, Split
from ad_eval.methods.base import DEFAULT_LAYERS as ALL_DEFAULT_LAYERS
from ad_eval.methods.base import LAYER_NAMES, MethodScores, check_layers

log = logging.getLogger(__name__)

DEFAULT_LAYERS = ALL_DEFAULT_LAYERS["panda"]  # the reference's feature: avgpool of the last stage
DEFAULTS: dict[str, Any] = {
    "k": 2,  # neighbours; utils.knn_score(n_neighbours=2)
    "finetune_epochs": 0,  # 0 = frozen backbone ("Epoch 0" / DN2); the reference CLI runs 15
    "lr": 1e-2,  # --lr
    "momentum": 0.9,  # optim.SGD in train_model
    "weight_decay": 5e-5,  # optim.SGD in train_model
    "grad_clip_norm": 1e-3,  # clip_grad_norm_ in run_epoch
    "trainable": ("layer3", "layer4"),  # freeze_parameters freezes conv1, bn1, layer1, layer2, fc
}
RESNET_STEM = ("conv1", "bn1", "relu", "maxpool")


# ----------------------------------------------------------------------------- shared helpers


def resolve_backbone(backbone: Any) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """The (model, mean, std) of a backbone given as a tuple or as an object with ``.build()``.

    Args:
        backbone: ``(model, mean, std)``, or any object with ``.build()`` returning the model and
            ``.mean``/``.std`` attributes (``ad_eval.backbones.Backbone``). The model is a
            torchvision ResNet with ``fc = nn.Identity()``. A bare ``nn.Module`` is refused: it
            carries no normalisation, and a silent ImageNet default would be wrong for fractal
            backbones.

    Returns:
        The model (not copied: callers copy before changing it) and mean/std as float tuples.
    """
    if isinstance(backbone, nn.Module):
        raise TypeError(
            "backbone: pass (model, mean, std) or an object with .build(), .mean and .std; "
            "a bare nn.Module carries no normalisation"
        )
    if isinstance(backbone, (tuple, list)) and len(backbone) == 3:
        model, mean, std = backbone
    elif callable(getattr(backbone, "build", None)):
        model, mean, std = backbone.build(), backbone.mean, backbone.std
    else:
        raise TypeError(
            f"backbone: {type(backbone).__name__} is neither (model, mean, std) nor an object "
            "with .build(), .mean and .std"
        )
    missing = [n for n in (*RESNET_STEM, *LAYER_NAMES) if not hasattr(model, n)]
    if not isinstance(model, nn.Module) or missing:
        raise TypeError(
            f"backbone model {type(model).__name__} is not a torchvision-style ResNet "
            f"(missing {', '.join(missing) or 'nn.Module'})"
        )
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"backbone mean={mean!r}, std={std!r}: need 3 values each, std > 0")
    return model, mean, std


def merge_config(
    config: Mapping[str, Any] | None, defaults: Mapping[str, Any], method: str
) -> dict[str, Any]:
    """``defaults`` updated with ``config``; an unknown key raises ValueError naming the allowed."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(
            f"{method} config: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **config}


def pooled_features(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> torch.Tensor:
    """Global-average-pooled outputs of ResNet stages ``layers``, concatenated in stage order.

    Args:
        model: a torchvision ResNet (only the stem and ``layer1..4`` are used).
        images: (B, 3, H, W) normalised.
        layers: names from ``check_layers`` (sorted ``layer1..layer4``).

    Returns:
        (B, sum of the layers' channels); for ``("layer4",)`` this is ``model(images)``.
    """
    wanted = set(layers)
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    features = []
    for name in LAYER_NAMES:
        x = getattr(model, name)(x)  # (B, C, h, w)
        if name in wanted:
            features.append(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # (B, C)
            wanted.discard(name)
            if not wanted:  # later stages are not needed
                break
    return torch.cat(features, dim=1)


def make_loader(
    dataset: Dataset, batch_size: int, *, generator: torch.Generator | None = None
) -> DataLoader:
    """In-process loader; shuffled (drop_last=False) when a seeded ``generator`` is given."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator
    )


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, layers: Sequence[str], device: str | torch.device
) -> torch.Tensor:
    """(N, D) float32 CPU pooled features of every image of ``loader`` (items have ``"image"``)."""
    chunks = [
        pooled_features(model, batch["image"].to(device), layers).float().cpu() for batch in loader
    ]
    return torch.cat(chunks)


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Deterministic torch kernels (a warning where none exists), previous settings restored."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


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


def _check_config(cfg: Mapping[str, Any]) -> None:
    if not isinstance(cfg["k"], int) or cfg["k"] < 1:
        raise ValueError(f"panda config: k={cfg['k']!r} must be an int >= 1")
    if not isinstance(cfg["finetune_epochs"], int) or cfg["finetune_epochs"] < 0:
        raise ValueError(f"panda config: finetune_epochs={cfg['finetune_epochs']!r} must be >= 0")
    for key in ("lr", "grad_clip_norm"):
        if not cfg[key] > 0:
            raise ValueError(f"panda config: {key}={cfg[key]!r} must be > 0")
    check_layers(cfg["trainable"])


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
        config: overrides of ``DEFAULTS``; an unknown key raises ValueError.
        device: torch device for the backbone.
        seed: seeds the fine-tuning batch order (unused when ``finetune_epochs`` is 0).
        batch_size: images per forward pass and fine-tuning step (reference 32).

    Returns:
        ``MethodScores`` in ``split.test`` order; ``anomaly_maps`` and ``masks`` are None.
    """
    cfg = merge_config(config, DEFAULTS, "panda")
    _check_config(cfg)
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
