"""CutPaste (Li et al., CVPR 2021): 3-way self-supervised fine-tuning, then a Gaussian density.

There is no official code. Reference: ``Runinho/pytorch-cutpaste`` (``cutpaste.py``, ``model.py``,
``run_training.py``, ``eval.py``, ``density.py``); see ``shared/reference/ad_methods.md`` section 2.
What the reference does, and what this module does:

- Augmentations (``CutPasteNormal``, ``CutPasteScar``, ``CutPaste3Way``), on the image resized to
  256 px and colour-jittered as a whole (``ColorJitter(0.1, 0.1, 0.1, 0.1)``):
  CutPaste cuts a rectangle of area U(0.02, 0.15) x H x W and log-uniform aspect ratio in
  [0.3, 1/0.3] at a random place of the same image, colour-jitters it (0.1 each) and pastes it at
  another random place. Scar cuts a U(2, 16) x U(10, 25) px patch (width x height), jitters it,
  rotates it by U(-45, 45) degrees with ``expand=True`` (nearest neighbour, PIL's default) and
  pastes it through its alpha mask. 3-way returns (original, CutPaste, Scar), labels 0, 1, 2,
  each a third of every batch.
- Model (``ProjectionNet``): the backbone with ``fc = Identity`` (avgpool embedding), then
  ``head_layer`` blocks Linear(512) -> BatchNorm1d -> ReLU, one Linear(128) -> BN -> ReLU, and a
  Linear(128 -> 3) classifier; ``run_training.py``'s default is ``head_layer=1``.
- Training (``run_training.py`` defaults): cross-entropy, SGD(lr 0.03, momentum 0.9, weight decay
  3e-5), ``CosineAnnealingWarmRestarts(T_0=steps)`` stepped with the step index after each update
  (one cosine over the run), 256 update steps, backbone frozen for the first 20 steps (the model
  stays in train mode, so its BatchNorm statistics still move), 32 images per step (96 network
  inputs; the README's reading of the paper and the published runs; the CLI default is 64).
- Detection (``eval.py``, ``density.GaussianDensityTorch``): avgpool embeddings of the train and
  test images (eval mode, 256 px, no crop), **L2-normalised**; mean and sklearn ``LedoitWolf``
  precision of the train embeddings; score = Mahalanobis distance sqrt((x-mu)^T P (x-mu)).

Deviations, none of which changes the method at the reference's 256 px:

- Augmentations work on float tensors with torchvision's tensor functionals instead of PIL, so
  jittered pixels are not quantised to uint8, and every random draw comes from one seeded
  ``torch.Generator`` (same seed, same scores).
- Scar sizes are pixels of a 256-px image, as in the reference, and scale with ``size``/256 for
  other sizes (a 16-px scar would not be thin at 64 px).
- The reference draws the scar's paste corner with width and height swapped
  (``h - patch.size[0]``) and lets PIL clip the overflow; here the rotated patch always lies
  inside the image.
- Batches are drawn from back-to-back random permutations of the train set (the reference's
  shuffled ``Repeat(train, 3000)``); the head's input width is the backbone's embedding size
  (512 for ResNet-18, as the reference, 2048 for ResNet-50).
- Images come from ``ADImageDataset`` (bilinear, antialiased; optional ``crop``) with the
  backbone's own normalisation; the precision and distances are float64 (the reference casts the
  precision to float32).

Example::

    scores = run_cutpaste((model, mean, std), scan("mvtec", root, "bottle"), size=256)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ad_eval.datasets import ADImageDataset, Split
from ad_eval.methods.base import MethodScores
from ad_eval.methods.features import deterministic_torch, extract_features, make_loader, resolve_backbone
from ad_eval.methods.registry import MethodSpec, register
from fractal_pretrain.config import check_choice, check_pair, check_range

log = logging.getLogger(__name__)

NUM_CLASSES = 3  # 0 normal, 1 CutPaste, 2 CutPaste-scar
REFERENCE_SIZE = 256  # scar sizes are pixels at this image size


@dataclass(frozen=True)
class CutPasteConfig:
    """CutPaste's hyper-parameters; the defaults are ``run_training.py``'s."""

    steps: int = 256  # update steps (run_training --epochs; the paper's "epoch")
    batch_size: int = 32  # images per step, 3 x 32 = 96 network inputs
    optimizer: str = "sgd"  # "sgd" (cosine schedule) or "adam" (constant lr), as --optim
    lr: float = 0.03  # learning rate (the start of the cosine for sgd)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 3e-5  # both optimizers
    freeze_steps: int = 20  # backbone frozen while step < freeze_steps (--freeze_resnet)
    head_layers: int = 1  # Linear(512)-BN-ReLU blocks before the Linear(128)-BN-ReLU (--head_layer)
    head_width: int = 512  # width of those blocks
    head_out: int = 128  # width of the last head block (the classifier's input)
    image_jitter: float = 0.1  # ColorJitter of the whole train image before CutPaste (0 = off)
    patch_jitter: float = 0.1  # ColorJitter of the cut patch (0 = off)
    area_ratio: tuple[float, float] = (0.02, 0.15)  # CutPaste patch area / image area
    aspect_ratio: float = 0.3  # CutPaste aspect ratio log-uniform in [a, 1/a]
    scar_width: tuple[float, float] = (2.0, 16.0)  # px at 256 px
    scar_height: tuple[float, float] = (10.0, 25.0)  # px at 256 px
    scar_rotation: tuple[float, float] = (-45.0, 45.0)  # degrees
    eval_batch_size: int = 64  # eval.py's DataLoader batch for embeddings

    def __post_init__(self):
        for key in ("steps", "batch_size", "head_width", "head_out", "eval_batch_size"):
            check_range(key, getattr(self, key), 1, integer=True)
        check_range("head_layers", self.head_layers, 0, integer=True)
        check_range("freeze_steps", self.freeze_steps, 0, integer=True)
        check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        check_range("lr", self.lr, 1e-12)
        check_range("momentum", self.momentum, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("image_jitter", self.image_jitter, 0.0, 1.0)
        check_range("patch_jitter", self.patch_jitter, 0.0, 1.0)
        check_pair("area_ratio", self.area_ratio, 1e-6, 0.999)
        check_range("aspect_ratio", self.aspect_ratio, 1e-6, 1.0)
        check_pair("scar_width", self.scar_width, 1e-6)
        check_pair("scar_height", self.scar_height, 1e-6)
        check_pair("scar_rotation", self.scar_rotation, -360.0, 360.0)


DEFAULTS: dict[str, Any] = dataclasses.asdict(CutPasteConfig())


# ----------------------------------------------------------------------------- augmentations


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One U(low, high) draw (``random.uniform``), from ``generator``."""
    return low + (high - low) * torch.rand((), generator=generator).item()


def color_jitter(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """``ColorJitter(s, s, s, s)``: brightness, contrast, saturation in [1-s, 1+s], hue in [-s, s].

    Factors and a random order of the four operations are drawn as torchvision does. ``image`` is
    (3, H, W) float in [0, 1]; the result stays in [0, 1].
    """
    if strength <= 0:
        return image
    order = torch.randperm(4, generator=generator).tolist()
    factors = [_uniform(generator, max(0.0, 1 - strength), 1 + strength) for _ in range(3)]
    hue = _uniform(generator, -min(strength, 0.5), min(strength, 0.5))
    for op in order:
        if op == 0:
            image = TF.adjust_brightness(image, factors[0])
        elif op == 1:
            image = TF.adjust_contrast(image, factors[1])
        elif op == 2:
            image = TF.adjust_saturation(image, factors[2])
        else:
            image = TF.adjust_hue(image, hue)
    return image


def cutpaste_normal(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    area_ratio: Sequence[float] = DEFAULTS["area_ratio"],
    aspect_ratio: float = DEFAULTS["aspect_ratio"],
    jitter: float = DEFAULTS["patch_jitter"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CutPasteNormal``: copy a jittered rectangle of ``image`` to another random place.

    Args:
        image: (3, H, W) float in [0, 1]; not modified.
        generator: source of every random draw.
        area_ratio: (min, max) patch area as a fraction of H x W.
        aspect_ratio: width/height is log-uniform in [aspect_ratio, 1/aspect_ratio].
        jitter: colour-jitter strength of the patch.

    Returns:
        The augmented image and the (H, W) bool mask of the pasted rectangle.
    """
    _, h, w = image.shape
    area = _uniform(generator, *area_ratio) * h * w
    log_low, log_high = math.log(aspect_ratio), math.log(1 / aspect_ratio)
    aspect = math.exp(_uniform(generator, min(log_low, log_high), max(log_low, log_high)))
    cut_w = min(max(int(round(math.sqrt(area * aspect))), 1), w)
    cut_h = min(max(int(round(math.sqrt(area / aspect))), 1), h)
    y0, x0 = int(_uniform(generator, 0, h - cut_h)), int(_uniform(generator, 0, w - cut_w))
    patch = color_jitter(image[:, y0 : y0 + cut_h, x0 : x0 + cut_w], jitter, generator)
    y1, x1 = int(_uniform(generator, 0, h - cut_h)), int(_uniform(generator, 0, w - cut_w))
    out = image.clone()
    out[:, y1 : y1 + cut_h, x1 : x1 + cut_w] = patch
    mask = torch.zeros((h, w), dtype=torch.bool, device=image.device)
    mask[y1 : y1 + cut_h, x1 : x1 + cut_w] = True
    return out, mask


def cutpaste_scar(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    width: Sequence[float] = DEFAULTS["scar_width"],
    height: Sequence[float] = DEFAULTS["scar_height"],
    rotation: Sequence[float] = DEFAULTS["scar_rotation"],
    jitter: float = DEFAULTS["patch_jitter"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CutPasteScar``: a thin jittered patch, rotated, pasted through its footprint.

    Args:
        image: (3, H, W) float in [0, 1]; not modified.
        generator: source of every random draw.
        width, height: (min, max) patch size in pixels of ``image``.
        rotation: (min, max) angle in degrees, counter-clockwise, as PIL's ``rotate``.
        jitter: colour-jitter strength of the patch.

    Returns:
        The augmented image and the (H, W) bool mask of the pasted (rotated) patch.
    """
    _, h, w = image.shape
    cut_w, cut_h = _uniform(generator, *width), _uniform(generator, *height)
    y0 = int(_uniform(generator, 0, max(h - cut_h, 0)))
    x0 = int(_uniform(generator, 0, max(w - cut_w, 0)))
    # PIL's crop rounds the float box; keep at least one pixel at small image sizes
    y_end = min(max(int(round(y0 + cut_h)), y0 + 1), h)
    x_end = min(max(int(round(x0 + cut_w)), x0 + 1), w)
    patch = color_jitter(image[:, y0:y_end, x0:x_end], jitter, generator)
    angle = _uniform(generator, *rotation)
    rgba = torch.cat([patch, torch.ones_like(patch[:1])])  # alpha marks the patch footprint
    rgba = TF.rotate(rgba, angle, interpolation=InterpolationMode.NEAREST, expand=True, fill=0.0)
    rgba = rgba[:, :h, :w]  # only matters if a rotated patch outgrows a tiny image
    alpha = rgba[3] > 0.5  # (ph, pw)
    ph, pw = alpha.shape
    y1, x1 = int(_uniform(generator, 0, h - ph)), int(_uniform(generator, 0, w - pw))
    out = image.clone()
    region = out[:, y1 : y1 + ph, x1 : x1 + pw]  # a view: writes land in ``out``
    region[:, alpha] = rgba[:3, alpha]
    mask = torch.zeros((h, w), dtype=torch.bool, device=image.device)
    mask[y1 : y1 + ph, x1 : x1 + pw] = alpha
    return out, mask


def scar_scale(size: int | Sequence[int]) -> float:
    """Factor from the reference's 256-px scar sizes to images resized to ``size``."""
    side = size if isinstance(size, int) else min(size)
    return side / REFERENCE_SIZE


def make_batch(
    images: torch.Tensor,
    indices: Sequence[int],
    generator: torch.Generator,
    *,
    config: Mapping[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One 3-way batch: the jittered originals, their CutPaste and their Scar versions.

    Args:
        images: (N, 3, H, W) uint8 train images, already resized (and cropped).
        indices: the B images of this batch.
        generator: source of every random draw.
        config: merged CutPaste config (jitter, area, aspect, scar ranges).
        mean, std: normalisation applied after the augmentations.
        scale: multiplies the scar sizes (``scar_scale``).

    Returns:
        x (3B, 3, H, W) normalised, rows [originals; CutPaste; Scar], and y (3B,) = 0..0 1..1 2..2.
    """
    scar_w = [v * scale for v in config["scar_width"]]
    scar_h = [v * scale for v in config["scar_height"]]
    views: list[list[torch.Tensor]] = [[], [], []]
    for index in indices:
        image = color_jitter(images[index].float() / 255, config["image_jitter"], generator)
        normal, _ = cutpaste_normal(
            image,
            generator,
            area_ratio=config["area_ratio"],
            aspect_ratio=config["aspect_ratio"],
            jitter=config["patch_jitter"],
        )
        scar, _ = cutpaste_scar(
            image,
            generator,
            width=scar_w,
            height=scar_h,
            rotation=config["scar_rotation"],
            jitter=config["patch_jitter"],
        )
        for view, x in zip(views, (image, normal, scar), strict=True):
            view.append(x)
    x = TF.normalize(torch.cat([torch.stack(v) for v in views]), list(mean), list(std))
    y = torch.arange(NUM_CLASSES, device=x.device).repeat_interleave(len(indices))
    return x, y


def index_stream(n: int, generator: torch.Generator) -> Iterator[int]:
    """Endless image indices: back-to-back random permutations of range(n)."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


# ----------------------------------------------------------------------------- model and training


class CutPasteNet(nn.Module):
    """``ProjectionNet``: backbone embedding -> MLP head -> Linear classifier.

    ``forward`` returns (embeddings (B, D) from the backbone's avgpool, logits (B, classes)).
    Linear layers are initialised like PyTorch's default but from ``generator``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        *,
        head_layers: int,
        head_width: int,
        head_out: int,
        num_classes: int = NUM_CLASSES,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        widths = [embed_dim] + [head_width] * head_layers + [head_out]
        blocks: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Linear(width_in, width_out), nn.BatchNorm1d(width_out), nn.ReLU()]
        self.head = nn.Sequential(*blocks)
        self.out = nn.Linear(head_out, num_classes)
        for module in [*self.head, self.out]:
            if isinstance(module, nn.Linear):
                _init_linear(module, generator)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.backbone(x)  # (B, D): fc is Identity
        return embeddings, self.out(self.head(embeddings))

    def freeze_backbone(self, frozen: bool) -> None:
        """``freeze_resnet``/``unfreeze``: only the backbone's ``requires_grad`` changes."""
        for param in self.backbone.parameters():
            param.requires_grad_(not frozen)


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """``nn.Linear.reset_parameters`` with an explicit generator."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def reference_lr(step: int, steps: int, base_lr: float) -> float:
    """Learning rate of update ``step`` (0-based) in the reference's SGD run.

    ``CosineAnnealingWarmRestarts(T_0=steps)`` stepped with ``scheduler.step(step)`` after the
    update, so steps 0 and 1 use ``base_lr`` and step s >= 1 uses the cosine at s - 1.
    """
    t = max(step - 1, 0) % steps
    return base_lr * (1 + math.cos(math.pi * t / steps)) / 2


def train_cutpaste(
    model: nn.Module,
    images: torch.Tensor,
    *,
    config: Mapping[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    scale: float = 1.0,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> CutPasteNet:
    """Fine-tune ``model`` (changed in place: pass a copy) on the 3-way CutPaste task.

    Args:
        model: torchvision ResNet with ``fc = Identity``.
        images: (N, 3, H, W) uint8 train images at the training size.
        config: merged CutPaste config.
        mean, std: the backbone's normalisation.
        scale: scar size factor (``scar_scale``).
        device: where to train.
        seed: seeds head init, batch order and augmentations.

    Returns:
        The trained ``CutPasteNet`` (its ``backbone`` is ``model``), in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    net = _make_net(model.to(device).eval(), tuple(images.shape[-2:]), config, device=device, generator=generator)
    optimizer = _make_optimizer(net, config)
    batches = _three_way_batches(images.to(device), generator, config=config, mean=mean, std=std, scale=scale)
    steps = config["steps"]
    net.train()  # the reference trains in train mode throughout, frozen backbone included
    net.freeze_backbone(config["freeze_steps"] > 0)
    with deterministic_torch():
        for step in range(steps):
            if step == config["freeze_steps"]:
                net.freeze_backbone(False)
            if config["optimizer"] == "sgd":
                for group in optimizer.param_groups:
                    group["lr"] = reference_lr(step, steps, config["lr"])
            x, y = next(batches)
            loss, logits = _update(net, optimizer, x, y)
            if step % 32 == 0 or step == steps - 1:
                accuracy = (logits.argmax(dim=1) == y).float().mean().item()
                log.info("CutPaste step %d: loss %.4f, accuracy %.3f", step, loss.item(), accuracy)
    net.freeze_backbone(True)
    return net.eval()


def _make_net(
    model: nn.Module,
    image_size: tuple[int, int],
    config: Mapping[str, Any],
    *,
    device: str | torch.device,
    generator: torch.Generator,
) -> CutPasteNet:
    """``CutPasteNet`` around ``model`` (on ``device``, in eval mode), its head as wide as ``model``'s embedding."""
    with torch.no_grad():  # one zero image gives the embedding width
        embed_dim = model(torch.zeros(1, 3, *image_size, device=device)).shape[1]
    return CutPasteNet(
        model,
        embed_dim,
        head_layers=config["head_layers"],
        head_width=config["head_width"],
        head_out=config["head_out"],
        generator=generator,
    ).to(device)


def _make_optimizer(net: nn.Module, config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD with momentum (its lr set per step by ``reference_lr``) or Adam at a constant lr."""
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(
            net.parameters(),
            lr=config["lr"],
            momentum=config["momentum"],
            weight_decay=config["weight_decay"],
        )
    return torch.optim.Adam(net.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])


def _three_way_batches(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    config: Mapping[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    scale: float,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``make_batch`` batches of ``config["batch_size"]`` images from ``index_stream``, drawn when asked for."""
    indices = index_stream(len(images), generator)
    while True:
        batch = [next(indices) for _ in range(config["batch_size"])]
        yield make_batch(images, batch, generator, config=config, mean=mean, std=std, scale=scale)


def _update(
    net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the cross-entropy of ``net``'s logits for ``x``; returns (loss, logits)."""
    optimizer.zero_grad()
    _, logits = net(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss, logits


# ----------------------------------------------------------------------------- density


@dataclass
class GaussianDensity:
    """``GaussianDensityTorch``: mean and Ledoit-Wolf precision of L2-normalised embeddings."""

    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)

    @classmethod
    def fit(cls, embeddings: np.ndarray | torch.Tensor) -> GaussianDensity:
        """Fit on train embeddings (M, D), L2-normalised here as ``eval.py`` does."""
        from sklearn.covariance import LedoitWolf  # an anomalib dependency; imported when used

        x = l2_normalise(embeddings)
        return cls(mean=x.mean(axis=0), precision=LedoitWolf().fit(x).precision_)

    def score(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,) Mahalanobis distances of the L2-normalised ``embeddings`` (N, D)."""
        diff = l2_normalise(embeddings) - self.mean
        squared = np.einsum("im,mn,in->i", diff, self.precision, diff)
        return np.sqrt(np.maximum(squared, 0.0))  # rounding can make ~0 slightly negative


def l2_normalise(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows scaled to unit L2 norm (``F.normalize(p=2, dim=1)``, eps 1e-12), as float64."""
    x = np.asarray(torch.as_tensor(embeddings).detach().cpu(), dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- entry point


def _uint8_images(dataset: ADImageDataset, batch_size: int) -> torch.Tensor:
    """Every image of an identity-normalised dataset, (N, 3, H, W) uint8: the reference's cache."""
    batches = [b["image"] for b in make_loader(dataset, batch_size)]
    return torch.cat(batches).mul(255).round().clamp(0, 255).to(torch.uint8)


def run_cutpaste(
    backbone: Any,
    split: Split,
    *,
    size: int | Sequence[int] = 256,
    crop: int | Sequence[int] | None = None,
    config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> MethodScores:
    """Fine-tune a copy of the backbone on 3-way CutPaste, then score ``split.test`` (image level).

    Args:
        backbone: ``(model, mean, std)`` or an object with ``.build()``, ``.mean``, ``.std``
            (see ``features.resolve_backbone``). The model is never modified: a copy is trained.
        split: from ``ad_eval.datasets.scan``.
        size, crop: image resize and optional centre crop (``ADImageDataset``), for training and
            scoring alike; the reference uses 256 px, no crop.
        config: a ``CutPasteConfig``, or overrides of ``DEFAULTS`` (an unknown key raises ConfigError).
        device: torch device.
        seed: seeds head init, batch order and augmentations: same seed, same scores.

    Returns:
        ``MethodScores`` in ``split.test`` order: Mahalanobis distances of the L2-normalised test
        embeddings to the train ones; ``anomaly_maps`` and ``masks`` are None.
    """
    cfg = dataclasses.asdict(as_config(config))
    model, mean, std = resolve_backbone(backbone)
    model = copy.deepcopy(model)
    raw = ADImageDataset(split.train, size=size, crop=crop, mean=(0, 0, 0), std=(1, 1, 1))
    net = train_cutpaste(
        model,
        _uint8_images(raw, cfg["eval_batch_size"]),
        config=cfg,
        mean=mean,
        std=std,
        scale=scar_scale(size),
        device=device,
        seed=seed,
    )
    layers = ("layer4",)  # avgpool embedding = net.backbone(x)
    embeddings = [
        extract_features(
            net.backbone,
            make_loader(
                ADImageDataset(s, size=size, crop=crop, mean=mean, std=std), cfg["eval_batch_size"]
            ),
            layers,
            device,
        )
        for s in (split.train, split.test)
    ]
    density = GaussianDensity.fit(embeddings[0])
    return MethodScores(
        image_scores=density.score(embeddings[1]),
        image_labels=np.array([s.label for s in split.test], dtype=np.int64),
    )


def as_config(config: CutPasteConfig | Mapping[str, Any] | None) -> CutPasteConfig:
    """A ``CutPasteConfig`` as is, or one built from overrides of the defaults."""
    return config if isinstance(config, CutPasteConfig) else SPEC.make_config(config)


def run(backbone: Any, split: Split, *, layers: tuple[str, ...] | None, size: int, crop: int | None,
        config: CutPasteConfig, device: str, seed: int, work_dir: Path) -> MethodScores:
    """The registry's entry point (``registry.MethodSpec.run``); CutPaste takes no layers."""
    return run_cutpaste(backbone, split, size=size, crop=crop, config=config, device=device, seed=seed)


SPEC = register(MethodSpec(
    name="cutpaste", label="CutPaste", config=CutPasteConfig, run=run, pixel_maps=False,
    min_train_images=lambda config, layers, side: 2,  # a Gaussian fit (Ledoit-Wolf) needs two embeddings
))
