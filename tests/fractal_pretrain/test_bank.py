"""Tests of IFS system banks (fractal_pretrain.ifs.bank): build, validate, save/load, cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fractal_pretrain.ifs import (
    MAX_MAPS,
    BankError,
    BankSpec,
    SystemBank,
    build_bank,
    cached_bank,
    fill_rate,
    map_probabilities,
)
from fractal_pretrain.ifs import bank as bank_module

SMALL_SVD = BankSpec(num_systems=12)


@pytest.fixture(scope="module")
def svd_bank() -> SystemBank:
    return build_bank(SMALL_SVD, seed=3)


@pytest.fixture
def saved(tmp_path: Path, svd_bank: SystemBank) -> Path:
    path = tmp_path / "bank.npz"
    svd_bank.save(path)
    return path


def _overwrite_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Replaces the .npz of a saved bank (keeping its sidecar) with the given arrays."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _arrays(bank: SystemBank) -> tuple[np.ndarray, np.ndarray]:
    return bank.maps.copy(), bank.num_maps.copy()


# --- building -------------------------------------------------------------------------------------


def test_svd_bank_shapes_padding_and_band(svd_bank: SystemBank) -> None:
    assert len(svd_bank) == 12
    assert svd_bank.maps.shape == (12, MAX_MAPS, 2, 3) and svd_bank.maps.dtype == np.float64
    assert svd_bank.num_maps.dtype == np.int32
    assert set(svd_bank.num_maps.tolist()) <= {2, 3, 4}
    for k in range(len(svd_bank)):
        n = int(svd_bank.num_maps[k])
        system = svd_bank.system(k)
        assert system.shape == (n, 2, 3)
        assert not svd_bank.maps[k, n:].any()
        sv = np.linalg.svd(system[:, :, :2], compute_uv=False)
        alpha = np.sum(sv[:, 0] + 2 * sv[:, 1])
        assert (5 + n) / 2 - 1e-9 <= alpha <= (6 + n) / 2 + 1e-9
        assert sv.max() < 1.0 + 1e-9
        np.testing.assert_allclose(svd_bank.probabilities(k), map_probabilities(system))
    with pytest.raises(IndexError):
        svd_bank.system(12)


def test_bank_is_deterministic_and_prefix_stable(svd_bank: SystemBank) -> None:
    again = build_bank(SMALL_SVD, seed=3)
    np.testing.assert_array_equal(again.maps, svd_bank.maps)
    # System k depends only on (seed, k): a smaller bank is a prefix of the larger one.
    prefix = build_bank(BankSpec(num_systems=5), seed=3)
    np.testing.assert_array_equal(prefix.maps, svd_bank.maps[:5])
    other = build_bank(SMALL_SVD, seed=4)
    assert not np.array_equal(other.maps, svd_bank.maps)


def test_alpha_offset_moves_the_band() -> None:
    bank = build_bank(BankSpec(num_systems=20, alpha_offset=(0.0, 0.5)), seed=0)
    for k in range(len(bank)):
        n = int(bank.num_maps[k])
        sv = np.linalg.svd(bank.system(k)[:, :, :2], compute_uv=False)
        assert n / 2 - 1e-9 <= np.sum(sv[:, 0] + 2 * sv[:, 1]) <= n / 2 + 0.5 + 1e-9


def test_fractaldb_bank_meets_fill_threshold() -> None:
    spec = BankSpec(sampler="fractaldb", num_systems=5, fill_size=64, fill_points=20_000)
    bank = build_bank(spec, seed=1)
    assert len(bank) == 5
    assert bank.rejected > 0
    for k in range(len(bank)):
        fill = fill_rate(bank.system(k), size=64, num_points=20_000, seed=bank_module.FILL_SEED)
        assert fill >= spec.fill_threshold
    # Roughly 1 in 7 candidates passes at this size, so rejections are expected; the count is
    # fixed by the seed.
    assert bank.rejected == build_bank(spec, seed=1).rejected


def test_fractaldb_bank_gives_up_after_max_tries() -> None:
    spec = BankSpec(
        sampler="fractaldb",
        num_systems=2,
        fill_size=32,
        fill_points=2_000,
        fill_threshold=0.99,
        max_tries=3,
    )
    with pytest.raises(BankError, match="system 0"):
        build_bank(spec, seed=0)


# --- spec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sampler", "mandelbrot"),
        ("num_systems", 0),
        ("min_maps", 1),
        ("max_maps", MAX_MAPS + 1),
        ("bval", 0.0),
        ("alpha_offset", (3.0, 2.0)),
        ("alpha_offset", (2.5, 9.0)),
        ("fill_threshold", 1.0),
        ("fill_threshold", -0.1),
        ("fill_size", 8),
        ("fill_points", 0),
        ("max_tries", 0),
    ],
)
def test_spec_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        BankSpec(**{field: value})
    assert "\n" not in str(info.value)
    assert "allowed" in str(info.value)


def test_spec_min_above_max_rejected() -> None:
    with pytest.raises(ValueError, match="min_maps"):
        BankSpec(min_maps=5, max_maps=4)


def test_spec_dict_round_trip_and_unknown_keys() -> None:
    spec = BankSpec(sampler="fractaldb", num_systems=7, alpha_offset=(2.0, 2.5))
    data = json.loads(json.dumps(spec.to_dict()))
    assert BankSpec.from_dict(data) == spec
    with pytest.raises(ValueError, match="colour"):
        BankSpec.from_dict({**data, "colour": 1})


# --- save / load ----------------------------------------------------------------------------------


def test_save_load_round_trip(saved: Path, svd_bank: SystemBank) -> None:
    sidecar = json.loads(saved.with_suffix(".json").read_text())
    assert sidecar["format_version"] == 1 and sidecar["num_systems"] == 12
    assert sidecar["seed"] == 3 and sidecar["rejected"] == 0
    loaded = SystemBank.load(saved)
    np.testing.assert_array_equal(loaded.maps, svd_bank.maps)
    np.testing.assert_array_equal(loaded.num_maps, svd_bank.num_maps)
    assert loaded.spec == svd_bank.spec
    assert loaded.seed == 3 and loaded.rejected == 0
    # No stray temporary files are left behind.
    assert sorted(p.name for p in saved.parent.iterdir()) == ["bank.json", "bank.npz"]


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(BankError, match="nope"):
        SystemBank.load(path)


def test_load_missing_sidecar(saved: Path) -> None:
    saved.with_suffix(".json").unlink()
    with pytest.raises(BankError, match="bank.json"):
        SystemBank.load(saved)


def test_load_garbage_file(saved: Path) -> None:
    saved.write_bytes(b"this is not an npz archive at all")
    with pytest.raises(BankError, match="bank.npz"):
        SystemBank.load(saved)


def test_load_truncated_file(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(BankError, match="bank.npz"):
        SystemBank.load(saved)


def test_load_missing_array(saved: Path, svd_bank: SystemBank) -> None:
    _overwrite_arrays(saved, maps=svd_bank.maps)
    with pytest.raises(BankError, match="num_maps"):
        SystemBank.load(saved)


def test_load_wrong_shape(saved: Path, svd_bank: SystemBank) -> None:
    maps, num_maps = _arrays(svd_bank)
    _overwrite_arrays(saved, maps=maps[:, :4], num_maps=num_maps)
    with pytest.raises(BankError, match="shape"):
        SystemBank.load(saved)


def test_load_wrong_dtype(saved: Path, svd_bank: SystemBank) -> None:
    maps, num_maps = _arrays(svd_bank)
    _overwrite_arrays(saved, maps=maps.astype(np.float32), num_maps=num_maps)
    with pytest.raises(BankError, match="dtype"):
        SystemBank.load(saved)


def test_load_nan_names_system(saved: Path, svd_bank: SystemBank) -> None:
    maps, num_maps = _arrays(svd_bank)
    maps[3, 1, 0, 2] = np.nan
    _overwrite_arrays(saved, maps=maps, num_maps=num_maps)
    with pytest.raises(BankError, match="system 3 "):
        SystemBank.load(saved)


def test_load_non_contractive_names_system_and_map(saved: Path, svd_bank: SystemBank) -> None:
    maps, num_maps = _arrays(svd_bank)
    maps[5, 1, :, :2] = [[1.2, 0.0], [0.0, 0.3]]
    _overwrite_arrays(saved, maps=maps, num_maps=num_maps)
    with pytest.raises(BankError, match="system 5 map 1 "):
        SystemBank.load(saved)


@pytest.mark.parametrize("bad_count", [1, MAX_MAPS + 1])
def test_load_num_maps_out_of_range(saved: Path, svd_bank: SystemBank, bad_count: int) -> None:
    maps, num_maps = _arrays(svd_bank)
    num_maps[4] = bad_count
    _overwrite_arrays(saved, maps=maps, num_maps=num_maps)
    with pytest.raises(BankError, match="system 4 "):
        SystemBank.load(saved)


def test_load_nonzero_padding(saved: Path, svd_bank: SystemBank) -> None:
    maps, num_maps = _arrays(svd_bank)
    maps[2, MAX_MAPS - 1, 0, 0] = 0.1
    _overwrite_arrays(saved, maps=maps, num_maps=num_maps)
    with pytest.raises(BankError, match="system 2 .*padding"):
        SystemBank.load(saved)


def test_validate_in_memory_bank(svd_bank: SystemBank) -> None:
    svd_bank.validate()
    maps, num_maps = _arrays(svd_bank)
    maps[0, 0, 1, 1] = np.inf
    broken = SystemBank(maps, num_maps, svd_bank.spec, svd_bank.seed)
    with pytest.raises(BankError, match="system 0 "):
        broken.validate()
    # A fractaldb bank may hold non-contractive maps.
    maps, num_maps = _arrays(svd_bank)
    maps[0, 0, :, :2] = 3.0 * np.eye(2)
    spec = BankSpec(sampler="fractaldb", num_systems=len(svd_bank))
    SystemBank(maps, num_maps, spec, 0).validate()
    with pytest.raises(BankError, match="system 0 map 0"):
        SystemBank(maps, num_maps, svd_bank.spec, 0).validate()


# --- cache ----------------------------------------------------------------------------------------


def test_cached_bank_builds_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, svd_bank: SystemBank, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FRACTAL_PRETRAIN_CACHE", str(tmp_path / "cache"))
    calls = []
    real_build = bank_module.build_bank

    def counting_build(spec: BankSpec, seed: int, **kwargs: object) -> SystemBank:
        calls.append((spec, seed))
        return real_build(spec, seed, **kwargs)

    monkeypatch.setattr(bank_module, "build_bank", counting_build)
    first = cached_bank(SMALL_SVD, 3)
    files = sorted((tmp_path / "cache" / "banks").iterdir())  # banks/ of the project's one cache folder
    assert [p.suffix for p in files] == [".json", ".npz"]
    npz = files[1]
    assert npz.name == f"bank-svd-3-{SMALL_SVD.cache_key()}.npz"
    mtime = os.stat(npz).st_mtime_ns
    assert f"building the svd bank of {SMALL_SVD.num_systems} systems (seed 3)" in capsys.readouterr().err
    second = cached_bank(SMALL_SVD, 3)
    assert len(calls) == 1
    assert capsys.readouterr().err == ""  # loading says nothing
    assert os.stat(npz).st_mtime_ns == mtime
    np.testing.assert_array_equal(first.maps, svd_bank.maps)
    np.testing.assert_array_equal(second.maps, svd_bank.maps)
    # A different spec or seed is a different cache entry.
    cached_bank(SMALL_SVD, 4)
    cached_bank(BankSpec(num_systems=12, bval=0.5), 3)
    assert len(calls) == 3
    assert len(list((tmp_path / "cache" / "banks").glob("*.npz"))) == 3


def test_cached_bank_explicit_dir(tmp_path: Path) -> None:
    bank = cached_bank(BankSpec(num_systems=3), 0, cache_dir=tmp_path)
    assert len(bank) == 3
    assert (tmp_path / f"bank-svd-0-{BankSpec(num_systems=3).cache_key()}.npz").is_file()
