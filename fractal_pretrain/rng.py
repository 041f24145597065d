"""Counter-based randomness: Philox4x32-10 in NumPy, bit-identical to ``render/kernels/philox.cuh``.

Every random draw of a fractal sample is a pure function of a *key* and a *counter*, never of global
RNG state, so a sample renders to the same bytes on any device, rank, world size or batch split.

Layout (the same in NumPy and CUDA):

* key     = (seed, epoch)                       two 32-bit words
* counter = (index_lo, index_hi, tag, draw)     index = global sample index (< 2**63)
* tag     = stream << 24 | slot << 16 | lane    stream: what the draw is for (constants below);
                                                slot: object number in a multi-object image;
                                                lane: chaos-game chain (< 65536)
* draw    = which 4-word block of that stream

Uniform floats use the top 24 bits of a word, so they are exact float32 values in [0, 1).

Reference: Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011.
"""

from __future__ import annotations

import numpy as np

# Stream ids (the top byte of the tag word). Keep in sync with kernels/common.cuh.
STREAM_SAMPLE = 1  # per-image draws: object count, blur, background constants
STREAM_ITEM = 2  # per-fractal draws: system choice, jitter, window, patch, flips, colours, placement
STREAM_CHAOS = 3  # chaos-game map choices (lane = chain)
STREAM_PLASMA = 4  # diamond-square noise (draw = grid cell)
STREAM_AUGMENT = 5  # training-time augmentation draws of one sample (augment/params.py; host only)
STREAM_MIX = 6  # batch mixing draws; index = step, lane = rank (augment/params.py; host only)
STREAM_GROUPS = 7  # Mandelbulb class groups: index = formula (mandelbulb/params.py; host only)
STREAM_SHOTS = 8  # ad_eval few-shot choice of train images (epoch = category key, index = image)
STREAM_ORDER = 16  # order of a fixed image set within an epoch (train/images.py epoch_order; host only)
STREAM_SHARDS = 17  # order of a streamed set's shards within an epoch (train/images.py shard_order; host only)
STREAM_SHARD_SHUFFLE = 18  # shuffle buffer of a streamed set; index = rank, lane = worker (train/images.py; host only)
STREAM_ANOMALY = 20  # adapt: synthetic anomaly draws of one sample (adapt/anomalies.py; host only)
STREAM_ANOMALY_NOISE = 21  # adapt: per-pixel noise of one anomaly (lane = pixel block; host only)
STREAM_REFERENCES = 22  # adapt: K and the classes of one batch (index = step; host only)
STREAM_VIEWS = 23  # adapt: photometric view draws (index = sample, slot = view; host only)
STREAM_REFERENCE_SHIFTS = 24  # adapt: crop offsets of a normal instance (slot = copy; host only)

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint32(0x9E3779B9)
_W1 = np.uint32(0xBB67AE85)
_LO32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_INV24 = np.float32(1.0 / (1 << 24))


def _mulhilo(m: np.uint64, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    product = x.astype(np.uint64) * m
    return (product >> _S32).astype(np.uint32), (product & _LO32).astype(np.uint32)


def philox4x32(counter: tuple, key: tuple) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 on broadcastable uint32 arrays.

    Args:
        counter: four uint32 arrays (or scalars), broadcast together.
        key: two uint32 arrays (or scalars).

    Returns:
        Four uint32 arrays of the broadcast shape.
    """
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=np.uint32) for c in counter))
    k0, k1 = (np.asarray(k, dtype=np.uint32) for k in key)
    with np.errstate(over="ignore"):
        for _ in range(10):
            hi0, lo0 = _mulhilo(_M0, c0)
            hi1, lo1 = _mulhilo(_M1, c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + _W0
            k1 = k1 + _W1
    return c0, c1, c2, c3


def tag(stream: int, slot=0, lane=0) -> np.ndarray:
    """The third counter word: stream << 24 | slot << 16 | lane."""
    slot = np.asarray(slot, dtype=np.uint32)
    lane = np.asarray(lane, dtype=np.uint32)
    return (np.uint32(stream) << np.uint32(24)) | (slot << np.uint32(16)) | lane


def draw_words(seed: int, epoch: int, index, stream: int, draw, slot=0, lane=0):
    """Four random uint32 words for (seed, epoch, index, stream, slot, lane, draw)."""
    index = np.asarray(index, dtype=np.int64).astype(np.uint64)
    index_lo = (index & _LO32).astype(np.uint32)
    index_hi = (index >> _S32).astype(np.uint32)
    return philox4x32(
        (index_lo, index_hi, tag(stream, slot, lane), np.asarray(draw, dtype=np.uint32)),
        (np.uint32(seed), np.uint32(epoch)),
    )


def to_uniform(word: np.ndarray) -> np.ndarray:
    """uint32 -> float32 uniform in [0, 1), exact (top 24 bits)."""
    return (np.asarray(word, dtype=np.uint32) >> np.uint32(8)).astype(np.float32) * _INV24


def to_range(word: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint32 -> float32 uniform in [low, high): low + u * (high - low), all in float32."""
    low32, width32 = range_params(low, high)
    return low32 + to_uniform(word) * width32


def range_params(low: float, high: float) -> tuple[np.float32, np.float32]:
    """(low, width) as float32, rounded once: the exact values the CUDA side receives too."""
    return np.float32(low), np.float32(high - low)


def to_int(word: np.ndarray, n) -> np.ndarray:
    """uint32 -> integer uniform in [0, n) by multiply-high (no modulo bias worth naming)."""
    word = np.asarray(word, dtype=np.uint32).astype(np.uint64)
    return ((word * np.asarray(n, dtype=np.uint64)) >> _S32).astype(np.int64)
