"""Batched on-device training augmentation (OFDB-4AD's transforms), keyed by the counter-based RNG.

API::

    from fractal_pretrain.augment import AugmentConfig, BatchAugmenter

    cfg = AugmentConfig.from_dict(yaml_block)        # data.augment; {} or absent: disabled
    aug = BatchAugmenter(cfg, num_classes=1000, out_dtype=torch.bfloat16)
    images, targets = aug(images_u8, labels, seed=seed, epoch=epoch, indices=host_indices,
                          step=step_in_epoch, rank=rank)
    loss = torch.nn.functional.cross_entropy(logits, targets)   # (label_smoothing= works too)

* ``images_u8``: (N, C, H, W) uint8 (or float in [0, 1]) on the training device, C = 1 or 3.
* ``labels``: (N,) int64 classes, or (N, num_classes) multi-hot; any device.
* ``indices``: the batch's global sample indices, on the host.
* returns images (N, C, size, size) normalised in ``out_dtype`` and soft targets (N, num_classes)
  float32 = lam * onehot(y) + (1 - lam) * onehot(y[partner]). Cross-entropy against them is
  OFDB-4AD's lam * CE(y_a) + (1 - lam) * CE(y_b) and timm's SoftTargetCrossEntropy after Mixup;
  ``F.cross_entropy(..., label_smoothing=eps)`` on them equals timm's smoothed mixup targets.

Order (torchvision's, as OFDB-4AD's ``main.py``): RandomResizedCrop -> horizontal flip ->
AutoAugment (ImageNet policy, on uint8) -> ToTensor + Normalize -> RandomErasing -> CutMix/MixUp.

Determinism: every per-sample draw (crop, flip, sub-policy, op coins, signs, erase box) is a pure
function of ``(seed, epoch, global index)`` through ``rng.py``, so a sample augments to the same
pixels in any batch, on any rank, for any world size or batch split. The mix is one draw per
``(seed, epoch, step, rank)`` (on/off, CutMix or MixUp, lambda, box, partner permutation) and pairs
samples within the rank's batch: by design it depends on the batch, so it is reproduced exactly on
resume with the same world size and batch size, not across a different split.

Modules: ``config`` (AugmentConfig), ``policy`` (AutoAugment table), ``params`` (host draws),
``ops`` (batched device ops, each tested against torchvision), ``augmenter`` (BatchAugmenter).
"""

from fractal_pretrain.augment.augmenter import BatchAugmenter, apply_mix
from fractal_pretrain.augment.config import AugmentConfig

__all__ = ["AugmentConfig", "BatchAugmenter", "apply_mix"]
