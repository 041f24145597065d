"""Fixtures shared by the fractal engine's tests."""

from __future__ import annotations

import numpy as np
import pytest

from fractal_pretrain.ifs.bank import BankSpec, SystemBank
from fractal_pretrain.ifs.sample import MAX_MAPS


def _hand_bank(recipe, late_escape: bool = False) -> SystemBank:
    """Four systems for a 4-class 'fractaldb' recipe. 0: expanding (A = 3 I), escapes early; 1: all-zero
    maps; 2: a Sierpinski triangle; 3: the same triangle, or with ``late_escape`` one map x 0.5 and one
    x 2 (p ~ |det|: 0.06 / 0.94), so chains overflow float32 around step 140 and at different steps."""
    spec = recipe.bank_spec()
    assert spec == BankSpec(sampler="fractaldb", num_systems=4, min_maps=2, max_maps=7,
                            fill_threshold=recipe.fill_threshold)
    maps = np.zeros((4, MAX_MAPS, 2, 3), dtype=np.float64)
    num_maps = np.array([2, 2, 3, 3], dtype=np.int32)
    for i, b in enumerate([(0.5, 0.1), (-0.3, 0.7)]):
        maps[0, i] = [[3.0, 0.0, b[0]], [0.0, 3.0, b[1]]]
    for k in (2, 3):
        for i, b in enumerate([(0.0, 0.0), (0.5, 0.0), (0.25, 0.5)]):
            maps[k, i] = [[0.5, 0.0, b[0]], [0.0, 0.5, b[1]]]
    if late_escape:
        maps[3] = 0.0
        maps[3, 0] = [[0.5, 0.0, 0.1], [0.0, 0.5, 0.2]]
        maps[3, 1] = [[2.0, 0.0, 0.3], [0.0, 2.0, -0.1]]
        num_maps[3] = 2
    bank = SystemBank(maps, num_maps, spec, seed=0)
    bank.validate()
    return bank


@pytest.fixture(scope="session")
def hand_bank():
    """``hand_bank(recipe, late_escape=False)``: a hand-built bank with degenerate systems."""
    return _hand_bank
