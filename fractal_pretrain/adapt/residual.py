"""Residual features (ADPretrain, ad_methods.md §3.2): a patch feature minus its nearest normal reference.

For each patch feature f of an image, p is the patch feature with the highest cosine similarity among all
patch features of the K reference images (both sides L2-normalised for the matching only), and the
residual is the raw difference r = f - p. A reference identical to the image gives r = 0 everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_reference(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """The cosine-nearest reference patch feature of every patch, raw (not normalised).

    Args:
        features: (B, C, h, w) patch features of the images.
        references: (B, K, C, h', w') the references of each image, or (K, C, h', w') shared by all.

    Returns:
        (B, C, h, w): for each patch of ``features``, the reference patch feature it matches.
    """
    batch, channels, height, width = features.shape
    if references.ndim == 4:
        references = references.unsqueeze(0).expand(batch, *references.shape)
    if references.ndim != 5 or references.shape[0] != batch or references.shape[2] != channels:
        raise ValueError(f"references {tuple(references.shape)} do not fit features {tuple(features.shape)}")
    queries = features.flatten(2).transpose(1, 2)  # (B, hw, C)
    bank = references.transpose(1, 2).flatten(2).transpose(1, 2)  # (B, K h' w', C)
    similarity = torch.bmm(F.normalize(queries.float(), dim=-1), F.normalize(bank.float(), dim=-1).transpose(1, 2))
    nearest = similarity.argmax(dim=-1)  # (B, hw); ties: the first reference patch
    matched = torch.gather(bank, 1, nearest.unsqueeze(-1).expand(-1, -1, channels))  # (B, hw, C)
    return matched.transpose(1, 2).reshape(batch, channels, height, width)


def residual_features(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """r = f - p (see ``nearest_reference``), same shape and dtype as ``features``."""
    return features - nearest_reference(features, references).to(features.dtype)
