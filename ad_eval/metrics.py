"""Anomaly-detection metrics in NumPy/SciPy: image AUROC, pixel AUROC and the official MVTec AUPRO.

All three are exact: every distinct score is a threshold and tied scores are handled exactly, so the
values do not depend on the scale of the scores, only on their order.

AUPRO follows the official MVTec AD evaluation code (Bergmann et al., IJCV 2021,
``mvtec_ad_evaluation``: ``pro_curve_util.compute_pro`` and ``generic_util.trapezoid``; notes in
shared/reference/ad_methods.md section 4.1). anomalib <= 2.2 computed it differently and could
exceed 1: its numbers are not comparable.

Usage::

    from ad_eval.metrics import compute_all
    compute_all(image_scores, image_labels, anomaly_maps, masks)  # maps and masks shaped (N, H, W)
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage

# 8-connectivity inside each image and no link between images of an (N, H, W) stack, so one
# ndimage.label call numbers the regions of the whole test set, as the official per-image loop does.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


def _as_scores(name: str, values) -> np.ndarray:
    """Float array of scores; ints and bools go to float64 (exact), float dtypes are kept."""
    values = np.asarray(values)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    return values


def _check_maps(anomaly_maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) maps with matching masks, the masks binarised as mask > 0."""
    maps, masks = np.asarray(anomaly_maps), np.asarray(masks)
    if maps.ndim != 3:
        raise ValueError(f"anomaly_maps has shape {maps.shape}: must be (N, H, W)")
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks shape {masks.shape} does not match anomaly_maps shape {maps.shape}"
        )
    return _as_scores("anomaly_maps", maps), masks > 0


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney AUROC, P(pos > neg) + P(pos == neg) / 2; sorts its (copied) inputs in place."""
    negative.sort()
    positive.sort()  # sorted queries keep searchsorted cache-friendly on large pixel sets
    # Per positive: #neg below + #neg below-or-equal = 2 * wins + ties; integer sums stay exact.
    twice_wins = int(np.searchsorted(negative, positive, "left").sum(dtype=np.int64))
    twice_wins += int(np.searchsorted(negative, positive, "right").sum(dtype=np.int64))
    return twice_wins / (2 * positive.size * negative.size)


def image_auroc(scores, labels) -> float:
    """ROC AUC of image scores against 0/1 labels (1 = anomalous), ties counted as half.

    Args:
        scores: (N,) anomaly scores, higher = more anomalous.
        labels: (N,) 0/1 or bool labels.

    Returns:
        The AUROC in [0, 1].
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"scores shape {scores.shape} and labels shape {labels.shape}: must be equal (N,)"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1 or bool")
    scores, positive = _as_scores("scores", scores), labels.astype(bool)
    if positive.all() or not positive.any():
        raise ValueError(
            f"labels hold one class only ({positive.sum()} of {positive.size} anomalous)"
        )
    return _auroc(scores[positive], scores[~positive])


def pixel_auroc(anomaly_maps, masks) -> float:
    """ROC AUC over all pixels of the test set, ties counted as half.

    Memory: one copy of the scores plus the masks; float32 maps stay float32.

    Args:
        anomaly_maps: (N, H, W) pixel scores.
        masks: (N, H, W) ground truth, anomalous where mask > 0.

    Returns:
        The AUROC in [0, 1].
    """
    maps, anomalous = _check_maps(anomaly_maps, masks)
    if not anomalous.any():
        raise ValueError("masks have no anomalous pixel: pixel AUROC needs both classes")
    if anomalous.all():
        raise ValueError("masks have no normal pixel: pixel AUROC needs both classes")
    return _auroc(maps[anomalous], maps[~anomalous])


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x, y) from x[0] to x_max, as generic_util.trapezoid: x is
    non-decreasing and the segment that crosses x_max is cut there, y interpolated linearly."""
    end = int(np.searchsorted(x, x_max, "right"))  # x[:end] <= x_max < x[end]
    x_cut, y_cut = x[:end], y[:end]
    if x_cut[-1] < x_max:  # then end < len(x), since x[-1] == 1 >= x_max
        x0, y0, x1, y1 = x[end - 1], y[end - 1], x[end], y[end]
        x_cut = np.append(x_cut, x_max)
        y_cut = np.append(y_cut, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(np.sum((x_cut[1:] - x_cut[:-1]) * (y_cut[1:] + y_cut[:-1]) / 2))


def aupro(anomaly_maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to fpr_limit, as the official MVTec AD code.

    Regions are the 8-connected components of every mask, pooled over the test set: PRO(t) is the
    mean over all regions of the fraction of the region with score >= t, FPR(t) the fraction of all
    normal pixels (normal images included) with score >= t. Every distinct score is a threshold.
    The curve, from (0, 0) to (1, 1), is integrated with the trapezoid rule up to fpr_limit (PRO
    interpolated linearly there) and divided by fpr_limit.

    Args:
        anomaly_maps: (N, H, W) pixel scores.
        masks: (N, H, W) ground truth, anomalous where mask > 0.
        fpr_limit: upper FPR limit of the integration, in (0, 1].

    Returns:
        The AUPRO in [0, 1].
    """
    if (
        isinstance(fpr_limit, bool)
        or not isinstance(fpr_limit, numbers.Real)
        or not 0 < fpr_limit <= 1
    ):
        raise ValueError(f"fpr_limit={fpr_limit!r}: must be in (0, 1]")
    maps, anomalous = _check_maps(anomaly_maps, masks)
    labels, num_regions = ndimage.label(anomalous, structure=_STRUCTURE_8)
    if num_regions == 0:
        raise ValueError("masks have no anomalous pixel: AUPRO needs at least one region")
    if anomalous.all():
        raise ValueError("masks have no normal pixel: the FPR of AUPRO is undefined")

    # Each pixel of region k adds 1 / |k| to the PRO sum, so every region weighs the same.
    region = labels[anomalous]
    del labels
    weight = 1.0 / np.bincount(region)[region]

    # Anomalous pixels by descending score; PRO at each distinct score t, keeping only the last
    # point of a run of equal scores (the official tie merge: a threshold takes all pixels >= t).
    scores = maps[anomalous]
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    pro = np.cumsum(weight[order])
    # Official: divide by num_regions and clip to <= 1. The total is num_regions up to rounding;
    # dividing by it makes the curve end at exactly 1 (a perfect map scores exactly 1.0).
    pro /= pro[-1]
    last = np.append(scores[1:] != scores[:-1], True)
    thresholds, pro = scores[last], pro[last]

    # The official code sorts all pixels together. Between two consecutive anomalous thresholds
    # only normal pixels enter, which moves FPR at constant PRO: those curve points lie on one
    # horizontal segment, so the curve is fully given by its corners at each threshold t:
    # (FPR(> t), PRO before t) and (FPR(>= t), PRO(t)). Counting them in the sorted normal scores
    # gives the same curve without sorting, or keeping indices of, all pixels.
    normal = maps[~anomalous]
    normal.sort()
    n = normal.size
    fpr_above = (n - np.searchsorted(normal, thresholds, "right")) / n
    fpr_at = (n - np.searchsorted(normal, thresholds, "left")) / n
    pro_before = np.concatenate(([0.0], pro[:-1]))
    # Padded with (0, 0) in front and, after the last horizontal run, with (1, 1) at the end.
    fpr_curve = np.concatenate(([0.0], np.column_stack([fpr_above, fpr_at]).ravel(), [1.0, 1.0]))
    pro_curve = np.concatenate(([0.0], np.column_stack([pro_before, pro]).ravel(), [pro[-1], 1.0]))
    area = _trapezoid(fpr_curve, pro_curve, fpr_limit) / fpr_limit
    return min(area, 1.0)  # clip float overshoot of a perfect curve


def compute_all(
    image_scores, image_labels, anomaly_maps=None, masks=None, fpr_limit: float = 0.3
) -> dict[str, float | None]:
    """Image AUROC and, when masks are given, pixel AUROC and AUPRO (else None, not computed).

    Args:
        image_scores: (N,) image anomaly scores.
        image_labels: (N,) 0/1 labels, 1 = anomalous.
        anomaly_maps: (N, H, W) pixel scores, or None.
        masks: (N, H, W) ground truth (anomalous where > 0), or None to skip the pixel metrics.
        fpr_limit: FPR limit of AUPRO, in (0, 1].

    Returns:
        {"image_AUROC": float, "pixel_AUROC": float | None, "pixel_AUPRO": float | None}
    """
    metrics = {"image_AUROC": image_auroc(image_scores, image_labels)}
    metrics["pixel_AUROC"] = metrics["pixel_AUPRO"] = None
    if masks is not None:
        if anomaly_maps is None:
            raise ValueError("masks given without anomaly_maps")
        if len(anomaly_maps) != len(image_scores):
            raise ValueError(
                f"{len(anomaly_maps)} anomaly_maps for {len(image_scores)} image_scores"
            )
        metrics["pixel_AUROC"] = pixel_auroc(anomaly_maps, masks)
        metrics["pixel_AUPRO"] = aupro(anomaly_maps, masks, fpr_limit)
    return metrics
