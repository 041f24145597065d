"""FeatureNorm (ADPretrain ``val_norm.py``): each patch scored by the compressed norm of its residual feature.

score(patch) = sqrt(||e|| + 1) - 1, e the projected residual feature (``--projector``) or, without a
projector, the raw residual f - nearest reference patch (K = ``shots`` train images chosen by
``ad_eval.fewshot.select_shots`` with the cell's seed). Per layer the (h, w) map is bilinearly upsampled
to the image size, the layers averaged, the map smoothed by a Gaussian (sigma 4, as PatchCore's anomalib
map); image score = the map's maximum. Nothing is fitted: only the references are read from train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ad_eval.datasets import ADImageDataset, Split
from ad_eval.fewshot import select_shots
from ad_eval.methods.base import MethodScores
from ad_eval.methods.registry import ANY_LAYER_SET, MethodSpec, register
from ad_eval.projection import ProjectedExtractor, projection_of
from fractal_pretrain.adapt.features import stage_features
from fractal_pretrain.adapt.losses import compressed_norm
from fractal_pretrain.adapt.residual import residual_features
from fractal_pretrain.config import check_range

REFERENCE_KEY = "featurenorm"  # the few-shot ranking key of the references without a projector


@dataclass(frozen=True)
class FeatureNormConfig:
    shots: int = 8  # references without a projector (a projector brings its own K)
    sigma: float = 4.0  # Gaussian smoothing of the map, pixels
    batch_size: int = 16  # test images per forward pass (memory, not results)

    def __post_init__(self):
        check_range("shots", self.shots, 1, 1024, integer=True)
        check_range("sigma", self.sigma, 0.0, 64.0)
        check_range("batch_size", self.batch_size, 1, 4096, integer=True)


class StageExtractor(nn.Module):
    def __init__(self, model: nn.Module, layers):
        super().__init__()
        self.model, self.layers = model, tuple(layers)

    def forward(self, images):
        return stage_features(self.model, images, self.layers)


class RawResidual(nn.Module):
    """The extractor's features minus their nearest reference patch (no projector)."""

    def __init__(self, inner: nn.Module, references: torch.Tensor):
        super().__init__()
        self.inner, self.references = inner, references
        self._reference_features = None

    def forward(self, images):
        features = self.inner(images)
        if self._reference_features is None:
            self._reference_features = {k: v.float() for k, v in self.inner(self.references.to(images)).items()}
        return {k: residual_features(f.float(), self._reference_features[k]) for k, f in features.items()}


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) maps smoothed by a separable Gaussian of kernel 2 * int(4 sigma + 0.5) + 1, reflect padding."""
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps[:, None]
    pad_w, pad_h = min(radius, maps.shape[-1] - 1), min(radius, maps.shape[-2] - 1)
    kernel_w = kernel[radius - pad_w:radius + pad_w + 1].view(1, 1, 1, -1)  # small maps: a truncated kernel
    kernel_h = kernel[radius - pad_h:radius + pad_h + 1].view(1, 1, -1, 1)
    out = F.conv2d(F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect"), kernel_w / kernel_w.sum())
    out = F.conv2d(F.pad(out, (0, 0, pad_h, pad_h), mode="reflect"), kernel_h / kernel_h.sum())
    return out[:, 0]


def norm_maps(extractor: nn.Module, images: torch.Tensor, out_size) -> torch.Tensor:
    """(B, H, W) mean over layers of the upsampled compressed-norm maps."""
    maps = [F.interpolate(compressed_norm(e.movedim(1, -1))[:, None], size=list(out_size), mode="bilinear",
                          align_corners=False)[:, 0] for e in extractor(images).values()]
    return torch.stack(maps).mean(0)


@torch.no_grad()
def run(backbone, split: Split, *, layers, size, crop, config: FeatureNormConfig, device: str, seed: int,
        work_dir: Path) -> MethodScores:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = backbone.build().to(device).eval()
    extractor = StageExtractor(model, layers)
    projection = projection_of(backbone)
    if projection is not None:
        projection.check_layers(layers, "featurenorm")
        references = projection.references
    else:
        references = select_shots(split.train, min(config.shots, len(split.train)), seed=seed, category=REFERENCE_KEY)

    def load(samples):
        return ADImageDataset(samples, size=size, crop=crop, mean=backbone.mean, std=backbone.std)

    ref_images = torch.stack([item["image"] for item in load(references)]).to(device)
    if projection is not None:
        extractor = ProjectedExtractor(extractor, projection, ref_images).to(device)
    else:
        extractor = RawResidual(extractor, ref_images)
    test = load(split.test)
    out_size = test.out_size
    maps, masks = [], []
    for start in range(0, len(test), config.batch_size):
        items = [test[i] for i in range(start, min(start + config.batch_size, len(test)))]
        images = torch.stack([item["image"] for item in items]).to(device)
        maps.append(gaussian_smooth(norm_maps(extractor, images, out_size), config.sigma).cpu())
        masks.extend(item["mask"][0] for item in items)
    maps = torch.cat(maps)
    return MethodScores(
        image_scores=maps.flatten(1).max(1).values.double().numpy(),
        image_labels=np.array([s.label for s in split.test], dtype=np.int64),
        anomaly_maps=maps.float().numpy(),
        masks=torch.stack(masks).numpy(),
    )


register(MethodSpec(name="featurenorm", label="FeatureNorm", config=FeatureNormConfig, run=run,
                    default_layers=("layer2", "layer3"), allowed_layer_sets=ANY_LAYER_SET, pixel_maps=True,
                    accepts_projector=True))
