"""Fast CPU renderer: ``fast_cpu.cpp`` built with the host C++ compiler, byte-identical to the reference.

``device: cpu`` uses it (``make_renderer``); ``device: cpu-reference`` keeps the NumPy reference, which stays
the definition. The plan (``params.py``, NumPy, ~1 ms a batch) is shared; the pixels (chaos game, window,
histogram, stamp, flips, colour, plasma, paste, blur) are made in C++ in the reference's float32 operation
order, compiled with ``-ffp-contract=off -fno-fast-math`` (no fused multiply-add, IEEE division) like the
CUDA emulator, so the images are the same bytes (tests/fractal_pretrain/test_render_fast_cpu.py).
Two-view recipes (``selfsup``) are planned by ``params.plan_views`` as for the reference: one chaos game and
density per sample, coloured, pasted onto its own plasma and blurred once per view.

A batch is spread over threads, one sample at a time (``num_threads``; default: every core this process
may run on). Each sample's bytes depend only on its key, so any thread count gives the same images.

Why C++ and not numba (the anchor's choice): no new dependency (numba + llvmlite add ~150 MB installed
and ~0.5 s of import to every process; the project already builds ``.cu`` files with g++ for its CUDA
emulator), the Philox, plan layouts and HSV code are shared with the CUDA kernels through
``kernels/common.cuh`` instead of written a third time, and float32 semantics are explicit (numba
promotes float32 * Python float or int to float64 silently). First use compiles for ~2-5 s (one g++
call on the 2-core development machine, loaded); the library is cached under
``$FRACTAL_PRETRAIN_CACHE/fast_cpu`` (default ``~/.cache/fractal_pretrain``) by a hash of the sources, the
compiler and its version, the flags and the machine's architecture and C library (``cxx_build.py``), so
later processes load it in milliseconds; a cached build that does not load is rebuilt once. Where no
compiler is found or the build fails, ``make_renderer`` says so once on stderr and renders with the reference.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fractal_pretrain.cache import cache_root
from fractal_pretrain.config import check_range
from fractal_pretrain.recipes import Recipe
from fractal_pretrain.render import cxx_build
from fractal_pretrain.render.base import MAX_THREADS, RenderedBatch, Renderer, make_labels
from fractal_pretrain.render.kernel_constants import ITEM_FLOATS, ITEM_INTS, SAMPLE_FLOATS, define_options, recipe_ints
from fractal_pretrain.render.params import ItemPlan, SamplePlan

SOURCE = Path(__file__).resolve().parent / "fast_cpu.cpp"
COMMON = Path(__file__).resolve().parent / "kernels" / "common.cuh"
CXX_FLAGS = ("-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread",
             "-fvisibility=hidden", "-Wall")


class FastCpuUnavailable(RuntimeError):
    """The fast CPU renderer could not be built or loaded (no compiler, failed build)."""


def cache_dir() -> Path:
    return cache_root() / "fast_cpu"


def library_path() -> Path:
    """Where the build of the current source, compiler, flags and kind of machine lives (it may not exist yet)."""
    cxx = cxx_build.compiler()
    if cxx is None:
        raise FastCpuUnavailable("no C++ compiler (set CXX or install g++)")
    return cxx_build.library_path(cache_dir(), "fast_cpu", cxx, [SOURCE.read_text(), COMMON.read_text()],
                                  [*CXX_FLAGS, *define_options()])


def build(out: Path) -> None:
    """Compile the library into ``out`` (atomically)."""
    compile_library(out, SOURCE, [*CXX_FLAGS, *define_options(), f"-I{SOURCE.parent}"])


def compile_library(out: Path, source: Path, options: list[str]) -> None:
    """``source`` compiled with ``options`` into ``out`` (atomically, ``cxx_build.build``); where that fails,
    FastCpuUnavailable whose first line is the reason (the compiler's first error line)."""
    try:
        result = cxx_build.build(out, [cxx_build.compiler(), *options, str(source)])
    except OSError as err:  # an unwritable cache, a compiler that cannot run
        raise FastCpuUnavailable(f"building in {out.parent} failed: {err}") from None
    if result.returncode != 0:
        raise FastCpuUnavailable(f"building {source.name} failed: {first_error(result)}\n{result.stderr[-2000:]}")


def first_error(result: subprocess.CompletedProcess) -> str:
    """The compiler's first error line (else its first line, else its exit status): the one-line reason."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [f"exit status {result.returncode}"])[0]


@cxx_build.once_per_process(FastCpuUnavailable)
def load() -> ctypes.CDLL:
    """The library with ``render_batch`` typed: the cached build (rebuilt once where it does not load), built
    on first use. Once per process, a failure included (``cxx_build.once_per_process``)."""
    out = library_path()
    try:
        lib = cxx_build.load(out, lambda: build(out))
    except OSError as err:
        raise FastCpuUnavailable(f"loading the built library failed: {err}") from None
    fn = lib.render_batch
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return lib


_warned = False


def warn_unavailable(err: Exception) -> None:
    """One line on stderr, once per process: the reference renders instead."""
    global _warned
    if not _warned:
        _warned = True
        first = str(err).splitlines()[0]
        print(f"fractal_pretrain: fast CPU renderer unavailable ({first}); using the NumPy reference",
              file=sys.stderr, flush=True)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def pack_samples(samples: SamplePlan) -> np.ndarray:
    """(B, SAMPLE_FLOATS) float32 in plan.cu's layout: blur, k0, k1, sigma, decay, 4 corners, 6 colour gains."""
    cols = [samples.blur.astype(np.float32)[:, None], samples.blur_k0[:, None], samples.blur_k1[:, None],
            samples.blur_sigma[:, None], samples.decay[:, None], samples.corners, samples.bg_hsv]
    out = np.ascontiguousarray(np.concatenate([np.asarray(c, dtype=np.float32) for c in cols], axis=1))
    assert out.shape[1] == SAMPLE_FLOATS
    return out


def pack_items(items: ItemPlan) -> tuple[np.ndarray, np.ndarray]:
    """(I, ITEM_INTS) int32 and (I, ITEM_FLOATS) float32 in plan.cu's layout (common.cuh IF_*)."""
    ints = np.stack([items.active, items.system, items.object_class, items.num_maps, items.jitter_try, items.mask,
                     items.flips, items.sat8, items.val8, items.side, items.top, items.left], axis=1)
    n = len(items.index)
    floats = np.concatenate([items.maps.reshape(n, -1), items.cum, items.start, items.shift, items.scale,
                             items.hue_shift[:, None]], axis=1)
    assert ints.shape[1] == ITEM_INTS and floats.shape[1] == ITEM_FLOATS
    return np.ascontiguousarray(ints, dtype=np.int32), np.ascontiguousarray(floats, dtype=np.float32)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class FastCpuRenderer(Renderer):
    """The reference's images from compiled code on every core (``num_threads``: None or 0 = all)."""

    def __init__(self, recipe: Recipe, *, size: int = 256, seed: int = 0, bank=None, cache_dir: Path | None = None,
                 num_threads: int | None = None):
        if num_threads is not None:
            check_range("num_threads", num_threads, 0, MAX_THREADS, integer=True)
        self.num_threads = num_threads or available_cores()
        self._lib = load()  # before the bank: a missing compiler is reported without building it
        super().__init__(recipe, size=size, seed=seed, bank=bank, cache_dir=cache_dir)
        self._ri = recipe_ints(recipe, size)

    def render(self, indices, epoch: int = 0) -> RenderedBatch:
        views, extra = self.recipe.views, {}
        if views:  # V*B canvases and view items, view-major (params.plan_views), as the reference renders them
            indices, samples, canvases, items = self.plan_views(indices, epoch)
            canvas_keys, extra["view_samples"] = canvases.index, canvases
        else:
            indices, samples, items = self.plan(indices, epoch)
            canvases, canvas_keys = samples, indices
        b = len(indices)
        item_i, item_f = pack_items(items)
        sample_f = pack_samples(canvases)
        images = np.empty((max(views, 1) * b, self.size, self.size, 3), dtype=np.uint8)
        points = np.zeros(len(item_i), dtype=np.int64)
        canvas_keys = np.ascontiguousarray(canvas_keys, dtype=np.int64)
        rc = self._lib.render_batch(b, _ptr(indices), self.seed, epoch, _ptr(self._ri), _ptr(sample_f), _ptr(item_i),
                                    _ptr(item_f), _ptr(images), _ptr(points), self.num_threads, views,
                                    _ptr(canvas_keys))
        if rc != 0:
            raise MemoryError(f"fast CPU renderer: out of memory rendering {b} samples of {self.size} px")
        return RenderedBatch(
            images=images, labels=make_labels(self.recipe, samples, items), recipe=self.recipe, seed=self.seed,
            epoch=epoch, samples=samples, items=items, points=points, size=self.size, extra=extra)
