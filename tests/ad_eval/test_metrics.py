"""Tests of ad_eval.metrics: image/pixel AUROC and the official MVTec AUPRO.

AUROCs are checked against a brute-force pair count and, when installed, sklearn. AUPRO is checked
on hand-computed curves and against a slow reference written here from the original definition
(loop over thresholds, per-region overlap, FPR over normal pixels, own flood-fill regions), on
random masks with many blobs and quantised maps full of ties.

Run: pytest -q tests/ad_eval/test_metrics.py
"""

from __future__ import annotations

import numpy as np
import pytest

from ad_eval.metrics import aupro, compute_all, image_auroc, pixel_auroc

# ---------------------------------------------------------------- references


def pairwise_auroc(scores, positive):
    """P(pos > neg) + P(pos == neg) / 2 over all (pos, neg) pairs."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)


def flood_fill_regions(mask, connectivity=8):
    """Connected components of a 2-D bool mask, as lists of (row, col), without scipy."""
    h, w = mask.shape
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    seen, regions = np.zeros_like(mask, dtype=bool), []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start], stack, region = True, [start], []
        while stack:
            r, c = stack.pop()
            region.append((r, c))
            for dr, dc in steps:
                q = (r + dr, c + dc)
                if 0 <= q[0] < h and 0 <= q[1] < w and mask[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        regions.append(region)
    return regions


def slow_aupro(maps, masks, fpr_limit=0.3, connectivity=8):
    """The original definition, one threshold at a time: PRO(t) = mean over regions of
    |region & {map >= t}| / |region|, FPR(t) = |normal & {map >= t}| / |normal|."""
    masks = masks > 0
    regions = []  # (image index, rows, cols) for every region of every image
    for i, mask in enumerate(masks):
        for region in flood_fill_regions(mask, connectivity):
            rows, cols = zip(*region, strict=True)
            regions.append((i, np.array(rows), np.array(cols)))
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= t
        pro = np.mean([above[i, rows, cols].mean() for i, rows, cols in regions])
        points.append(((above & normal).sum() / normal.sum(), pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the segment at the limit, PRO interpolated linearly
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_case(seed, n=3, h=9, w=11, levels=6):
    """Masks with several blobs (diagonal contacts included), an all-normal image, tied scores."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) < 0.15  # scattered pixels: many diagonal-only contacts
    for _ in range(3):  # plus a few rectangles
        i, r, c = rng.integers(n - 1), rng.integers(h - 2), rng.integers(w - 2)
        masks[i, r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
    masks[-1] = False
    # Quantised noise plus a signal on the masks: ties within and across the two classes.
    maps = np.round(rng.random((n, h, w)) * levels + 2 * masks * rng.random()) / levels
    return maps, masks.astype(np.uint8) * 255


# ---------------------------------------------------------------- image and pixel AUROC


def test_image_auroc_known_value():
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_pair_count_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.3
    labels[:2] = [True, False]
    scores = rng.integers(0, 6, 60) + 2 * labels * rng.random()  # integer levels: many ties
    got = image_auroc(scores, labels)
    assert got == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
    assert image_auroc(scores.astype(np.float32), labels.astype(int)) == pytest.approx(
        got, abs=1e-12
    )
    metrics = pytest.importorskip("sklearn.metrics")
    assert got == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_extremes_and_all_tied():
    assert image_auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert image_auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert image_auroc([5, 5, 5], [True, False, True]) == 0.5


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([0.1, 0.2], [1, 1], "one class only"),
        ([0.1, 0.2], [0, 0], "one class only"),
        ([0.1, 0.2, 0.3], [0, 1], "shape"),
        ([[0.1, 0.2]], [[0, 1]], "shape"),
        ([0.1, np.nan], [0, 1], "non-finite"),
        ([0.1, np.inf], [0, 1], "non-finite"),
        ([0.1, 0.2], [0, 2], "0/1"),
    ],
)
def test_image_auroc_errors(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        image_auroc(scores, labels)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_pair_count_and_sklearn(seed):
    maps, masks = random_case(seed)
    got = pixel_auroc(maps, masks)
    assert got == pytest.approx(pairwise_auroc(maps.ravel(), masks.ravel() > 0), abs=1e-12)
    assert pixel_auroc(maps, masks > 0) == got  # masks are binarised as > 0
    metrics = pytest.importorskip("sklearn.metrics")
    assert got == pytest.approx(metrics.roc_auc_score(masks.ravel() > 0, maps.ravel()), abs=1e-12)


def test_pixel_auroc_float32_maps_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    masks = rng.random((20, 64, 64)) < 0.05
    maps = (rng.random(masks.shape) + masks * 0.3).astype(np.float32)
    expected = metrics.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "maps, masks, match",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "does not match"),
        (np.zeros((4, 4)), np.zeros((4, 4)), r"must be \(N, H, W\)"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), "no anomalous pixel"),
        (np.zeros((2, 4, 4)), np.ones((2, 4, 4)), "no normal pixel"),
        (np.full((2, 4, 4), np.nan), np.eye(4)[None].repeat(2, 0), "non-finite"),
    ],
)
def test_pixel_metric_errors(maps, masks, match):
    for metric in (pixel_auroc, aupro):
        with pytest.raises(ValueError, match=match):
            metric(maps, masks)


# ---------------------------------------------------------------- AUPRO


def two_region_case():
    """Region R1 (2 px, scores 3 and 1) in image A, R2 (1 px, score 2) in image B; 13 normal
    pixels, two of them at score 2. PRO curve by hand: (0, 0), (0, 1/4), (2/13, 3/4),
    (2/13, 1), (1, 1)."""
    masks = np.zeros((2, 2, 4), dtype=bool)
    maps = np.zeros((2, 2, 4))
    masks[0, 0, :2], maps[0, 0, :3] = True, [3, 1, 2]
    masks[1, 1, 3], maps[1, 1, 2:] = True, [2, 2]
    return maps, masks


@pytest.mark.parametrize(
    "fpr_limit, expected",
    [
        (0.3, (0.3 - 1 / 13) / 0.3),  # diagonal 1/4 -> 3/4 over [0, 2/13], then PRO 1
        (0.1, (0.25 + (0.25 + 0.5 * 0.1 * 13 / 2)) / 2),  # cut inside the diagonal segment
        (2 / 13, (0.25 + 0.75) / 2),  # limit on a curve point
        (1.0, 12 / 13),
    ],
)
def test_aupro_hand_computed(fpr_limit, expected):
    maps, masks = two_region_case()
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-12)
    assert slow_aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference(seed, fpr_limit):
    maps, masks = random_case(seed)
    got = aupro(maps, masks, fpr_limit)
    assert got == pytest.approx(slow_aupro(maps, masks, fpr_limit), abs=1e-9)
    assert 0.0 <= got <= 1.0


def test_aupro_matches_slow_reference_on_continuous_float32_maps():
    rng = np.random.default_rng(3)
    _, masks = random_case(3)
    maps = (rng.random(masks.shape) + 0.4 * (masks > 0)).astype(np.float32)
    assert aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks), abs=1e-9)


def test_aupro_perfect_inverted_and_constant_maps():
    _, masks = random_case(0)
    binary = (masks > 0).astype(np.float64)
    assert aupro(binary, masks) == 1.0
    assert aupro(binary, masks, fpr_limit=1.0) == 1.0
    assert aupro(1.0 - binary, masks) == 0.0  # every normal pixel ranks above every region
    assert aupro(np.zeros(masks.shape), masks) == pytest.approx(0.15)  # PRO = FPR: mean 0.15


def test_aupro_is_invariant_to_monotone_transforms():
    maps, masks = random_case(5)  # multiples of 1/6: distinct values stay distinct
    assert aupro(maps**3 + 7, masks) == pytest.approx(aupro(maps, masks), abs=1e-12)
    assert aupro(np.exp(5 * maps), masks) == pytest.approx(aupro(maps, masks), abs=1e-12)


def test_aupro_regions_are_8_connected():
    """Pixels touching only diagonally form one region: a 3-px region half found (PRO 1/3),
    not a found 1-px region plus a missed 2-px one (PRO 1/2 under 4-connectivity)."""
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    # Curve (0, 0), (0, 1/3), (1, 1): the mean PRO over [0, 0.3] is (1/3 + 1/3 + 0.3 * 2/3) / 2.
    assert aupro(maps, masks) == pytest.approx(13 / 30, abs=1e-12)
    assert slow_aupro(maps, masks, connectivity=8) == pytest.approx(13 / 30, abs=1e-12)
    assert slow_aupro(maps, masks, connectivity=4) == pytest.approx(0.575, abs=1e-12)


def test_aupro_regions_do_not_connect_across_images():
    """The same pixel in two images is two regions (PRO 1/2), not one 3-px region (PRO 1/3)."""
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 1] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 0, 0] = 1.0
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)  # (0,1/2)->(1,1)


def test_aupro_normal_images_only_add_false_positives():
    maps, masks = two_region_case()
    extra_maps = np.concatenate([maps, np.full((1, 2, 4), 5.0)])  # above every region score
    extra_masks = np.concatenate([masks, np.zeros((1, 2, 4), dtype=bool)])
    # FPR now over 21 normal pixels, 8 of them first: curve (0,0), (8/21,0), (8/21,1/4), ...
    assert aupro(extra_maps, extra_masks, fpr_limit=0.3) == 0.0
    expected = slow_aupro(extra_maps, extra_masks, fpr_limit=0.6)
    assert aupro(extra_maps, extra_masks, fpr_limit=0.6) == pytest.approx(expected, abs=1e-12)
    assert expected > 0


@pytest.mark.parametrize("kind", ["random", "saturated", "constant", "all_tied_two_levels"])
def test_aupro_never_above_one(kind):
    """Regression for anomalib <= 2.2 (issue #1651, AUPRO 1.21 with saturated, tied maps)."""
    rng = np.random.default_rng(0)
    _, masks = random_case(1, n=4, h=16, w=16)
    maps = {
        "random": rng.random(masks.shape),
        "saturated": np.minimum(rng.random(masks.shape) * 3 + (masks > 0), 1.0),
        "constant": np.full(masks.shape, 0.7),
        "all_tied_two_levels": (masks > 0) * 1.0 + (rng.random(masks.shape) < 0.4),
    }[kind]
    for limit in (0.01, 0.3, 1.0):
        assert 0.0 <= aupro(maps, masks, limit) <= 1.0


@pytest.mark.parametrize("fpr_limit", [0, -0.1, 1.5, float("nan"), True, "0.3", None])
def test_aupro_rejects_bad_fpr_limit(fpr_limit):
    maps, masks = two_region_case()
    with pytest.raises(ValueError, match=r"fpr_limit=.*must be in \(0, 1\]"):
        aupro(maps, masks, fpr_limit)


# ---------------------------------------------------------------- compute_all


def test_compute_all():
    maps, masks = two_region_case()
    scores, labels = maps.max(axis=(1, 2)), [1, 0]
    assert compute_all(scores, labels, maps, None) == {
        "image_AUROC": 1.0,  # max 3 for image A (anomalous), 2 for image B
        "pixel_AUROC": None,
        "pixel_AUPRO": None,
    }
    got = compute_all(scores, labels, maps, masks, fpr_limit=1.0)
    assert got == {
        "image_AUROC": image_auroc(scores, labels),
        "pixel_AUROC": pixel_auroc(maps, masks),
        "pixel_AUPRO": pytest.approx(12 / 13),
    }
    with pytest.raises(ValueError, match="without anomaly_maps"):
        compute_all(scores, labels, None, masks)
    with pytest.raises(ValueError, match="3 anomaly_maps for 2 image_scores"):
        compute_all(scores, labels, np.zeros((3, 2, 4)), np.ones((3, 2, 4)))


def test_aupro_ramp_example_is_one_sixth():
    # anomalib's analytic case (ad_methods.md 4.5): 7 x 400 scores arange / 2800, one label column, limit 1/3
    scores = (np.arange(2800) / 2800).reshape(1, 400, 7).astype(np.float32)
    masks = np.zeros(scores.shape, dtype=bool)
    masks[..., 3] = True
    assert aupro(scores, masks, fpr_limit=1 / 3) == pytest.approx(1 / 6, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_equals_anomalib_on_random_maps(seed):
    torch = pytest.importorskip("torch")
    anomalib_aupro = pytest.importorskip("anomalib.metrics.aupro")
    rng = np.random.default_rng(seed)
    maps = rng.random((4, 32, 32)).astype(np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 5:12, 5:15] = masks[2, 20:30, 3:9] = masks[3, 1:4, 1:4] = True
    maps[masks] += 0.3  # a better-than-chance detector
    metric = anomalib_aupro._AUPRO(fpr_limit=0.3)
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.int64)))
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(float(metric.compute()), abs=1e-5)
