"""ADPretrain's two losses, as ad_methods.md §3.4 writes them and as the reference code computes them
(``losses/angle_loss.py``, ``losses/norm_loss.py`` of shirazzyy/ADPretrain, read for the details §3.4 leaves
open: which features each mean runs over, which weights are detached).

Per level: e1, e2 are the projected residual features of two photometric views, (N, D) each (flattened
over batch and positions); m in {0, 1}^N their patch labels (1 = abnormal). ``total_loss`` sums
angle(e1, e2; m_angle) + norm(e1; m_norm) + norm(e2; m_norm) over levels; a batch with no abnormal
patch is skipped (the caller sees None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.15
NORMAL_RADIUS = 0.4  # r_max when no anomaly is present, and its upper bound otherwise
RADIUS_FRACTION = 0.9  # r_max = min(0.9 * min abnormal A, 0.4)
BAND = 0.99  # r_min = 0.99 * r_max
MARGIN = 0.75  # abnormal boundary b = r_max + 0.75
ANGLE_CELL_FRACTION = 32 / 196  # angle-loss patch label: more than 32 of 196 cell pixels abnormal


def compressed_norm(e: torch.Tensor) -> torch.Tensor:
    """A = sqrt(||e||_2 + 1) - 1 over the last dimension (also FeatureNorm's score)."""
    return torch.sqrt(torch.linalg.vector_norm(e, dim=-1) + 1.0) - 1.0


def angle_loss(e1: torch.Tensor, e2: torch.Tensor, labels: torch.Tensor, center: torch.Tensor | None = None,
               temperature: float = TEMPERATURE) -> torch.Tensor:
    """Angle-oriented contrastive loss: positive = the other view, negatives = the opposite class only.

    For a normal z: -log(exp(<z, z'>/t) / sum_{a abnormal} exp(<z, a>/t)); for an abnormal z the same with
    the normal features as negatives; mean over all 2N features. It can be negative (the positive is not in
    the denominator). NaN/Inf becomes 0, as in the reference code.
    """
    if center is not None:
        e1, e2 = e1 - center, e2 - center
    z = F.normalize(torch.cat([e1, e2]).float(), dim=-1)  # (2N, D)
    positive = F.normalize(torch.cat([e2, e1]).float(), dim=-1)
    abnormal = torch.cat([labels, labels]).bool()
    logits = z @ z.T / temperature  # (2N, 2N)
    opposite = abnormal[:, None] != abnormal[None, :]
    denominator = torch.logsumexp(logits.masked_fill(~opposite, float("-inf")), dim=1)
    loss = (denominator - (z * positive).sum(-1) / temperature).mean()
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)


def _barrier(distance: torch.Tensor) -> torch.Tensor:
    """Mean of exp(d) * softplus(d) over the violations d > 0 (weight detached); 0 when there is none."""
    violations = distance[distance > 0]
    if violations.numel() == 0:
        return distance.sum() * 0.0  # keeps the graph and the dtype
    return (torch.exp(violations).detach() * F.softplus(violations)).mean()


def norm_loss(e: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Norm-oriented loss: normal A on the band [r_min, r_max], abnormal A beyond r_max + 0.75.

    As ``losses/norm_loss.py``: r_max = min(0.9 min A_abnormal, 0.4) is a constant (``.item()`` there:
    no gradient through it); each penalty (normal above r_max, normal below r_min, abnormal below the
    boundary) is averaged over the features that violate it only, with a detached exp weight.
    """
    norm = compressed_norm(e.float())
    abnormal = labels.bool()
    if abnormal.any():
        r_max = min(RADIUS_FRACTION * float(norm[abnormal].min().detach()), NORMAL_RADIUS)
    else:
        r_max = NORMAL_RADIUS
    r_min = BAND * r_max
    normal = norm[~abnormal]
    loss = _barrier(normal - r_max) + _barrier(r_min - normal)
    if abnormal.any():
        loss = loss + _barrier((r_max + MARGIN) - norm[abnormal])
    return loss


def angle_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) bool from (B, H, W) pixel masks: a cell is abnormal when more than 32/196 of it is."""
    # float64: a float32 mean of exactly 32 of 196 pixels can round above 32/196 ("more than 32" is strict)
    fraction = F.adaptive_avg_pool2d(mask[:, None].double(), size)[:, 0]
    return fraction > ANGLE_CELL_FRACTION


def norm_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) bool: the pixel mask nearest-resized to the feature grid."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


def flat(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B h w, C), the rows in the order of ``labels.flatten()``."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def level_loss(e1: torch.Tensor, e2: torch.Tensor, mask: torch.Tensor, center: torch.Tensor | None):
    """angle(e1, e2) + norm(e1) + norm(e2) of one level of (B, C, h, w) projected residuals."""
    size = tuple(e1.shape[-2:])
    m_angle, m_norm = angle_labels(mask, size).flatten(), norm_labels(mask, size).flatten()
    return (angle_loss(flat(e1), flat(e2), m_angle, center) + norm_loss(flat(e1), m_norm)
            + norm_loss(flat(e2), m_norm))


def total_loss(views1: dict, views2: dict, mask: torch.Tensor, centers: dict | None = None):
    """Sum of ``level_loss`` over levels; None when the batch has no anomaly (ADPretrain skips it)."""
    if not mask.any():
        return None
    return sum(level_loss(views1[name], views2[name], mask, None if centers is None else centers.get(name))
               for name in views1)
