"""ADPretrain's losses against a direct, loop-by-loop transcription of ad_methods.md §3.4; residuals; projector."""

import math

import pytest
import torch
import torch.nn.functional as F

from fractal_pretrain.adapt.losses import angle_loss, compressed_norm, norm_loss, total_loss
from fractal_pretrain.adapt.projector import Projector, ProjectorConfig
from fractal_pretrain.adapt.residual import residual_features


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def angle_by_hand(e1, e2, m, c, t=0.15):
    e1, e2 = (e1 - c).tolist(), (e2 - c).tolist()
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=False))  # noqa: E731
    feats = [unit(v) for v in e1 + e2]
    labels = list(m) + list(m)
    n = len(e1)
    total = 0.0
    for i, z in enumerate(feats):
        other = feats[(i + n) % (2 * n)]
        negatives = [a for a, label in zip(feats, labels, strict=False) if label != labels[i]]
        total += -math.log(math.exp(dot(z, other) / t) / sum(math.exp(dot(z, a) / t) for a in negatives))
    return total / (2 * n)


def norm_by_hand(e, m):
    norms = [math.sqrt(math.sqrt(sum(x * x for x in v)) + 1) - 1 for v in e.tolist()]
    abnormal = [a for a, label in zip(norms, m, strict=False) if label]
    normal = [a for a, label in zip(norms, m, strict=False) if not label]
    r_max = min(0.9 * min(abnormal), 0.4) if abnormal else 0.4
    r_min = 0.99 * r_max if abnormal else 0.396
    def mean_barrier(distances):  # each penalty: the mean over the features that violate it
        bad = [d for d in distances if d > 0]
        return sum(math.exp(d) * softplus(d) for d in bad) / len(bad) if bad else 0.0

    loss = mean_barrier([a - r_max for a in normal]) + mean_barrier([r_min - a for a in normal])
    if abnormal:
        loss += mean_barrier([r_max + 0.75 - a for a in abnormal])
    return loss


@pytest.fixture
def features():
    g = torch.Generator().manual_seed(0)
    e1 = torch.randn(6, 4, generator=g, dtype=torch.float64) * 0.3
    e2 = e1 + 0.05 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    e1[4:] *= 8  # two far abnormal features
    e2[4:] *= 8
    return e1, e2, torch.tensor([0, 0, 0, 0, 1, 1])


def test_angle_loss_matches_the_transcription(features):
    e1, e2, m = features
    c = torch.tensor([0.1, -0.2, 0.0, 0.05], dtype=torch.float64)
    assert angle_loss(e1, e2, m, c).item() == pytest.approx(angle_by_hand(e1, e2, m, c), rel=1e-5)


def test_angle_loss_sign_pulls_normal_and_abnormal_apart(features):
    e1, e2, m = features
    aligned = torch.ones(6, 4, dtype=torch.float64)
    apart = aligned.clone()
    apart[4:] = -1
    assert angle_loss(apart, apart, m).item() < angle_loss(aligned, aligned, m).item()
    assert angle_loss(apart, apart, m).item() < 0  # the positive is not in the denominator


def test_norm_loss_matches_the_transcription(features):
    e1, _, m = features
    assert norm_loss(e1, m).item() == pytest.approx(norm_by_hand(e1, m.tolist()), rel=1e-6)
    normal_only = torch.zeros(6, dtype=torch.long)
    assert norm_loss(e1, normal_only).item() == pytest.approx(norm_by_hand(e1, [0] * 6), rel=1e-6)


def test_norm_loss_is_zero_inside_the_radius_band():
    # A = 0.398 is in [0.396, 0.4] (no anomaly): no penalty; outside the band there is one.
    norm = (0.398 + 1) ** 2 - 1
    e = torch.tensor([[norm, 0.0], [0.0, norm]], dtype=torch.float64)
    assert compressed_norm(e)[0].item() == pytest.approx(0.398)
    assert norm_loss(e, torch.zeros(2)).item() == 0.0
    assert norm_loss(e * 2, torch.zeros(2)).item() > 0
    assert norm_loss(e * 0.5, torch.zeros(2)).item() > 0


def test_norm_loss_has_no_gradient_through_the_radius():
    e = torch.tensor([[0.5, 0.0], [3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    norm_loss(e, torch.tensor([0, 1])).backward()
    # the normal feature (A = 0.22 < r_min) is pulled outwards; the abnormal one (A = 1 < 0.4 + 0.75) pushed
    # outwards too: no gradient flows into it through r_max = min(0.9 * 1, 0.4) = 0.4
    assert e.grad[0, 0] < 0 and e.grad[1, 0] < 0


def test_abnormal_far_beyond_the_boundary_costs_nothing():
    far = torch.tensor([[0.0, 100.0]], dtype=torch.float64)  # A = sqrt(101) - 1 > 0.4 + 0.75
    shell = torch.tensor([[((0.4 * 0.99 + 0.4) / 2 + 1) ** 2 - 1, 0.0]], dtype=torch.float64)
    e = torch.cat([shell, far])
    # r_max = min(0.9 * 9.05, 0.4) = 0.4, so the normal one (A = 0.398) and the far abnormal one cost 0
    assert norm_loss(e, torch.tensor([0, 1])).item() == pytest.approx(0.0, abs=1e-12)


def test_batch_without_anomaly_is_skipped():
    views = {"layer2": torch.randn(2, 8, 4, 4)}
    assert total_loss(views, views, torch.zeros(2, 32, 32, dtype=torch.bool)) is None
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[0, :16, :16] = True
    assert torch.isfinite(total_loss(views, views, mask))


def test_residual_against_a_reference_identical_to_the_image_is_zero():
    f = torch.randn(3, 16, 5, 5)
    assert torch.equal(residual_features(f, f.unsqueeze(1)), torch.zeros_like(f))


def test_residual_is_feature_minus_cosine_nearest_reference():
    f = torch.randn(2, 8, 3, 3)
    refs = torch.randn(4, 8, 2, 2)  # shared by both images
    bank = refs.permute(0, 2, 3, 1).reshape(-1, 8)
    r = residual_features(f, refs)
    for b in range(2):
        for y in range(3):
            for x in range(3):
                q = f[b, :, y, x]
                p = bank[F.cosine_similarity(bank, q[None], dim=1).argmax()]
                assert torch.allclose(r[b, :, y, x], q - p)


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_projector_keeps_shapes(kind):
    proj = Projector({"layer2": 32, "layer3": 64}, ProjectorConfig(kind=kind, bank_size=8, heads=4))
    out = proj({"layer2": torch.randn(2, 32, 8, 8), "layer3": torch.randn(2, 64, 4, 4)})
    assert out["layer2"].shape == (2, 32, 8, 8) and out["layer3"].shape == (2, 64, 4, 4)
    assert proj.bank_bytes() == (0 if kind == "mlp" else (32 + 64) * 8 * 4)


def labels_by_hand(mask, grid):
    """§3.4's patch labels of a (B, H, W) mask on a grid of 14 x 14-pixel cells: angle, more than 32 of the
    196 pixels abnormal; norm, the mask nearest-resized (a cell takes its top-left pixel)."""
    angle, norm = [], []
    for b in range(mask.shape[0]):
        for y in range(grid):
            for x in range(grid):
                angle.append(int(mask[b, 14 * y:14 * y + 14, 14 * x:14 * x + 14].sum()) > 32)
                norm.append(bool(mask[b, 14 * y, 14 * x]))
    return angle, norm


def test_total_is_angle_plus_both_norms_summed_over_levels_with_their_patch_labels():
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 56, 56, dtype=torch.bool)  # a 4 x 4 grid of 14-pixel cells
    mask[0, 0:3, 0:11] = True  # cell (0, 0): 33 pixels, top-left set -> abnormal for both losses
    mask[0, 14:18, 14:22] = True  # cell (1, 1): exactly 32 pixels -> angle normal, norm (top-left set) abnormal
    mask[1, 30:35, 45:53] = True  # cell (2, 3): 40 pixels, top-left clear -> angle abnormal, norm normal
    m_angle, m_norm = labels_by_hand(mask, 4)
    assert sum(m_angle) == 2 and sum(m_norm) == 2 and m_angle != m_norm
    views1 = {"a": torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64),
              "b": 3 * torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64)}
    views2 = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in views1.items()}
    centers = {"a": torch.full((4,), 0.1, dtype=torch.float64), "b": torch.zeros(6, dtype=torch.float64)}
    expected = 0.0
    for name in views1:
        e1, e2 = (v[name].permute(0, 2, 3, 1).reshape(-1, v[name].shape[1]) for v in (views1, views2))
        expected += angle_by_hand(e1, e2, m_angle, centers[name]) + norm_by_hand(e1, m_norm) + norm_by_hand(e2, m_norm)
    assert total_loss(views1, views2, mask, centers).item() == pytest.approx(expected, rel=1e-6)


def test_angle_term_without_an_abnormal_cell_is_zero_and_keeps_gradients_finite():
    # A defect too small for any angle-loss cell (5 pixels): the angle loss has no negatives (its log is
    # infinite) and counts 0, as in ADPretrain; the norm loss still sees the defect's top-left cell.
    mask = torch.zeros(1, 28, 28, dtype=torch.bool)
    mask[0, 14, 14:19] = True
    e1 = torch.randn(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    e2 = (e1 * 1.1).detach()
    loss = total_loss({"a": e1}, {"a": e2}, mask)
    m_norm = [False, False, False, True]
    flat = lambda e: e.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    assert loss.item() == pytest.approx(norm_by_hand(flat(e1.detach()), m_norm) + norm_by_hand(flat(e2), m_norm))
    loss.backward()
    assert torch.isfinite(e1.grad).all() and e1.grad.abs().sum() > 0
