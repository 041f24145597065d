"""Few-shot training sets: which K normal images of a category a cell trains on.

Each train image (by its position in the sorted ``Split.train``) gets one random word from
``fractal_pretrain.rng`` keyed by (seed, category); the K images with the smallest words are the
K-shot set. So the choice is a pure function of (seed, category, K) for a given folder, and nested:
the images of K are among those of 2K (any K' > K), because every K reads the same ranking.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from ad_eval.datasets import Sample
from fractal_pretrain import rng
from fractal_pretrain.config import ConfigError

ALL = "all"  # the grid's and the CLI's word for "every train image" (shots=None)


def category_key(category: str) -> int:
    """A 32-bit key of the category name (the rng's epoch word: one ranking per category)."""
    return zlib.crc32(category.encode())


def shot_ranking(count: int, seed: int, category: str) -> list[int]:
    """Positions 0..count-1 in the order few-shot sets take them (ties, never seen, by position)."""
    words = rng.draw_words(seed, category_key(category), np.arange(count), rng.STREAM_SHOTS, 0)[0]
    return sorted(range(count), key=lambda i: (int(words[i]), i))


def select_shots(train: Sequence[Sample], shots: int | None, *, seed: int, category: str) -> list[Sample]:
    """The ``shots`` images of ``train`` a cell uses, in ``train``'s order; None: all of them."""
    if shots is None:
        return list(train)
    if shots > len(train):
        raise ConfigError(f"shots={shots}: category {category!r} has only {len(train)} train images")
    chosen = set(shot_ranking(len(train), seed, category)[:shots])
    return [sample for i, sample in enumerate(train) if i in chosen]


def parse_shots(value) -> int | None:
    """``K`` (an integer >= 1) or ``"all"`` (None), from the CLI or a grid's ``shots`` list."""
    if value is None or value == ALL:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"shots={value!r}: must be an integer >= 1 or {ALL!r}")
    return value
