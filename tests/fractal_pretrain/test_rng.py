"""Tests of the counter-based generator (fractal_pretrain.rng).

Covers: Philox4x32-10 known-answer vectors from Random123 (kat_vectors), broadcasting, the
(seed, epoch) key and (index_lo, index_hi, tag, draw) counter layout of ``draw_words`` (every key
component changes the words, indices >= 2**32 use the high word), ``to_uniform`` (exact float32
values in [0, 1), mean ~0.5), ``to_range`` and ``to_int`` (range and a chi-square uniformity bound).
"""

from __future__ import annotations

import numpy as np
import pytest

from fractal_pretrain import rng

# Random123 kat_vectors for philox4x32_10: (counter, key, expected output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    out = rng.philox4x32(counter, key)
    assert [int(w) for w in out] == list(expected)
    assert all(w.dtype == np.uint32 for w in out)


def test_philox_broadcasts_elementwise():
    counters = np.array([c for c, _, _ in KNOWN_ANSWERS], dtype=np.uint32)  # (3, 4)
    keys = np.array([k for _, k, _ in KNOWN_ANSWERS], dtype=np.uint32)  # (3, 2)
    out = rng.philox4x32(tuple(counters.T), tuple(keys.T))
    got = np.stack(out, axis=1)
    assert got.shape == (3, 4)
    np.testing.assert_array_equal(got, np.array([e for _, _, e in KNOWN_ANSWERS], dtype=np.uint32))
    # A scalar key broadcast over a counter array gives the scalar answers element by element.
    out = rng.philox4x32((np.zeros(5, np.uint32), 0, 0, 0), (0, 0))
    assert all(w.shape == (5,) for w in out)
    assert [int(w[3]) for w in out] == list(KNOWN_ANSWERS[0][2])


def test_tag_layout():
    assert int(rng.tag(3, 5, 7)) == (3 << 24) | (5 << 16) | 7
    assert int(rng.tag(rng.STREAM_CHAOS, 0, 65535)) == (3 << 24) | 65535
    assert int(rng.tag(1)) == 1 << 24


def test_draw_words_is_philox_of_the_documented_counter_and_key():
    seed, epoch, index, stream, draw, slot, lane = 123, 4, 5 * 2**32 + 17, 2, 9, 3, 11
    got = rng.draw_words(seed, epoch, index, stream, draw, slot=slot, lane=lane)
    tag = (stream << 24) | (slot << 16) | lane
    want = rng.philox4x32((17, 5, tag, draw), (seed, epoch))
    assert [int(w) for w in got] == [int(w) for w in want]


BASE = dict(seed=7, epoch=3, index=1000, stream=rng.STREAM_ITEM, draw=2, slot=1, lane=5)
CHANGES = [
    ("seed", 8),
    ("epoch", 4),
    ("index", 1001),
    ("stream", rng.STREAM_CHAOS),
    ("draw", 3),
    ("slot", 2),
    ("lane", 6),
]


def _words(**kwargs):
    return np.array([int(w) for w in rng.draw_words(**kwargs)], dtype=np.uint64)


@pytest.mark.parametrize("field, value", CHANGES, ids=[c[0] for c in CHANGES])
def test_draw_words_depends_on_every_key_component(field, value):
    base = _words(**BASE)
    changed = _words(**{**BASE, field: value})
    assert not np.array_equal(base, changed)
    # Philox diffuses fully: essentially every word changes, not just one.
    assert (base != changed).sum() >= 3


def test_draw_words_distinct_over_a_grid():
    """No two (index, stream, slot, lane, draw) combinations of a small grid share their words."""
    idx, stream, slot, lane, draw = np.meshgrid(
        np.arange(4), np.arange(1, 5), np.arange(3), np.arange(4), np.arange(3), indexing="ij")
    w = rng.draw_words(0, 0, idx, stream.astype(np.uint32), draw, slot=slot, lane=lane)
    first = np.asarray(w[0], dtype=np.uint64).ravel() << np.uint64(32) | np.asarray(w[1]).ravel()
    assert len(np.unique(first)) == first.size


@pytest.mark.parametrize("i", [0, 1, 12345, 2**31 - 1, 2**32 - 1])
def test_index_high_word_is_used(i):
    low = _words(**{**BASE, "index": i})
    high = _words(**{**BASE, "index": i + 2**32})
    assert not np.array_equal(low, high)
    # i + 2**32 puts 1 in the high word and leaves the low word alone.
    tag = (BASE["stream"] << 24) | (BASE["slot"] << 16) | BASE["lane"]
    want = rng.philox4x32((i & 0xFFFFFFFF, 1, tag, BASE["draw"]), (BASE["seed"], BASE["epoch"]))
    assert list(high) == [int(v) for v in want]


def test_large_indices_vectorised():
    idx = np.array([0, 2**32, 2**33, 2**62 + 5], dtype=np.int64)
    w0 = rng.draw_words(1, 0, idx, rng.STREAM_SAMPLE, 0)[0]
    assert len(np.unique(w0)) == len(idx)


def test_to_uniform_exact_values():
    words = np.array([0, 0xFF, 0x100, 0x80000000, 0xFFFFFF00, 0xFFFFFFFF], dtype=np.uint32)
    u = rng.to_uniform(words)
    assert u.dtype == np.float32
    expected = (words >> 8).astype(np.float64) / 2.0**24
    np.testing.assert_array_equal(u.astype(np.float64), expected)  # exact, no rounding
    assert u[0] == 0.0 and u[1] == 0.0 and u[2] == np.float32(2.0**-24)
    assert u[3] == 0.5
    assert u[-1] == np.float32(1.0 - 2.0**-24) and u[-1] < 1.0


def test_to_uniform_range_and_mean():
    w = rng.draw_words(0, 0, np.arange(25_000), rng.STREAM_SAMPLE, 0)
    u = rng.to_uniform(np.concatenate(w))  # 1e5 draws
    assert u.size == 100_000
    assert u.dtype == np.float32
    assert u.min() >= 0.0 and u.max() < 1.0
    # Every value is k / 2**24 for an integer k.
    k = u.astype(np.float64) * 2.0**24
    np.testing.assert_array_equal(k, np.floor(k))
    assert abs(float(u.mean()) - 0.5) < 0.005  # sd of the mean ~ 0.0009
    assert abs(float(u.var()) - 1.0 / 12.0) < 0.002


def test_to_range():
    w = np.concatenate(rng.draw_words(2, 1, np.arange(5000), rng.STREAM_ITEM, 0))
    v = rng.to_range(w, -0.2, 0.2)
    assert v.dtype == np.float32
    assert v.min() >= np.float32(-0.2) and v.max() < np.float32(0.2)
    low, width = rng.range_params(-0.2, 0.2)
    np.testing.assert_array_equal(v, low + rng.to_uniform(w) * width)
    assert rng.to_range(np.uint32(0), 0.5, 2.0) == np.float32(0.5)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 511, 1000])
def test_to_int_range_and_uniformity(n):
    w = np.concatenate(rng.draw_words(5, 0, np.arange(25_000), rng.STREAM_ITEM, 1))
    k = rng.to_int(w, n)
    assert k.dtype == np.int64
    assert k.min() >= 0 and k.max() < n
    if n == 1:
        assert (k == 0).all()
        return
    counts = np.bincount(k, minlength=n)
    expected = len(k) / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = n - 1
    # mean dof, sd sqrt(2 dof): a 6-sigma bound is never hit by a fair generator.
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (n, chi2)


def test_to_int_extremes_and_vector_n():
    assert int(rng.to_int(np.uint32(0), 10)) == 0
    assert int(rng.to_int(np.uint32(0xFFFFFFFF), 10)) == 9
    assert int(rng.to_int(np.uint32(0xFFFFFFFF), 2**32 - 1)) == 2**32 - 2
    n = np.array([2, 3, 4, 5])
    k = rng.to_int(np.full(4, 0xFFFFFFFF, dtype=np.uint32), n)
    np.testing.assert_array_equal(k, n - 1)


def test_stream_constants_are_distinct():
    # Every consumer of the Philox streams (renderer, augmentation, mixing, few-shot choice, epoch order...)
    # owns its own stream number: two sharing one would draw correlated numbers from the same keys.
    from fractal_pretrain import rng

    streams = {name: value for name, value in vars(rng).items() if name.startswith("STREAM_")}
    assert len(streams) >= 8
    assert len(set(streams.values())) == len(streams), streams
