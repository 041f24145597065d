"""Tests of IFS sampling and the fill-rate measure (fractal_pretrain.ifs.sample)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fractal_pretrain.ifs import (
    default_alpha_range,
    fill_rate,
    map_probabilities,
    sample_fractaldb_system,
    sample_singular_values,
    sample_svd_system,
    singular_values,
    system_rng,
)
from fractal_pretrain.ifs.sample import _chunk_length, _finite_prefix, _orbit

# Sierpinski triangle: 3 maps A = 0.5 I; its attractor is the triangle (0,0), (1,0), (0.5,1).
SIERPINSKI_B = np.array([[0.0, 0.0], [0.5, 0.0], [0.25, 0.5]])
SIERPINSKI = np.concatenate(
    [np.broadcast_to(0.5 * np.eye(2), (3, 2, 2)), SIERPINSKI_B[:, :, None]], axis=2
)


def _weighted_sum(maps: np.ndarray) -> float:
    """Returns sum_i (s1_i + 2 s2_i) computed independently with np.linalg.svd."""
    sv = np.linalg.svd(maps[:, :, :2], compute_uv=False)
    return float(np.sum(sv[:, 0] + 2.0 * sv[:, 1]))


def test_svd_systems_alpha_in_band_and_contractive() -> None:
    rng = np.random.default_rng(123)
    seen = set()
    for _ in range(200):
        n = int(rng.integers(2, 5))
        seen.add(n)
        maps = sample_svd_system(rng, n)
        assert maps.shape == (n, 2, 3) and maps.dtype == np.float64
        lo, hi = default_alpha_range(n)
        alpha = _weighted_sum(maps)
        assert lo - 1e-9 <= alpha <= hi + 1e-9
        sv = np.linalg.svd(maps[:, :, :2], compute_uv=False)
        assert np.all(sv[:, 0] < 1.0 + 1e-12)
        assert np.all(sv[:, 1] <= sv[:, 0])
        assert np.all(np.abs(maps[:, :, 2]) <= 1.0)
    assert seen == {2, 3, 4}


def test_svd_system_respects_alpha_range_and_bval() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        maps = sample_svd_system(rng, 3, alpha_range=(2.0, 2.2), bval=0.25)
        assert 2.0 - 1e-9 <= _weighted_sum(maps) <= 2.2 + 1e-9
        assert np.all(np.abs(maps[:, :, 2]) <= 0.25)


def test_default_alpha_range() -> None:
    assert default_alpha_range(2) == (3.5, 4.0)
    assert default_alpha_range(4) == (4.5, 5.0)


@pytest.mark.parametrize("num_maps", [1, 2, 3, 4, 7])
def test_sample_singular_values_constraint(num_maps: int) -> None:
    rng = np.random.default_rng(num_maps)
    # Include both ends of the feasible range [0, 3N].
    alphas = np.concatenate([[0.0, 3.0 * num_maps], rng.uniform(0, 3 * num_maps, size=300)])
    for alpha in alphas:
        sv = sample_singular_values(rng, num_maps, float(alpha))
        assert sv.shape == (num_maps, 2)
        assert np.all(sv[:, 0] <= 1.0 + 1e-12)
        assert np.all(sv[:, 1] <= sv[:, 0] + 1e-12)
        assert np.all(sv[:, 1] >= 0.0)
        assert np.sum(sv[:, 0] + 2 * sv[:, 1]) == pytest.approx(alpha, abs=1e-9)


def test_sample_singular_values_rejects_infeasible_alpha() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="alpha"):
        sample_singular_values(rng, 2, 6.5)
    with pytest.raises(ValueError, match="alpha"):
        sample_singular_values(rng, 2, -0.1)


def test_singular_values_match_numpy_and_descend() -> None:
    maps = sample_fractaldb_system(np.random.default_rng(2), 6)
    sv = singular_values(maps)
    expected = np.stack([np.linalg.svd(m[:, :2], compute_uv=False) for m in maps])
    np.testing.assert_allclose(sv, expected)
    assert np.all(sv[:, 0] >= sv[:, 1])


def test_system_rng_is_pure_function_of_seed_and_index() -> None:
    forward = [sample_svd_system(system_rng(7, k), 3) for k in range(6)]
    backward = [sample_svd_system(system_rng(7, k), 3) for k in reversed(range(6))][::-1]
    for a, b in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(a, b)
    # Different index or seed gives a different system.
    assert not np.array_equal(forward[0], forward[1])
    assert not np.array_equal(forward[0], sample_svd_system(system_rng(8, 0), 3))
    # Matches SeedSequence spawning, so banks can also be split with spawn().
    child = np.random.SeedSequence(7).spawn(4)[3]
    assert system_rng(7, 3).random() == np.random.default_rng(child).random()


def test_fractaldb_system_entries_uniform_in_unit_box() -> None:
    maps = sample_fractaldb_system(np.random.default_rng(0), 2000)
    assert maps.shape == (2000, 2, 3)
    assert maps.min() >= -1.0 and maps.max() <= 1.0
    # Mean ~0 and variance ~1/3 for U(-1, 1) over 12k values.
    assert abs(maps.mean()) < 0.03
    assert maps.var() == pytest.approx(1 / 3, rel=0.05)


def test_map_probabilities_proportional_to_abs_det() -> None:
    maps = sample_fractaldb_system(np.random.default_rng(4), 5)
    p = map_probabilities(maps)
    dets = np.abs(np.linalg.det(maps[:, :, :2]))
    assert p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p, dets / dets.sum())


def test_map_probabilities_uniform_when_all_dets_zero() -> None:
    maps = np.zeros((4, 2, 3))
    maps[:, 0, 0] = 1.0  # rank 1: det 0
    np.testing.assert_array_equal(map_probabilities(maps), np.full(4, 0.25))


def _sequential_orbit(maps: np.ndarray, num_points: int, seed: int) -> np.ndarray:
    """Plain Python chaos game with the same map choices as ``_orbit`` (slow reference)."""
    rng = np.random.default_rng(seed)
    length = _chunk_length(num_points)
    chunks = -(-num_points // length)
    choice = rng.choice(len(maps), size=chunks * length, p=map_probabilities(maps))
    x = np.zeros(2)
    out = np.empty((num_points, 2))
    for t in range(num_points):
        k = choice[t]
        x = maps[k, :, :2] @ x + maps[k, :, 2]
        out[t] = x
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_orbit_matches_sequential_chain(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for maps in (sample_svd_system(rng, 3), sample_fractaldb_system(rng, 4)):
        fast = _orbit(maps, map_probabilities(maps), 3001, seed)
        slow = _sequential_orbit(maps, 3001, seed)
        finite = np.isfinite(slow).all(axis=1)
        assert finite[:100].all()
        np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-9)


def _reference_fill(points: np.ndarray, size: int = 256, pad: int = 6) -> float:
    """Independent rasterisation: per-axis rescale to [pad, size-1-pad], count distinct pixels."""
    pixels = []
    for axis in range(2):
        c = points[:, axis]
        pixels.append(np.floor((c - c.min()) / (c.max() - c.min()) * (size - 1 - 2 * pad) + pad))
    return len(set(zip(pixels[0].tolist(), pixels[1].tolist(), strict=True))) / size**2


def test_fill_rate_sierpinski_matches_deterministic_attractor() -> None:
    # All 3^12 level-12 images of the origin lie on the attractor, ~0.06 px apart at 256 px.
    points = np.zeros((1, 2))
    for _ in range(12):
        points = np.concatenate([0.5 * points + b for b in SIERPINSKI_B])
    reference = _reference_fill(points)
    assert 0.14 < reference < 0.16
    fill = fill_rate(SIERPINSKI)
    # 100k random points do not quite saturate the attractor; 1M nearly do.
    assert 0.93 * reference <= fill <= 1.02 * reference
    assert fill_rate(SIERPINSKI, num_points=1_000_000) == pytest.approx(reference, rel=0.03)


def test_fill_rate_is_deterministic_in_seed() -> None:
    maps = sample_svd_system(np.random.default_rng(9), 4)
    assert fill_rate(maps, seed=3) == fill_rate(maps, seed=3)
    assert 0.0 < fill_rate(maps) <= 1.0


def test_fill_rate_degenerate_systems_give_zero() -> None:
    assert fill_rate(np.zeros((3, 2, 3))) == 0.0
    # All points on the line y = 0: zero span along one axis.
    line = np.zeros((2, 2, 3))
    line[:, 0, 0] = 0.5
    line[1, 0, 2] = 0.5
    assert fill_rate(line) == 0.0
    # Expanding maps overflow within a few hundred steps; almost nothing is left after the cut.
    expanding = np.zeros((2, 2, 3))
    expanding[:, :, :2] = 10.0 * np.eye(2)
    expanding[:, :, 2] = [[1.0, 0.5], [-1.0, 0.3]]
    assert fill_rate(expanding) < 0.01


def test_finite_prefix_cuts_100_points_before_first_nonfinite() -> None:
    points = np.arange(1000.0).repeat(2).reshape(-1, 2)
    assert len(_finite_prefix(points)) == 1000
    points[500, 1] = np.inf
    points[700, 0] = np.nan
    kept = _finite_prefix(points)
    assert len(kept) == 400
    points[50, 0] = np.nan
    assert len(_finite_prefix(points)) == 0


def test_fill_rate_is_fast() -> None:
    maps = sample_svd_system(np.random.default_rng(1), 4)
    fill_rate(maps)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        fill_rate(maps)
        timings.append(time.perf_counter() - start)
    # ~10 ms vectorised; a Python loop over 100k steps takes well over 0.2 s.
    assert min(timings) < 0.2


def test_fill_rate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shape"):
        fill_rate(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="pad"):
        fill_rate(SIERPINSKI, size=12, pad=6)
