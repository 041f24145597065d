"""Normal images and their K references: what "normal appearance" a synthetic defect is measured against.

AD asks whether a patch is a local change relative to its category's normal appearance, and residual
features (``residual.py``) measure a patch against the cosine-nearest patch of K normal references. The
synthetic task only teaches that when the references *cover* a normal image: ADPretrain's references are
other images of the same RealIAD class in the same camera view (ad_methods.md §3.2), and downstream the
8-shot train images of an MVTec category; both are nearly the same object, pose and lighting.

Two definitions (``model.references``):

* ``instance`` (default): one render (class c, key j) is a normal *instance*; the normal image and each of
  its K references are crops of it, side ``size``, at independent keyed offsets in [0, 2 margin] of a
  render of side ``size + 2 margin`` (margin = ``reference_shift`` x size): the same object seen with a
  small shift, as a camera sees one product again. A defect then is the only thing the references cannot
  explain, apart from the shift and the photometric views (applied to the image, not to the references,
  as ADPretrain does).
* ``class`` (the issue's first wording): the references are other renders of the same class (other keys).
  With ``anderson`` two renders of one class differ in almost everything but the IFS system (window scale
  0.5-2 per axis, 8 flips, any hue, another plasma background, another 3x3 patch), so a normal patch is
  nearly as far from its nearest reference patch as a defect is: on held-out classes the raw residual
  norm of plain anomalous images separates defect patches from normal ones with a patch AUROC of
  0.64 / 0.69 (layers 2 / 3, random resnet18 at 96 px), against 0.81 / 0.76 with ``instance``
  references (RESULTS.md, "Why the held-out validation read below 0.5"). Kept for comparison.

Crop offsets: ``rng.STREAM_REFERENCE_SHIFTS`` with the render's key (seed, epoch, sample key), slot 0 for
the image and slot 1 + i for reference i; so the image and its references are pure functions of the key.
"""

from __future__ import annotations

import numpy as np
import torch

from fractal_pretrain import rng
from fractal_pretrain.transfer import host_to_device

REFERENCE_MODES = ("instance", "class")


def shift_margin(size: int, reference_shift: float) -> int:
    """Pixels of render beyond the crop on each side (0: every crop is the whole render)."""
    return int(round(reference_shift * size))


def crop_offsets(seed: int, epoch: int, keys: np.ndarray, copies: int, margin: int) -> np.ndarray:
    """(B, copies, 2) int64 (top, left) in [0, 2 margin]: copy 0 is the image, copy 1 + i reference i."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 1)
    words = rng.draw_words(seed, epoch, keys, rng.STREAM_REFERENCE_SHIFTS, 0, slot=np.arange(copies)[None, :])
    return np.stack([rng.to_int(words[0], 2 * margin + 1), rng.to_int(words[1], 2 * margin + 1)], axis=-1)


def crop_copies(renders: torch.Tensor, offsets: np.ndarray, size: int) -> torch.Tensor:
    """(B copies, C, size, size) crops of (B, C, S, S) ``renders`` at (B, copies, 2) offsets, one gather."""
    batch, copies = offsets.shape[:2]
    device = renders.device
    top = host_to_device(offsets[..., 0].reshape(-1), device)  # pinned: a pageable copy would sync the host
    left = host_to_device(offsets[..., 1].reshape(-1), device)
    local = torch.arange(size, device=device)
    source = torch.arange(batch, device=device).repeat_interleave(copies)
    rows = (top[:, None] + local)[:, :, None]  # (N, size, 1)
    cols = (left[:, None] + local)[:, None, :]  # (N, 1, size)
    return renders.permute(0, 2, 3, 1)[source[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()


def split_copies(crops: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, ...), references (B K, ...)) of (B copies, ...) crops, copies = 1 + K."""
    grouped = crops.view(-1, copies, *crops.shape[1:])
    return grouped[:, 0].contiguous(), grouped[:, 1:].reshape(-1, *crops.shape[1:])
