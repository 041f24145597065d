"""Banks of IFS systems: a reproducible, validated, cached set of K systems drawn from one sampler.

A bank is the fixed list of fractal "classes" that pre-training renders from. System k is a pure
function of (seed, k) (``system_rng``), so a bank can be built in parallel or partially and a
bigger bank starts with the systems of a smaller one.

Samplers (``BankSpec.sampler``):

* ``"svd"``: Anderson & Farrell's contractive SVD sampler, N ~ uniform{min_maps..max_maps} and
  alpha ~ U(N/2 + alpha_offset[0], N/2 + alpha_offset[1]) (default ((5+N)/2, (6+N)/2)).
* ``"fractaldb"``: FractalDB's category search: unconstrained U(-1, 1) systems, resampled from the
  same per-system generator until ``fill_rate >= fill_threshold``.

On disk a bank is ``<name>.npz`` (arrays ``maps`` (K, MAX_MAPS, 2, 3) float64, zero-padded, and
``num_maps`` (K,) int32) plus a sidecar ``<name>.json`` (spec, seed, num_systems, format_version,
rejected). ``cached_bank`` keys the file name on the sampler, seed and a hash of the spec.

Tests: ``python3 -m pytest -q tests/fractal_pretrain/test_bank.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fractal_pretrain.atomic import atomic_write
from fractal_pretrain.cache import cache_root
from fractal_pretrain.ifs.sample import (
    MAX_MAPS,
    fill_rate,
    map_probabilities,
    sample_fractaldb_system,
    sample_svd_system,
    singular_values,
    system_rng,
)

FORMAT_VERSION = 1
SAMPLERS = ("svd", "fractaldb")
# Slack on "largest singular value <= 1": the SVD sampler reaches 1 exactly up to rounding.
CONTRACTIVITY_TOLERANCE = 1e-6
# Smallest fill image that leaves room inside fill_rate's 6-pixel margin.
MIN_FILL_SIZE = 16
# Fixed seed of fill_rate's chaos game, so acceptance depends on the system alone.
FILL_SEED = 0


class BankError(ValueError):
    """A bank file or in-memory bank is missing, unreadable or inconsistent."""


def _invalid(name: str, value: Any, allowed: str) -> ValueError:
    """Returns the one-line error for a bad ``BankSpec`` field."""
    return ValueError(f"BankSpec.{name}={value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class BankSpec:
    """Recipe of a bank; with a seed it fully determines the bank's systems."""

    sampler: str = "svd"  # "svd" (Anderson SVD sampler) or "fractaldb" (U(-1, 1) + fill search)
    num_systems: int = 1000  # K, number of systems (classes), >= 1
    min_maps: int = 2  # smallest N (inclusive), >= 2
    max_maps: int = 4  # largest N (inclusive), <= MAX_MAPS; N ~ uniform{min_maps..max_maps}
    bval: float = 1.0  # svd: translations b ~ U(-bval, bval)^2, > 0
    # svd: alpha ~ U(N/2 + lo, N/2 + hi); must stay inside [0, 3 N] for every N.
    alpha_offset: tuple[float, float] = (2.5, 3.0)
    fill_threshold: float = 0.2  # fractaldb: keep systems with fill_rate >= this, in [0, 1)
    fill_size: int = 256  # fractaldb: fill image side in pixels, >= MIN_FILL_SIZE
    fill_points: int = 100_000  # fractaldb: chaos-game points per fill measurement, >= 1
    max_tries: int = 1000  # fractaldb: candidates per system before giving up, >= 1

    def __post_init__(self) -> None:
        # JSON round trips give a list; keep the field hashable and comparable.
        object.__setattr__(self, "alpha_offset", tuple(float(v) for v in self.alpha_offset))
        self._validate_counts()
        self._validate_svd()
        self._validate_fractaldb()

    def _validate_counts(self) -> None:
        """Checks the sampler name, the number of systems and the map-count range."""
        if self.sampler not in SAMPLERS:
            raise _invalid("sampler", self.sampler, " | ".join(repr(s) for s in SAMPLERS))
        if self.num_systems < 1:
            raise _invalid("num_systems", self.num_systems, "an integer >= 1")
        if self.min_maps < 2:
            raise _invalid("min_maps", self.min_maps, f"an integer in [2, {MAX_MAPS}]")
        if self.max_maps > MAX_MAPS:
            raise _invalid("max_maps", self.max_maps, f"an integer in [2, {MAX_MAPS}]")
        if self.min_maps > self.max_maps:
            raise _invalid("min_maps", self.min_maps, f"<= max_maps={self.max_maps}")

    def _validate_svd(self) -> None:
        """Checks bval and that the alpha band is feasible for every N in range."""
        if not (np.isfinite(self.bval) and self.bval > 0):
            raise _invalid("bval", self.bval, "a finite float > 0")
        if len(self.alpha_offset) != 2:
            raise _invalid("alpha_offset", self.alpha_offset, "a pair (lo, hi)")
        lo, hi = self.alpha_offset
        # sum(s1 + 2 s2) lies in [0, 3 N]; the band N/2 + [lo, hi] must fit for the smallest N,
        # which is the binding case for both ends.
        n = self.min_maps
        finite = bool(np.isfinite(lo) and np.isfinite(hi))
        if not (finite and -n / 2 <= lo <= hi <= 2.5 * n):
            raise _invalid(
                "alpha_offset",
                self.alpha_offset,
                f"finite lo <= hi with lo >= {-n / 2} and hi <= {2.5 * n} (alpha in [0, 3 N])",
            )

    def _validate_fractaldb(self) -> None:
        """Checks the fill-search settings."""
        if not 0.0 <= self.fill_threshold < 1.0:
            raise _invalid("fill_threshold", self.fill_threshold, "a float in [0, 1)")
        if self.fill_size < MIN_FILL_SIZE:
            raise _invalid("fill_size", self.fill_size, f"an integer >= {MIN_FILL_SIZE}")
        if self.fill_points < 1:
            raise _invalid("fill_points", self.fill_points, "an integer >= 1")
        if self.max_tries < 1:
            raise _invalid("max_tries", self.max_tries, "an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Returns the spec as a JSON-ready dict (alpha_offset as a list)."""
        data = dataclasses.asdict(self)
        data["alpha_offset"] = list(self.alpha_offset)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BankSpec:
        """Builds a spec from ``to_dict`` output; missing keys take their defaults.

        Args:
            data: Field values by name.

        Returns:
            The validated spec.

        Raises:
            ValueError: On unknown keys (all named) or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BankSpec keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def cache_key(self) -> str:
        """Returns the first 12 hex digits of the sha1 of the spec's sorted JSON."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass(eq=False)  # arrays have no single truth value; compare fields explicitly
class SystemBank:
    """K IFS systems, zero-padded to MAX_MAPS maps, with the spec and seed that produced them."""

    maps: np.ndarray  # (K, MAX_MAPS, 2, 3) float64; rows >= num_maps[k] are zero
    num_maps: np.ndarray  # (K,) int32, in [spec.min_maps, spec.max_maps]
    spec: BankSpec
    seed: int
    rejected: int = 0  # fractaldb candidates that failed the fill threshold

    def __len__(self) -> int:
        return int(self.num_maps.shape[0])

    def system(self, k: int) -> np.ndarray:
        """Returns system k without padding, a (N_k, 2, 3) float64 copy."""
        if not 0 <= k < len(self):
            raise IndexError(f"system index {k} out of range for a bank of {len(self)}")
        return self.maps[k, : int(self.num_maps[k])].copy()

    def probabilities(self, k: int) -> np.ndarray:
        """Returns the (N_k,) map probabilities of system k (proportional to |det A_i|)."""
        return map_probabilities(self.system(k))

    def validate(self) -> None:
        """Checks shapes, dtypes, map counts, finiteness, padding and (svd) contractivity.

        Raises:
            BankError: Naming the first offending system (and map, for contractivity).
        """
        _check_arrays(self.maps, self.num_maps, self.spec)
        _check_num_maps(self.num_maps, self.spec)
        _check_finite(self.maps)
        _check_padding(self.maps, self.num_maps)
        if self.spec.sampler == "svd":
            _check_contractive(self.maps, self.num_maps)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes ``path`` (.npz arrays) and ``path.with_suffix('.json')`` (sidecar), atomically.

        Each file is written under a temporary name and moved into place, sidecar first, so a
        reader that sees the .npz also sees its sidecar and never sees a partial file.

        Args:
            path: Destination of the arrays; written exactly there (no suffix is appended).
        """
        self.validate()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar = {
            "spec": self.spec.to_dict(),
            "seed": int(self.seed),
            "num_systems": len(self),
            "format_version": FORMAT_VERSION,
            "rejected": int(self.rejected),
        }
        atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(sidecar).encode()))
        atomic_write(path, lambda f: np.savez(f, maps=self.maps, num_maps=self.num_maps))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SystemBank:
        """Reads and validates a bank written by ``save``.

        Args:
            path: The .npz file; its sidecar is ``path.with_suffix('.json')``.

        Returns:
            The validated bank.

        Raises:
            BankError: If a file is missing or unreadable, or the contents are invalid.
        """
        path = Path(path)
        meta = _read_sidecar(path.with_suffix(".json"))
        maps, num_maps = _read_arrays(path)
        try:
            spec = BankSpec.from_dict(meta["spec"])
        except (TypeError, ValueError) as exc:
            raise BankError(f"bank sidecar {path.with_suffix('.json')}: bad spec: {exc}") from exc
        bank = cls(maps, num_maps, spec, int(meta["seed"]), int(meta.get("rejected", 0)))
        try:
            bank.validate()
        except BankError as exc:
            raise BankError(f"bank {path}: {exc}") from exc
        if meta["num_systems"] != len(bank):
            raise BankError(
                f"bank {path}: sidecar says {meta['num_systems']} systems, arrays hold {len(bank)}"
            )
        return bank


def _check_arrays(maps: np.ndarray, num_maps: np.ndarray, spec: BankSpec) -> None:
    """Checks array types, shapes and dtypes, and that K matches the spec."""
    if not isinstance(maps, np.ndarray) or not isinstance(num_maps, np.ndarray):
        raise BankError("maps and num_maps must be numpy arrays")
    if maps.ndim != 4 or maps.shape[1:] != (MAX_MAPS, 2, 3):
        raise BankError(f"maps has shape {maps.shape}, expected (K, {MAX_MAPS}, 2, 3)")
    if maps.dtype != np.float64:
        raise BankError(f"maps has dtype {maps.dtype}, expected float64")
    if num_maps.shape != (maps.shape[0],):
        raise BankError(f"num_maps has shape {num_maps.shape}, expected ({maps.shape[0]},)")
    if num_maps.dtype != np.int32:
        raise BankError(f"num_maps has dtype {num_maps.dtype}, expected int32")
    if maps.shape[0] != spec.num_systems:
        raise BankError(f"bank holds {maps.shape[0]} systems, spec.num_systems={spec.num_systems}")


def _first(mask: np.ndarray) -> int | None:
    """Returns the index of the first True in a 1-D mask, or None."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _check_num_maps(num_maps: np.ndarray, spec: BankSpec) -> None:
    """Checks every map count lies in [spec.min_maps, spec.max_maps] (a subset of [2, MAX_MAPS])."""
    k = _first((num_maps < spec.min_maps) | (num_maps > spec.max_maps))
    if k is not None:
        raise BankError(
            f"system {k} has num_maps={int(num_maps[k])}, "
            f"allowed [{spec.min_maps}, {spec.max_maps}] (at most [2, {MAX_MAPS}])"
        )


def _check_finite(maps: np.ndarray) -> None:
    """Checks that every value is finite."""
    k = _first(~np.isfinite(maps).reshape(len(maps), -1).all(axis=1))
    if k is not None:
        raise BankError(f"system {k} has non-finite values")


def _check_padding(maps: np.ndarray, num_maps: np.ndarray) -> None:
    """Checks that rows beyond each system's map count are zero."""
    unused = np.arange(MAX_MAPS)[None, :] >= num_maps[:, None]  # (K, MAX_MAPS)
    k = _first((unused[:, :, None, None] & (maps != 0)).reshape(len(maps), -1).any(axis=1))
    if k is not None:
        raise BankError(f"system {k} has non-zero padding beyond its {int(num_maps[k])} maps")


def _check_contractive(maps: np.ndarray, num_maps: np.ndarray) -> None:
    """Checks every active map's largest singular value is <= 1 (+ tolerance)."""
    largest = singular_values(maps.reshape(-1, 2, 3))[:, 0].reshape(len(maps), MAX_MAPS)
    active = np.arange(MAX_MAPS)[None, :] < num_maps[:, None]
    bad = active & (largest > 1.0 + CONTRACTIVITY_TOLERANCE)
    k = _first(bad.any(axis=1))
    if k is not None:
        i = int(np.flatnonzero(bad[k])[0])
        raise BankError(
            f"system {k} map {i} is not contractive: largest singular value "
            f"{largest[k, i]:.6g} > 1 (svd banks must be contractive)"
        )


def _read_sidecar(path: Path) -> dict[str, Any]:
    """Reads and checks the JSON sidecar of a bank."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BankError(f"bank sidecar {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise BankError(f"cannot read bank sidecar {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise BankError(f"bank sidecar {path} is not a JSON object")
    missing = sorted({"spec", "seed", "num_systems", "format_version"} - set(meta))
    if missing:
        raise BankError(f"bank sidecar {path} lacks keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise BankError(
            f"bank sidecar {path} has format_version={meta['format_version']!r}, "
            f"expected {FORMAT_VERSION}"
        )
    return meta


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``maps`` and ``num_maps`` from a bank .npz."""
    if not path.is_file():
        raise BankError(f"bank file {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
        # A plain .npy loads as an array, not an archive.
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise BankError(f"bank file {path} is not an .npz archive")
        with archive:
            missing = sorted({"maps", "num_maps"} - set(archive.files))
            if missing:
                raise BankError(f"bank file {path} lacks arrays {missing}")
            return archive["maps"], archive["num_maps"]
    except BankError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise BankError(f"cannot read bank file {path}: {exc}") from exc


def _svd_candidate(rng: np.random.Generator, spec: BankSpec, num_maps: int) -> np.ndarray:
    """Draws one svd system with alpha in the spec's band for ``num_maps`` maps."""
    lo, hi = spec.alpha_offset
    band = (num_maps / 2 + lo, num_maps / 2 + hi)
    return sample_svd_system(rng, num_maps, band, spec.bval)


def _build_system(spec: BankSpec, seed: int, k: int) -> tuple[np.ndarray, int]:
    """Builds system k of a bank from its own generator.

    Returns:
        The (N, 2, 3) system and the number of rejected fractaldb candidates.
    """
    rng = system_rng(seed, k)
    if spec.sampler == "svd":
        num_maps = int(rng.integers(spec.min_maps, spec.max_maps + 1))
        return _svd_candidate(rng, spec, num_maps), 0
    for tries in range(spec.max_tries):
        # FractalDB redraws N with every candidate.
        num_maps = int(rng.integers(spec.min_maps, spec.max_maps + 1))
        maps = sample_fractaldb_system(rng, num_maps)
        fill = fill_rate(maps, size=spec.fill_size, num_points=spec.fill_points, seed=FILL_SEED)
        if fill >= spec.fill_threshold:
            return maps, tries
    raise BankError(
        f"system {k} (seed {seed}): no fractaldb candidate reached fill_threshold="
        f"{spec.fill_threshold} in max_tries={spec.max_tries}"
    )


def _progress(indices: Iterable[int], enabled: bool, total: int) -> Iterable[int]:
    """Wraps ``indices`` in a tqdm bar when asked, tqdm is installed and stderr is a terminal."""
    if not enabled:
        return indices
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return indices
    return tqdm(indices, total=total, desc="bank", unit="system", disable=None)


def build_bank(spec: BankSpec, seed: int, *, progress: bool = False) -> SystemBank:
    """Builds the bank of ``spec.num_systems`` systems for ``seed``.

    System k depends only on (seed, k): for "svd" N ~ uniform{min..max}, alpha ~ the spec's band,
    then ``sample_svd_system``; for "fractaldb" candidates (N redrawn each time) from the same
    generator until ``fill_rate >= fill_threshold``.

    Args:
        spec: Bank recipe.
        seed: Base seed (>= 0).
        progress: Show a tqdm progress bar if tqdm is importable.

    Returns:
        The validated bank.

    Raises:
        BankError: If a fractaldb system finds no candidate within ``spec.max_tries``.
    """
    maps = np.zeros((spec.num_systems, MAX_MAPS, 2, 3), dtype=np.float64)
    num_maps = np.zeros(spec.num_systems, dtype=np.int32)
    rejected = 0
    for k in _progress(range(spec.num_systems), progress, spec.num_systems):
        system, tries = _build_system(spec, seed, k)
        maps[k, : len(system)] = system
        num_maps[k] = len(system)
        rejected += tries
    bank = SystemBank(maps, num_maps, spec, int(seed), rejected)
    bank.validate()
    return bank


def default_cache_dir() -> Path:
    """``banks/`` in the project's cache folder (``fractal_pretrain.cache``)."""
    return cache_root() / "banks"


def bank_path(spec: BankSpec, seed: int, cache_dir: Path | None = None) -> Path:
    """Returns the cache file of (spec, seed): ``bank-<sampler>-<seed>-<spec hash>.npz``."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / f"bank-{spec.sampler}-{seed}-{spec.cache_key()}.npz"


def cached_bank(spec: BankSpec, seed: int, cache_dir: Path | None = None) -> SystemBank:
    """Loads the bank of (spec, seed) from the cache, building and saving it first if absent.

    Writes are atomic (temporary name, then ``os.replace``), so concurrent callers at worst build
    the same bank twice. A corrupt cache file raises rather than being silently rebuilt.

    Args:
        spec: Bank recipe.
        seed: Base seed.
        cache_dir: Cache folder; ``default_cache_dir()`` when None.

    Returns:
        The bank.

    Raises:
        BankError: If the cached file exists but is invalid.
    """
    path = bank_path(spec, seed, cache_dir)
    if path.is_file():
        return SystemBank.load(path)
    # Once per cache folder, and it can take a minute (fractaldb's fill-rate filter): say so.
    print(f"fractal_pretrain: building the {spec.sampler} bank of {spec.num_systems} systems (seed {seed}), "
          f"cached as {path}", file=sys.stderr, flush=True)
    bank = build_bank(spec, seed, progress=True)
    bank.save(path)
    return bank
