"""Sampling of 2-D iterated function systems (IFS) and FractalDB's fill-rate measure.

An IFS with N maps is stored as a float64 array of shape (N, 2, 3): row-stacked [A_i | b_i], so that
map i sends v to A_i @ v + b_i.

Two samplers are provided:

* ``sample_svd_system``: Anderson & Farrell, "Improving Fractal Pre-training" (WACV'22),
  ``catalys1/fractal-pretraining`` ``ifs.sample_system``. Each A_i is built from its SVD; the
  singular values obey sum_i (sigma1_i + 2 * sigma2_i) = alpha with 1 >= sigma1_i >= sigma2_i >= 0,
  so every map is contractive and alpha controls how "filled" the attractor looks.
* ``sample_fractaldb_system``: Kataoka et al., FractalDB (``param_search/ifs_search.py``): every
  entry of [A | b] is U(-1, 1) with no constraint; systems are kept only if their ``fill_rate``
  reaches a threshold (see ``fractal_pretrain.ifs.bank``).

Randomness: every function takes an explicit ``np.random.Generator``; ``system_rng(seed, k)`` gives
the generator for system k of a bank, so system k never depends on the systems drawn before it.

See /work/shared/reference/fractal_anchors.md sections 1.1, 2.1 and 2.2 for the reference code.
Tests: ``python3 -m pytest -q tests/fractal_pretrain/test_ifs_sample.py``.
"""

from __future__ import annotations

import math

import numpy as np

MAX_MAPS = 8
"""Largest number of maps per system; bank arrays are zero-padded to this many maps."""

# FractalDB cuts the orbit this many points before its first non-finite point (``__rescale``).
_NONFINITE_MARGIN = 100


def system_rng(seed: int, index: int) -> np.random.Generator:
    """Returns the random generator for system ``index`` of the bank with base ``seed``.

    The generator is a pure function of (seed, index): it is the ``index``-th child of
    ``SeedSequence(seed)`` (same as ``SeedSequence(seed).spawn(index + 1)[index]``), so banks can be
    built in any order, in parallel or partially, and system k is always the same.

    Args:
        seed: Base seed of the bank, a non-negative integer.
        index: System index k, a non-negative integer.

    Returns:
        A fresh PCG64 ``np.random.Generator``.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    sequence = np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),))
    return np.random.Generator(np.random.PCG64(sequence))


def default_alpha_range(num_maps: int) -> tuple[float, float]:
    """Returns Anderson's default band for the sigma-factor alpha: ((5 + N) / 2, (6 + N) / 2).

    Args:
        num_maps: Number of maps N.

    Returns:
        (low, high) bounds of alpha.
    """
    return ((5 + num_maps) / 2, (6 + num_maps) / 2)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Draws U(low, high), tolerating low > high by float rounding (the bounds then coincide)."""
    # The sampler's bounds are equal in exact arithmetic at the edges of the feasible set; rounding
    # can swap them by ~1e-16, and clamping keeps the constraints exact instead of off by that much.
    high = max(low, high)
    return float(rng.uniform(low, high))


def sample_singular_values(rng: np.random.Generator, num_maps: int, alpha: float) -> np.ndarray:
    """Draws singular values with sum_i (sigma1_i + 2 sigma2_i) = alpha (Anderson's ``sample_svs``).

    Sequential sampler: ``p`` is the weighted sum still to spend and ``q`` the least that the
    current pair must absorb so that the remaining pairs (at most 3 each) can still reach alpha.
    Each pair but the last draws sigma1 then sigma2 uniformly within those bounds; the last pair
    takes whatever is left, with bounds that keep sigma1 <= 1 and sigma2 <= sigma1.

    Args:
        rng: Random generator.
        num_maps: Number of maps N (>= 1).
        alpha: Target weighted sum, in [0, 3 N].

    Returns:
        (N, 2) float64 array of (sigma1, sigma2) with 1 >= sigma1 >= sigma2 >= 0.
    """
    if num_maps < 1:
        raise ValueError(f"num_maps must be >= 1, got {num_maps}")
    if not 0.0 <= alpha <= 3.0 * num_maps:
        raise ValueError(f"alpha must be in [0, {3 * num_maps}] for {num_maps} maps, got {alpha}")
    values = np.empty((num_maps, 2), dtype=np.float64)
    p = float(alpha)
    q = float(alpha) - 3.0 * num_maps + 3.0
    for i in range(num_maps - 1):
        s1 = _uniform(rng, max(0.0, q / 3.0), min(1.0, p))
        p -= s1
        q -= s1
        s2 = _uniform(rng, max(0.0, q / 2.0), min(s1, p / 2.0))
        p -= 2.0 * s2
        q = q - 2.0 * s2 + 3.0
        values[i] = (s1, s2)
    # max(0, p) guards against a remainder of -1e-16 after rounding.
    p = max(0.0, p)
    s2 = _uniform(rng, max(0.0, (p - 1.0) / 2.0), p / 3.0)
    values[-1] = (p - 2.0 * s2, s2)
    return values


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Returns rotation matrices R(angle), shape (N, 2, 2), for angles of shape (N,)."""
    cos, sin = np.cos(angles), np.sin(angles)
    return np.stack([np.stack([cos, -sin], axis=-1), np.stack([sin, cos], axis=-1)], axis=-2)


def _random_sign_diagonals(rng: np.random.Generator, num_maps: int) -> np.ndarray:
    """Returns N random diagonal matrices diag(+-1, +-1), shape (N, 2, 2)."""
    signs = rng.choice(np.array([-1.0, 1.0]), size=(num_maps, 2))
    return signs[:, :, None] * np.eye(2)


def sample_svd_system(
    rng: np.random.Generator,
    num_maps: int,
    alpha_range: tuple[float, float] | None = None,
    bval: float = 1.0,
) -> np.ndarray:
    """Samples a contractive IFS from its SVD (Anderson & Farrell ``sample_system``, constrained).

    A_i = U_i diag(sigma1_i, sigma2_i) V_i with U_i = R(theta_i) D_i and V_i = R(phi_i) D'_i
    (angles U(-pi, pi), D random sign diagonals), singular values from ``sample_singular_values``
    with alpha ~ U(alpha_range), and b_i ~ U(-bval, bval)^2.

    Args:
        rng: Random generator.
        num_maps: Number of maps N (>= 1).
        alpha_range: (low, high) band of alpha; ``default_alpha_range(N)`` when None.
        bval: Half-width of the translation range.

    Returns:
        (N, 2, 3) float64 system [A | b].
    """
    if alpha_range is None:
        alpha_range = default_alpha_range(num_maps)
    alpha = _uniform(rng, float(alpha_range[0]), float(alpha_range[1]))
    sigma = sample_singular_values(rng, num_maps, alpha)
    theta, phi = rng.uniform(-math.pi, math.pi, size=(2, num_maps))
    left = _rotation(theta) @ _random_sign_diagonals(rng, num_maps)
    right = _rotation(phi) @ _random_sign_diagonals(rng, num_maps)
    # left @ diag(sigma) is a column scaling of left.
    linear = (left * sigma[:, None, :]) @ right
    translation = rng.uniform(-bval, bval, size=(num_maps, 2))
    return np.concatenate([linear, translation[:, :, None]], axis=2)


def sample_fractaldb_system(rng: np.random.Generator, num_maps: int) -> np.ndarray:
    """Samples an unconstrained IFS as FractalDB's category search does: every entry U(-1, 1).

    Args:
        rng: Random generator.
        num_maps: Number of maps N (>= 1).

    Returns:
        (N, 2, 3) float64 system [A | b]; the maps need not be contractive.
    """
    if num_maps < 1:
        raise ValueError(f"num_maps must be >= 1, got {num_maps}")
    return rng.uniform(-1.0, 1.0, size=(num_maps, 2, 3))


def _check_system(maps: np.ndarray) -> np.ndarray:
    """Returns ``maps`` as float64 after checking its (N, 2, 3) shape with N >= 1."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[1:] != (2, 3) or maps.shape[0] < 1:
        raise ValueError(f"an IFS must have shape (N, 2, 3) with N >= 1, got {maps.shape}")
    return maps


def map_probabilities(maps: np.ndarray) -> np.ndarray:
    """Returns the map probabilities p_i proportional to |det A_i| (uniform if all dets are 0).

    Args:
        maps: (N, 2, 3) system.

    Returns:
        (N,) float64 probabilities summing to 1.
    """
    maps = _check_system(maps)
    dets = np.abs(maps[:, 0, 0] * maps[:, 1, 1] - maps[:, 0, 1] * maps[:, 1, 0])
    total = dets.sum()
    if not np.isfinite(total) or total <= 0.0:
        return np.full(len(maps), 1.0 / len(maps))
    return dets / total


def singular_values(maps: np.ndarray) -> np.ndarray:
    """Returns the singular values of every linear part A_i, in descending order.

    Args:
        maps: (N, 2, 3) system.

    Returns:
        (N, 2) float64 array (sigma1, sigma2) with sigma1 >= sigma2 >= 0.
    """
    maps = _check_system(maps)
    return np.linalg.svd(maps[:, :, :2], compute_uv=False)


def _chunk_length(num_points: int) -> int:
    """Returns the chunk length L used by ``_orbit``.

    The cost is about 26 vectorised operations per step of a chunk (two passes over L steps) plus
    one Python-level affine step per chunk, so L ~ sqrt(num_points / 13) balances the two.
    """
    return max(1, int(math.sqrt(num_points / 13.0)))


def _orbit(maps: np.ndarray, probabilities: np.ndarray, num_points: int, seed: int) -> np.ndarray:
    """Runs one chaos-game chain from the origin and returns its points, vectorised over chunks.

    The chain x_t = A_{k_t} x_{t-1} + b_{k_t} (x_0 = origin, k_t drawn up front) is the sequential
    FractalDB orbit, but a 100k-step Python loop is too slow. It is split into M chunks of L steps:
    pass 1 composes each chunk's L maps into one affine map (vectorised over chunks); a short
    Python loop over the M chunks then chains these compositions to get each chunk's start point;
    pass 2 replays the recurrence inside all chunks at once from those starts. Chunk 0 starts at
    the exact origin, and pass 2 is the exact recurrence, so the points agree with the sequential
    loop up to rounding in the chunk starts.

    Args:
        maps: (N, 2, 3) system.
        probabilities: (N,) map probabilities.
        num_points: Number of points T (the origin itself is not recorded).
        seed: Seed of the map choices.

    Returns:
        (T, 2) float64 points; non-finite once the orbit overflows.
    """
    rng = np.random.default_rng(seed)
    length = _chunk_length(num_points)
    chunks = -(-num_points // length)
    choice = rng.choice(len(maps), size=chunks * length, p=probabilities)
    # Time-major (L, M) so that step t of every chunk is one contiguous row.
    choice = np.ascontiguousarray(choice.reshape(chunks, length).T)
    a00, a01, b0 = (maps[:, 0, j][choice] for j in range(3))
    a10, a11, b1 = (maps[:, 1, j][choice] for j in range(3))

    with np.errstate(over="ignore", invalid="ignore"):
        # Pass 1: per chunk, the composition P x + c of its L maps.
        p00, p01 = np.ones(chunks), np.zeros(chunks)
        p10, p11 = np.zeros(chunks), np.ones(chunks)
        c0, c1 = np.zeros(chunks), np.zeros(chunks)
        for t in range(length):
            p00, p01, p10, p11 = (
                a00[t] * p00 + a01[t] * p10,
                a00[t] * p01 + a01[t] * p11,
                a10[t] * p00 + a11[t] * p10,
                a10[t] * p01 + a11[t] * p11,
            )
            c0, c1 = a00[t] * c0 + a01[t] * c1 + b0[t], a10[t] * c0 + a11[t] * c1 + b1[t]

        # Chunk start points, sequentially; Python floats overflow to inf without raising.
        start0, start1 = np.zeros(chunks), np.zeros(chunks)
        x0 = x1 = 0.0
        comps = zip(*(v.tolist() for v in (p00, p01, p10, p11, c0, c1)), strict=True)
        for j, (q00, q01, q10, q11, d0, d1) in enumerate(comps):
            start0[j], start1[j] = x0, x1
            x0, x1 = q00 * x0 + q01 * x1 + d0, q10 * x0 + q11 * x1 + d1

        # Pass 2: the recurrence inside every chunk at once.
        points = np.empty((length, 2, chunks))
        x0, x1 = start0, start1
        for t in range(length):
            x0, x1 = a00[t] * x0 + a01[t] * x1 + b0[t], a10[t] * x0 + a11[t] * x1 + b1[t]
            points[t, 0], points[t, 1] = x0, x1
    # (L, 2, M) -> (M, L, 2) -> time order.
    return points.transpose(2, 0, 1).reshape(-1, 2)[:num_points]


def _finite_prefix(points: np.ndarray) -> np.ndarray:
    """Cuts an orbit like FractalDB's ``__rescale``: from 100 points before the first bad one on.

    Args:
        points: (T, 2) orbit.

    Returns:
        The leading rows of ``points``, all finite.
    """
    bad = np.flatnonzero(~np.isfinite(points).all(axis=1))
    if bad.size == 0:
        return points
    return points[: max(0, int(bad[0]) - _NONFINITE_MARGIN)]


def _pixel_indices(coords: np.ndarray, size: int, pad: int) -> np.ndarray | None:
    """Rescales one axis to integer pixels in [pad, size - 1 - pad]; None for a degenerate span."""
    low, high = coords.min(), coords.max()
    with np.errstate(over="ignore", invalid="ignore"):  # escaping orbits: span may overflow to inf
        span = high - low
    if not np.isfinite(span) or span <= 0.0:
        return None
    scaled = (coords - low) * ((size - 1 - 2 * pad) / span) + pad
    # Truncation equals floor here (values >= pad >= 0); the clip only absorbs rounding at the top.
    return np.clip(scaled.astype(np.int64), pad, size - 1 - pad)


def fill_rate(
    maps: np.ndarray,
    *,
    size: int = 256,
    num_points: int = 100_000,
    pad: int = 6,
    seed: int = 0,
) -> float:
    """Returns FractalDB's category-search fill rate: the share of pixels a system's orbit hits.

    One chaos-game chain from the origin (no burn-in; map i chosen with probability
    ``map_probabilities``), cut before its first non-finite point as FractalDB does, each axis
    rescaled independently to [pad, size - 1 - pad] (aspect ratio not kept), drawn as a binary
    size x size image. The chain is computed in vectorised chunks (see ``_orbit``), about 10 ms
    for 100k points.

    Args:
        maps: (N, 2, 3) system.
        size: Image side in pixels.
        num_points: Orbit length (points drawn, origin excluded).
        pad: Margin in pixels on every side.
        seed: Seed of the map choices, so the result is a pure function of the arguments.

    Returns:
        Nonzero pixels / size^2, in [0, 1]; 0.0 for a degenerate orbit (no finite point, or zero
        or non-finite span along an axis).
    """
    maps = _check_system(maps)
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if pad < 0 or size - 1 - 2 * pad < 1:
        raise ValueError(f"need pad >= 0 and size - 1 - 2 * pad >= 1, got size={size}, pad={pad}")
    points = _finite_prefix(_orbit(maps, map_probabilities(maps), num_points, seed))
    if len(points) == 0:
        return 0.0
    rows = _pixel_indices(points[:, 0], size, pad)
    cols = _pixel_indices(points[:, 1], size, pad)
    if rows is None or cols is None:
        return 0.0
    image = np.zeros(size * size, dtype=bool)
    image[rows * size + cols] = True
    return float(np.count_nonzero(image)) / float(size * size)
