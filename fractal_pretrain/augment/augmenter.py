"""``BatchAugmenter``: the whole OFDB-4AD training transform for one batch, on the batch's device."""

from __future__ import annotations

import numpy as np
import torch

from fractal_pretrain.augment import ops
from fractal_pretrain.augment.config import AugmentConfig
from fractal_pretrain.augment.params import MixParams, SampleParams, mix_params, sample_params
from fractal_pretrain.augment.policy import IMAGENET_POLICY, SIGNED_OPS, magnitude


class BatchAugmenter:
    """Augments batches: uint8 (or [0, 1] float) images + labels -> normalised images + soft targets.

    Args:
        config: the ``augment`` block.
        num_classes: width of the soft targets.
        out_dtype: dtype of the returned images (float32 or bfloat16); targets are always float32.
    """

    def __init__(self, config: AugmentConfig, num_classes: int, out_dtype: torch.dtype = torch.float32):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: must be positive")
        self.config = config
        self.num_classes = num_classes
        self.out_dtype = out_dtype
        self._magnitudes: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, seed: int, epoch: int, indices,
                 step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one rank's batch.

        Args:
            images: (N, C, H, W) uint8, or float in [0, 1], on the training device; C is 1 or 3.
            labels: (N,) int64 class indices, or (N, num_classes) multi-hot / soft targets.
            seed, epoch: the run's seed and the epoch, as for rendering.
            indices: (N,) global sample indices, on the host (NumPy, list or CPU tensor).
            step, rank: the optimiser step within the epoch and the rank; they key the batch mix.

        Returns:
            images (N, C, size, size) normalised, ``out_dtype``; targets (N, num_classes) float32,
            rows summing to the label mass (1 for class labels). The loss is
            ``cross_entropy(logits, targets)``, which equals lam * CE(y) + (1 - lam) * CE(y_partner).
        """
        indices = _host_indices(indices, len(images))
        params = self.sample_params(images, seed, epoch, indices)
        x = self.transform(images, params)
        size = x.shape[-1]
        mix = mix_params(self.config, seed, epoch, step, rank, len(images), size, size)
        targets = self.targets(labels, images.device)
        x, targets = apply_mix(x, targets, mix)
        return x.to(self.out_dtype), targets

    def sample_params(self, images: torch.Tensor, seed: int, epoch: int, indices) -> SampleParams:
        height, width = images.shape[-2:]
        return sample_params(self.config, seed, epoch, indices, height, width)

    def transform(self, images: torch.Tensor, params: SampleParams) -> torch.Tensor:
        """The per-sample part: crop + flip, AutoAugment, normalise, erase (float32 out)."""
        cfg = self.config
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images of shape {tuple(images.shape)}: expected (N, 1 or 3, H, W)")
        pixels = images if images.dtype == torch.uint8 else images.float() * 255.0
        if not cfg.enabled:
            return ops.normalise(ops.quantise(pixels) if pixels.dtype != torch.uint8 else pixels, cfg.mean, cfg.std)
        x = ops.quantise(ops.resized_crop(pixels, params.crop, cfg.size, params.hflip))
        x = self.autoaugment(x, params)
        x = ops.normalise(x, cfg.mean, cfg.std)
        if params.erase[:, 2].any():
            x = ops.erase(x, params.erase, cfg.erase_value)
        return x

    def autoaugment(self, images: torch.Tensor, params: SampleParams) -> torch.Tensor:
        """Both steps of each sample's sub-policy, grouped: one batched call per (step, op) present."""
        if not (params.policy >= 0).any():
            return images
        images = images.clone()
        table = self._magnitude_table(*images.shape[-2:])
        for step in (0, 1):
            names = np.array([IMAGENET_POLICY[p][step][0] if p >= 0 else "" for p in params.policy])
            active = params.fire[:, step] & (params.policy >= 0)
            for name in np.unique(names[active]):
                chosen = np.flatnonzero(active & (names == name))
                mags = table[params.policy[chosen], step]
                if name in SIGNED_OPS:
                    mags = np.where(params.negate[chosen, step], -mags, mags)
                where = torch.from_numpy(chosen).to(images.device, non_blocking=True)
                group = images.index_select(0, where)
                images.index_copy_(0, where, ops.AUTOAUGMENT_OPS[name](group, mags))
        return images

    def targets(self, labels: torch.Tensor, device) -> torch.Tensor:
        labels = labels.to(device, non_blocking=True)
        if labels.ndim == 1:
            return torch.nn.functional.one_hot(labels.long(), self.num_classes).float()
        if labels.shape[-1] != self.num_classes:
            raise ValueError(f"labels of shape {tuple(labels.shape)}: expected (N,) or (N, {self.num_classes})")
        return labels.float()

    def _magnitude_table(self, height: int, width: int) -> np.ndarray:
        """(25, 2) unsigned magnitudes of the policy for images of this size (cached)."""
        key = (height, width)
        if key not in self._magnitudes:
            self._magnitudes[key] = np.array(
                [[magnitude(op, bin_, height, width) for op, _, bin_ in sub] for sub in IMAGENET_POLICY])
        return self._magnitudes[key]


def apply_mix(images: torch.Tensor, targets: torch.Tensor, mix: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix or MixUp the batch with its partners; targets mix with the same lambda."""
    if mix.mode == "none":
        return images, targets
    partner = torch.from_numpy(mix.partner).to(images.device, non_blocking=True)
    if mix.mode == "cutmix":
        top, bottom, left, right = mix.box
        images = images.clone()
        images[:, :, top:bottom, left:right] = images.index_select(0, partner)[:, :, top:bottom, left:right]
    else:
        images = images * mix.lam + images.index_select(0, partner) * (1.0 - mix.lam)
    return images, targets * mix.lam + targets.index_select(0, partner) * (1.0 - mix.lam)


def _host_indices(indices, n: int) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()  # a sync if it lived on the device: pass host indices
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) != n:
        raise ValueError(f"{len(indices)} sample indices for a batch of {n}")
    return indices
