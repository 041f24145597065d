"""``BatchAugmenter``: the whole OFDB-4AD training transform for one batch, on the batch's device.

The host decides everything (params.py), so it also knows which samples take which AutoAugment op:
samples are grouped per (sub-policy step, op) and each group is one batched call. The per-sample
parameters and group indices of a stage go to the device in one pinned, non-blocking copy, so a batch
never waits for the device (no ``.item()``, no ``nonzero``, no pageable copies).
"""

from __future__ import annotations

import numpy as np
import torch

from fractal_pretrain.augment import ops
from fractal_pretrain.augment.config import AugmentConfig
from fractal_pretrain.augment.params import MixParams, SampleParams, mix_params, sample_params
from fractal_pretrain.augment.policy import IMAGENET_POLICY, SIGNED_OPS, magnitude
from fractal_pretrain.transfer import host_to_device

_POLICY_OPS = np.array([[name for name, _, _ in sub] for sub in IMAGENET_POLICY])  # (25, 2) op names


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
        self._stats: dict[torch.device, list[torch.Tensor]] = {}  # mean, std on each device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, seed: int, epoch: int, indices,
                 step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one rank's batch.

        Args:
            images: (N, C, H, W) uint8, or float in [0, 1], on the training device; C is 1 or 3.
            labels: (N,) int64 class indices, or (N, num_classes) multi-hot / soft targets.
            seed, epoch: the run's seed and the epoch, as for rendering.
            indices: (N,) global sample indices, on the host (NumPy, list or CPU tensor).
            step, rank: key the batch mix with (seed, epoch): the step (within the epoch or global, as
                long as a resume gives the same number again) and this process's rank (< 65536).

        Returns:
            images (N, C, size, size) normalised, ``out_dtype`` (C = 3 where ``mean`` has three values: a grey
            batch is repeated over them); targets (N, num_classes) float32,
            rows summing to the label mass (1 for class labels). The loss is
            ``cross_entropy(logits, targets)``, which equals lam * CE(y) + (1 - lam) * CE(y_partner).
        """
        indices = _host_indices(indices, len(images))
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for a batch of {len(images)}")
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
        """The per-sample part: crop + flip, then AutoAugment, normalise, erase (float32 out)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images of shape {tuple(images.shape)}: expected (N, 1 or 3, H, W)")
        return self.finish(self.crop(images, params), params)

    def crop(self, images: torch.Tensor, params: SampleParams) -> torch.Tensor:
        """RandomResizedCrop + horizontal flip -> uint8 (N, C, size, size); disabled: the input as uint8."""
        pixels = images if images.dtype == torch.uint8 else images.float() * 255.0
        if not self.config.enabled:
            return pixels if pixels.dtype == torch.uint8 else ops.quantise(pixels)
        crop, hflip = upload([params.crop, params.hflip], images.device)
        return ops.quantise(ops.resized_crop(pixels, crop, self.config.size, hflip))

    def finish(self, images: torch.Tensor, params: SampleParams) -> torch.Tensor:
        """AutoAugment on uint8, normalise, RandomErasing."""
        cfg = self.config
        if images.device not in self._stats:
            self._stats[images.device] = upload([np.array(cfg.mean), np.array(cfg.std)], images.device)
        pixels = self.autoaugment(images, params)
        if pixels.shape[1] == 1 and len(cfg.mean) == 3:  # grey images for an RGB network, as PIL's convert("RGB")
            pixels = pixels.expand(-1, 3, -1, -1)
        x = ops.normalise(pixels, *self._stats[images.device])
        if params.erase[:, 2].any():
            (boxes,) = upload([params.erase], images.device)
            x = ops.erase(x, boxes, cfg.erase_value)
        return x

    def autoaugment(self, images: torch.Tensor, params: SampleParams) -> torch.Tensor:
        """Both steps of each sample's sub-policy, grouped: one batched call per (step, op) present."""
        groups = self._groups(params, *images.shape[-2:])
        if not groups:
            return images
        staged = upload([array for _, chosen, prepared in groups for array in (chosen, prepared)], images.device)
        images = images.clone()
        for k, (name, _, _) in enumerate(groups):
            where, prepared = staged[2 * k].long(), staged[2 * k + 1]
            apply = ops.AUTOAUGMENT_OPS[name][1]
            images.index_copy_(0, where, apply(images.index_select(0, where), prepared))
        return images

    def _groups(self, params: SampleParams, height: int, width: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(op, samples, prepared parameters) in application order: step 1's groups, then step 2's."""
        table = self._magnitude_table(height, width)
        groups = []
        for step in (0, 1):
            names = _POLICY_OPS[np.maximum(params.policy, 0), step]  # an index, not a per-sample loop
            active = params.fire[:, step] & (params.policy >= 0)
            for name in np.unique(names[active]):
                chosen = np.flatnonzero(active & (names == name))
                mags = table[params.policy[chosen], step]
                if name in SIGNED_OPS:
                    mags = np.where(params.negate[chosen, step], -mags, mags)
                groups.append((str(name), chosen, ops.AUTOAUGMENT_OPS[name][0](mags, height, width)))
        return groups

    def targets(self, labels: torch.Tensor, device) -> torch.Tensor:
        labels = labels.to(device, non_blocking=True)
        if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[-1] != self.num_classes):
            raise ValueError(f"labels of shape {tuple(labels.shape)}: expected (N,) or (N, {self.num_classes})")
        if labels.ndim == 1:  # one-hot by scatter: F.one_hot range-checks (a sync) on some devices
            onehot = torch.zeros(len(labels), self.num_classes, device=device)
            return onehot.scatter_(1, labels.long().view(-1, 1), 1.0)
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
    (partner,) = upload([mix.partner], images.device)
    partner = partner.long()
    if mix.mode == "cutmix":
        top, bottom, left, right = mix.box
        images = images.clone()
        images[:, :, top:bottom, left:right] = images.index_select(0, partner)[:, :, top:bottom, left:right]
    else:
        images = images * mix.lam + images.index_select(0, partner) * (1.0 - mix.lam)
    return images, targets * mix.lam + targets.index_select(0, partner) * (1.0 - mix.lam)


def upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays -> float64 device tensors of the same shapes, in one pinned non-blocking copy.

    float64 holds every value exactly (indices, box corners, bit masks, float32 magnitudes).
    """
    flat = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    staged = host_to_device(np.concatenate(flat), device)  # pinned: a pageable copy would synchronise
    out, offset = [], 0
    for array, values in zip(arrays, flat, strict=True):
        out.append(staged[offset:offset + len(values)].view(np.shape(array)))
        offset += len(values)
    return out


def _host_indices(indices, n: int) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()  # a sync if it lived on the device: pass host indices
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) != n:
        raise ValueError(f"{len(indices)} sample indices for a batch of {n}")
    return indices
