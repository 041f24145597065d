"""Compiled CPU ray marcher for the Mandelbulb recipes: ``render/kernels/mandelbulb.cu``'s march_sprites
built for the host (``march_cpu.cpp``), byte-identical to the reference and the kernel, on every core.

Only the sprites are compiled (where the time goes); planning, the bank's resize and the composition are
the reference's NumPy code (``reference.render(..., march=...)``). Built with the host C++ compiler on first
use (~10-30 s), cached as ``fast_cpu.py``'s build is (``cxx_build.py``) under
``$FRACTAL_PRETRAIN_CACHE/mandelbulb_cpu``, loaded in milliseconds after that. Where no compiler is found
or the build fails, ``make_mandelbulb_renderer`` says so once on stderr and renders with the NumPy reference.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from fractal_pretrain.cache import cache_root
from fractal_pretrain.mandelbulb import reference
from fractal_pretrain.mandelbulb.recipe import MandelbulbRecipe
from fractal_pretrain.render import cxx_build, emulator
from fractal_pretrain.render.fast_cpu import FastCpuUnavailable, available_cores, compile_library
from fractal_pretrain.render.kernel_constants import MB_TILE_COLS, MB_TILE_ROWS, define_options, mb_march_threads

SOURCE = Path(__file__).resolve().parent / "march_cpu.cpp"
KERNEL = emulator.KERNEL_DIR / "mandelbulb.cu"
COMMON = emulator.KERNEL_DIR / "common.cuh"
CXX_FLAGS = ("-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread",
             "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas")


def library_path() -> Path:
    """Where the build of the current sources, compiler, flags and kind of machine lives (it may not exist yet)."""
    cxx = cxx_build.compiler()
    if cxx is None:
        raise FastCpuUnavailable("no C++ compiler (set CXX or install g++)")
    return cxx_build.library_path(cache_root() / "mandelbulb_cpu", "march_cpu", cxx,
                                  [p.read_text() for p in (SOURCE, KERNEL, COMMON)], [*CXX_FLAGS, *define_options()])


def build(out: Path) -> None:
    """Compile the library into ``out`` (atomically)."""
    compile_library(out, SOURCE, [*CXX_FLAGS, *define_options(), f"-I{KERNEL.parent}"])


@cxx_build.once_per_process(FastCpuUnavailable)
def load() -> ctypes.CDLL:
    """The library with ``march`` typed: the cached build (rebuilt once where it does not load), built on first
    use. Once per process, a failure included."""
    out = library_path()
    try:
        lib = cxx_build.load(out, lambda: build(out))
    except OSError as err:
        raise FastCpuUnavailable(f"loading {out} failed: {err}") from None
    lib.march.restype = ctypes.c_int
    lib.march.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                          ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return lib


def march_sprites(recipe: MandelbulbRecipe, items, max_side: int, num_threads: int | None = None) -> np.ndarray:
    """reference.render_sprites, compiled: (I, max_side, max_side, 4) uint8 premultiplied RGB + alpha."""
    from fractal_pretrain.mandelbulb.renderer import device_items, kernel_flags

    plan = device_items(recipe, items)
    item_i, item_f = np.ascontiguousarray(plan["item_i"]), np.ascontiguousarray(plan["item_f"])
    sprites = np.empty((len(item_i), max_side, max_side, 4), dtype=np.uint8)
    if len(item_i) == 0:
        return sprites
    tiles = mb_march_threads(max_side) // (MB_TILE_ROWS * MB_TILE_COLS)
    failed = load().march(max_side, recipe.supersample, kernel_flags(recipe), item_i.ctypes.data,
                          item_f.ctypes.data, len(item_i), tiles, sprites.ctypes.data,
                          num_threads or available_cores())
    if failed:
        raise RuntimeError("the compiled Mandelbulb march failed in a worker thread")
    return sprites


def render(recipe: MandelbulbRecipe, seed: int, epoch: int, samples, items, size: int, members,
           num_threads: int | None = None) -> np.ndarray:
    """reference.render with the sprites marched by the compiled code: the same (B, size, size, 3) uint8."""
    march = functools.partial(march_sprites, num_threads=num_threads)
    return reference.render(recipe, seed, epoch, samples, items, size, members, march=march)
