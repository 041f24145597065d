"""Tests of the fast CPU renderer (fractal_pretrain.render.fast_cpu, ``device: cpu``).

* byte identity with the NumPy reference (``cpu-reference``): images, labels, point counts and metadata,
  for every IFS recipe (``list_recipes("ifs")``; the Mandelbulb recipes' compiled path: test_mandelbulb.py)
  at several sizes (odd ones included) and batch splits, at the full 256 px / 100k points,
  for variants that take other code paths (point patches, binary, grey, dihedral flips, chain counts that
  are not a multiple of the 8 lockstep lanes, no burn-in, systems of more than 4 maps, a zoomed window that
  drops points, blur on a black background) and for degenerate systems that escape at different steps;
  the two-view recipe ``selfsup`` likewise, every view of every sample;
* threads: 1, 2, 3 and more threads than samples give the same bytes;
* the compiled library is cached across processes (a second process only asks the compiler's version), one
  build per architecture, C library and compiler identity (fast_cpu and the Mandelbulb marcher); a cached
  build that does not load is rebuilt once in place (else the reference, saying why);
* without a compiler, with an unwritable build cache, or with a build that fails (its first error line in
  the note, the compiler run once per process), ``make_renderer`` says so once on stderr and renders with
  the reference;
* ``num_threads`` / ``data.num_threads`` validation and the per-rank default of the data module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fractal_pretrain.recipes import get_recipe, list_recipes
from fractal_pretrain.render import make_renderer
from fractal_pretrain.render.fast_cpu import FastCpuRenderer
from fractal_pretrain.render.renderer import ReferenceRenderer

NAMES = tuple(list_recipes("ifs"))  # every chaos-game recipe, those added later (ofdb, selfsup) included
SMALL = {"num_classes": 10, "num_points": 3000}
SEED = 4


def assert_same(expected, got):
    np.testing.assert_array_equal(got.images, expected.images)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_array_equal(got.points, expected.points)
    assert [got.metadata(i) for i in range(len(got.labels))] == \
        [expected.metadata(i) for i in range(len(expected.labels))]
    if expected.recipe.views:  # the views' canvases (plasma keys, blur) and looks
        for field in ("index", "corners", "blur", "blur_sigma"):
            np.testing.assert_array_equal(getattr(got.extra["view_samples"], field),
                                          getattr(expected.extra["view_samples"], field))
        for field in ("flips", "hue_shift", "side", "top", "left"):
            np.testing.assert_array_equal(getattr(got.items, field), getattr(expected.items, field))


def by_sample(array: np.ndarray, recipe) -> np.ndarray:
    """(V, B, ...) of a batch's images or points: two-view batches are view-major (all first views, then ...)."""
    return array.reshape(max(recipe.views, 1), -1, *array.shape[1:])


def pair(recipe, size, bank=None):
    """(reference, fast) renderers of the recipe sharing one bank."""
    ref = make_renderer(recipe, size=size, seed=SEED, device="cpu-reference", bank=bank)
    fast = make_renderer(recipe, size=size, seed=SEED, device="cpu", bank=ref.bank)
    assert isinstance(ref, ReferenceRenderer) and isinstance(fast, FastCpuRenderer)
    return ref, fast


@pytest.mark.parametrize("size", [16, 37, 64])
@pytest.mark.parametrize("name", NAMES)
def test_same_bytes_as_the_reference_any_batch_split(name, size):
    ref, fast = pair(get_recipe(name, SMALL), size)
    indices = np.array([7, 0, 123456789012, 3, 3, 41])
    expected = ref.render(indices, 2)
    assert_same(expected, fast.render(indices, 2))
    parts = [fast.render(indices[a:b], 2) for a, b in ((0, 1), (1, 4), (4, 6))]
    rec = ref.recipe
    for field in ("images", "points"):
        np.testing.assert_array_equal(np.concatenate([by_sample(getattr(p, field), rec) for p in parts], axis=1),
                                      by_sample(getattr(expected, field), rec))


@pytest.mark.parametrize("name", NAMES)
def test_same_bytes_as_the_reference_at_full_size(name):
    """The recipes as defined (100k points, 256 px), only fewer classes (a small bank)."""
    ref, fast = pair(get_recipe(name, {"num_classes": 10}), 256)
    assert_same(ref.render([5, 12], 0), fast.render([5, 12], 0))


VARIANTS = [
    ("anderson", {"patch": "point", "render_mode": "binary", "color": False}),
    ("anderson", {"render_mode": "binary", "flips": "dihedral"}),
    ("anderson", {"color": False, "grey_level": 200, "patch": "none"}),
    ("anderson", {"chains": 13, "burn_in": 0, "num_points": 1001}),
    ("anderson", {"chains": 3, "num_points": 500, "min_maps": 5, "max_maps": 8}),
    ("anderson", {"window_scale": [0.3, 0.5], "window_translate": 0.4}),
    ("fractal4ad", {"blur_p": 1.0, "blur_sigma": [0.5, 1.5]}),
    ("multiinstance", {"objects": [3, 5], "object_scale": [0.5, 1.2], "flips": "dihedral"}),
    ("fractaldb", {"chains": 9, "grey_level": 255}),
    ("selfsup", {"patch": "point", "render_mode": "binary", "background": False, "flips": "dihedral"}),
    ("selfsup", {"color": False, "blur_p": 1.0, "object_scale": [0.5, 2.0], "chains": 13, "min_maps": 5,
                 "max_maps": 8}),
]


@pytest.mark.parametrize("name, overrides", VARIANTS, ids=[f"{n}-{'-'.join(o)}" for n, o in VARIANTS])
def test_same_bytes_as_the_reference_for_variants(name, overrides):
    ref, fast = pair(get_recipe(name, {**SMALL, **overrides}), 48)
    indices = np.arange(6) + 20
    assert_same(ref.render(indices, 1), fast.render(indices, 1))


@pytest.mark.parametrize("late_escape", [False, True])
def test_degenerate_systems_same_bytes(hand_bank, late_escape):
    """Systems that escape (early, or at different steps in different chains), all-zero maps."""
    rec = get_recipe("fractaldb", {"num_classes": 4, "num_points": 20000, "jitter": "none"})
    ref, fast = pair(rec, 32, bank=hand_bank(rec, late_escape=late_escape))
    expected = ref.render(np.arange(8), 0)
    assert_same(expected, fast.render(np.arange(8), 0))
    assert (expected.points == 0).sum() >= 2  # the expanding system, twice: really degenerate


def test_degenerate_systems_same_bytes_in_both_views(hand_bank):
    bank_of = get_recipe("fractaldb")  # the hand bank's spec
    rec = get_recipe("selfsup", {"num_classes": 4, "num_points": 20000, "jitter": "none", "sampler": "fractaldb",
                                 "min_maps": 2, "max_maps": 7, "fill_threshold": bank_of.fill_threshold})
    ref, fast = pair(rec, 32, bank=hand_bank(rec, late_escape=True))
    expected = ref.render(np.arange(8), 0)
    assert_same(expected, fast.render(np.arange(8), 0))
    assert (expected.points == 0).sum() >= 4  # degenerate in both views


@pytest.mark.parametrize("name", ["anderson", "multiformula", "selfsup"])
def test_threads_do_not_change_the_bytes(name):
    rec = get_recipe(name, SMALL)
    one = make_renderer(rec, size=40, seed=SEED, num_threads=1)
    indices = np.arange(5) + 9
    expected = one.render(indices, 0)
    for threads in (2, 3, 16):
        other = make_renderer(rec, size=40, seed=SEED, num_threads=threads, bank=one.bank)
        assert other.num_threads == threads
        assert_same(expected, other.render(indices, 0))
    assert make_renderer(rec, size=40, seed=SEED, bank=one.bank).num_threads == len(os.sched_getaffinity(0))


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


RENDER_ONE = """
    import sys
    import numpy as np
    from fractal_pretrain.recipes import get_recipe, list_recipes
    from fractal_pretrain.render import make_renderer
    recipe = get_recipe("anderson", {"num_classes": 10, "num_points": 2000})
    first = make_renderer(recipe, size=24, seed=0)
    second = make_renderer(recipe, size=24, seed=0, bank=first.bank)
    ref = make_renderer(recipe, size=24, seed=0, device="cpu-reference", bank=first.bank)
    images = first.render(np.arange(3)).images
    assert (images == second.render(np.arange(3)).images).all()
    assert (images == ref.render(np.arange(3)).images).all()
    print(type(first).__name__, type(second).__name__)
"""


def _logging_compiler(tmp_path, body: str = 'exec g++ "$@"\n'):
    """(log, wrapper): a compiler wrapper that logs its first argument on each call (``--version``: the
    compiler identity the cache key holds; ``-std=c++17``: a build), then runs ``body``."""
    log, wrapper = tmp_path / "cxx.log", tmp_path / "cxx"
    wrapper.write_text(f"#!/bin/sh\necho \"$1\" >> {log}\n{body}")
    wrapper.chmod(0o755)
    return log, wrapper


def _compiler_env(tmp_path, wrapper) -> dict:
    return {**os.environ, "CXX": str(wrapper), "FRACTAL_PRETRAIN_CACHE": str(tmp_path / "cache")}


def test_compiled_library_is_cached_across_processes(tmp_path):
    """The first process asks the compiler its version and builds once; the second only asks its version and
    loads the cached build."""
    log, wrapper = _logging_compiler(tmp_path)
    expected = [["--version", "-std=c++17"], ["--version", "-std=c++17", "--version"]]
    for run in range(2):
        result = _run(RENDER_ONE, _compiler_env(tmp_path, wrapper))
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["FastCpuRenderer", "FastCpuRenderer"]
        assert "unavailable" not in result.stderr
        assert log.read_text().splitlines() == expected[run], f"run {run}"
    assert len(list((tmp_path / "cache" / "fast_cpu").glob("fast_cpu-*.so"))) == 1


def _unloadable_build_at_the_expected_name(monkeypatch, tmp_path, wrapper):
    """Garbage where the build of this compiler (as a subprocess with ``_compiler_env`` finds it) is cached: a
    library that does not load, as one built against a newer glibc or for another ELF class."""
    from fractal_pretrain.render import fast_cpu

    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("FRACTAL_PRETRAIN_CACHE", str(tmp_path / "cache"))
    path = fast_cpu.library_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF\x01 not a loadable library " * 64)
    return path


def test_a_cached_library_that_does_not_load_is_rebuilt_once_in_place(monkeypatch, tmp_path):
    """A node that cannot load the cached build rebuilds it once under the same name and renders the
    reference's bytes with it (not the ~10x slower reference); the next process loads the rebuilt one."""
    log, wrapper = _logging_compiler(tmp_path)
    path = _unloadable_build_at_the_expected_name(monkeypatch, tmp_path, wrapper)
    for run in range(2):
        result = _run(RENDER_ONE, _compiler_env(tmp_path, wrapper))  # asserts fast == reference images
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["FastCpuRenderer", "FastCpuRenderer"], result.stderr
        assert "unavailable" not in result.stderr
        assert log.read_text().splitlines().count("-std=c++17") == 1, f"run {run}"
    assert path.read_bytes()[:5] == b"\x7fELF\x02" and b"not a loadable" not in path.read_bytes()
    assert list(path.parent.iterdir()) == [path]  # no temporary build left beside it


def test_a_cached_library_that_does_not_load_nor_rebuild_falls_back_once_naming_the_error(monkeypatch, tmp_path):
    log, wrapper = _logging_compiler(tmp_path, "[ \"$1\" = --version ] && exec g++ --version\n"
                                               "echo 'fast_cpu.cpp:9:1: error: broken toolchain' >&2\nexit 1\n")
    path = _unloadable_build_at_the_expected_name(monkeypatch, tmp_path, wrapper)
    result = _run(RENDER_ONE, _compiler_env(tmp_path, wrapper))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ReferenceRenderer", "ReferenceRenderer"]
    notes = [line for line in result.stderr.splitlines() if "fast CPU renderer unavailable" in line]
    assert len(notes) == 1 and "error: broken toolchain" in notes[0], result.stderr
    assert log.read_text().splitlines().count("-std=c++17") == 1
    assert b"not a loadable" in path.read_bytes()  # a failed rebuild leaves what was there


def test_without_a_compiler_falls_back_to_the_reference_saying_so_once(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "FRACTAL_PRETRAIN_CACHE": str(tmp_path)}
    result = _run(RENDER_ONE, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ReferenceRenderer", "ReferenceRenderer"]
    notes = [line for line in result.stderr.splitlines() if "fast CPU renderer unavailable" in line]
    assert len(notes) == 1 and "no C++ compiler" in notes[0] and "NumPy reference" in notes[0]


def test_failed_build_falls_back_once_naming_the_error_and_is_not_retried(tmp_path):
    """A compiler that fails: one stderr line with its error, and one compiler run for all renderers."""
    log, wrapper = _logging_compiler(tmp_path, "[ \"$1\" = --version ] && exec g++ --version\n"
                                               "echo 'In file included from x.cpp:1:' >&2\n"
                                               "echo 'fast_cpu.cpp:9:1: error: broken toolchain' >&2\nexit 1\n")
    result = _run(RENDER_ONE, _compiler_env(tmp_path, wrapper))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ReferenceRenderer", "ReferenceRenderer"]
    notes = [line for line in result.stderr.splitlines() if "fast CPU renderer unavailable" in line]
    assert len(notes) == 1 and "error: broken toolchain" in notes[0], result.stderr
    assert log.read_text().splitlines() == ["--version", "-std=c++17"]
    assert not list((tmp_path / "cache" / "fast_cpu").glob("fast_cpu-*.so"))


def _version_wrapper(path, version: str):
    """A compiler wrapper at ``path`` (the same path each time) whose ``--version`` says ``version``."""
    path.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && {{ echo '{version}'; exit 0; }}\nexec g++ \"$@\"\n")
    path.chmod(0o755)


@pytest.mark.parametrize("module", ["fractal_pretrain.render.fast_cpu", "fractal_pretrain.mandelbulb.cpu"])
@pytest.mark.parametrize("differs", ["architecture", "C library", "compiler identity"])
def test_builds_are_kept_per_kind_of_node(monkeypatch, tmp_path, module, differs):
    """A cache shared by cluster nodes ($HOME) holds one build per architecture (x86, ARM), C library (a build
    against a newer glibc does not load on an older node) and compiler (another module-loaded g++ found at
    the same path): a node never finds another kind's library under its own name."""
    import importlib
    import platform

    from fractal_pretrain.render import cxx_build

    lib = importlib.import_module(module)
    _version_wrapper(tmp_path / "g++", "g++ (GCC) 12.2.0")
    monkeypatch.setenv("CXX", str(tmp_path / "g++"))
    here = lib.library_path()
    if differs == "architecture":
        monkeypatch.setattr(platform, "machine", lambda: "other-arch")
    elif differs == "C library":
        glibc, version = platform.libc_ver()
        monkeypatch.setattr(platform, "libc_ver", lambda: (glibc, version + ".1"))
    else:
        _version_wrapper(tmp_path / "g++", "g++ (GCC) 14.1.0")
        cxx_build.compiler_identity.cache_clear()  # it is asked once per process: this test plays a second one
    there = lib.library_path()
    assert there != here and there.parent == here.parent
    assert lib.library_path() == there  # the same node finds its own build again


def test_bad_num_threads_is_a_config_error():
    from fractal_pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="num_threads"):
        make_renderer(get_recipe("anderson", SMALL), size=16, num_threads=-1)


def test_data_num_threads():
    """data.num_threads, else the cores shared among the node's ranks (CPU DDP: one process per device)."""
    from types import SimpleNamespace

    from fractal_pretrain.config import ConfigError
    from fractal_pretrain.render.fast_cpu import available_cores
    from fractal_pretrain.train.data import FractalDataModule

    assert FractalDataModule("anderson", num_threads=3)._render_threads() == 3
    data = FractalDataModule("anderson")
    assert data._render_threads() == available_cores()
    data.trainer = SimpleNamespace(num_devices=2)
    assert data._render_threads() == max(1, available_cores() // 2)
    with pytest.raises(ConfigError, match="data.num_threads"):
        FractalDataModule("anderson", num_threads=-2)


def test_unwritable_cache_falls_back_to_the_reference(tmp_path):
    (tmp_path / "fast_cpu").write_text("a file where the build cache's directory should be")
    env = {**os.environ, "FRACTAL_PRETRAIN_CACHE": str(tmp_path)}
    result = _run(RENDER_ONE, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ReferenceRenderer", "ReferenceRenderer"]
    assert sum("fast CPU renderer unavailable" in line for line in result.stderr.splitlines()) == 1
