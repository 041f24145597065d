"""The CUDA kernels on the CPU: their semantics tested where there is no GPU (CI, laptops).

``load_module("chaos")`` compiles ``kernels/chaos.cu`` (``build_module(path)`` any ``.cu`` file) with
the host C++ compiler against ``emulator_runtime.h`` (every CUDA thread a fiber, blocks in sequence; see
that header for what is and is not emulated) and returns an object used like ``cupy.RawModule``:
``get_function(name)`` gives a kernel called as ``kernel(grid, block, args, shared_mem=...)`` with the
same numpy-scalar arguments (device pointers become host pointers of CPU tensors). Builds are cached by content hash
(``cxx_build``: one per compiler and kind of machine; a cached build that does not load is rebuilt once).

The emulator reproduces the kernels' float32 results bit for bit (no contraction, IEEE division and
square root, as NVRTC with ``--fmad=false``), so ``CupyRenderer(..., emulate=True)`` must give the NumPy
reference's images exactly. It says nothing about speed: a 20k-point 64 px fractal takes ~30 ms.
Launch options expose two classes of kernel bug a sequential run would hide: ``reverse=True`` resumes a
block's threads in the opposite order (a result that changes has a race) and ``poison`` is the byte
shared memory starts with (a result that changes reads shared memory it never wrote); ``ftz=True`` flushes
float32 denormals to zero, as the GPU build does (CuPy appends ``-ftz=true``): a result that changes would
differ between the GPU and the NumPy reference. A third class,
out-of-bounds and freed-memory accesses, is caught by building with AddressSanitizer: run a process
with ``asan_environment()`` (tests/fractal_pretrain/test_emulator_asan.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import re
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fractal_pretrain.cache import cache_root
from fractal_pretrain.render import cxx_build
from fractal_pretrain.render.cxx_build import compiler

RENDER_DIR = Path(__file__).resolve().parent
KERNEL_DIR = RENDER_DIR / "kernels"
RUNTIME_HEADER = RENDER_DIR / "emulator_runtime.h"
CXX_FLAGS = (
    "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-fvisibility=hidden",
    "-fno-gnu-unique", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable",
)
# Set to 1 to build kernels with AddressSanitizer: every out-of-bounds access of a kernel aborts with a
# report. The Python process must then run with the ASan runtime preloaded (see asan_environment()).
SANITIZE_ENV = "FRACTAL_EMULATOR_ASAN"
ASAN_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")

# Parameter types the launchers accept: struct format of one argument of that C type.
SCALAR_FORMATS = {
    "int": "i", "unsigned": "I", "unsigned int": "I", "u32": "I", "long long": "q", "unsigned long long": "Q",
    "u64": "Q", "size_t": "Q", "float": "f", "double": "d",
}
POINTER_FORMAT = "Q"

_launch_lock = threading.Lock()  # one runtime per library: launches never overlap


class EmulatorError(RuntimeError):
    """A kernel could not be built or failed while running on the emulator."""


@dataclass(frozen=True)
class Param:
    ctype: str
    name: str

    @property
    def fmt(self) -> str:
        return POINTER_FORMAT if "*" in self.ctype else SCALAR_FORMATS[self.ctype.replace("const ", "").strip()]


def cxx_flags() -> tuple[str, ...]:
    return CXX_FLAGS + (ASAN_FLAGS if os.environ.get(SANITIZE_ENV) == "1" else ())


def asan_environment() -> dict[str, str]:
    """Environment for a subprocess whose emulated kernels run under AddressSanitizer."""
    cxx = compiler()
    if cxx is None:
        raise EmulatorError("no C++ compiler: AddressSanitizer needs g++'s libasan")
    runtime = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return {**os.environ, SANITIZE_ENV: "1", "LD_PRELOAD": runtime,
            "ASAN_OPTIONS": "detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=0"}


def cache_dir() -> Path:
    return cache_root() / "emulator"


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([\w\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+([\w\s]+?)\s+(\w+)\s*((?:\[[^\]]+\])*)\s*;")
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')


def translate(source: str) -> tuple[str, dict[str, list[Param]]]:
    """Rewrites __shared__ declarations for the runtime and parses the kernels' signatures."""
    source = _EXTERN_SHARED.sub(lambda m: f"{m[1]} *{m[2]} = ({m[1]} *)emu::dynamic_shared();", source)
    counter = itertools.count()
    source = _STATIC_SHARED.sub(
        lambda m: f"auto &{m[2]} = *emu::static_shared<{m[1]}{m[3]}>({next(counter)}u);", source)
    kernels = {}
    for name, params in _KERNEL.findall(source):
        parsed = []
        for raw in params.split(",") if params.strip() not in ("", "void") else []:
            m = re.fullmatch(r"\s*(.*?[\s*])(\w+)\s*", raw)
            if m is None:
                raise EmulatorError(f"kernel {name}: cannot parse parameter {raw.strip()!r}")
            param = Param(" ".join(m[1].split()), m[2])
            try:
                param.fmt  # noqa: B018 - validates the type
            except KeyError:
                raise EmulatorError(f"kernel {name}: parameter type {param.ctype!r} is not supported") from None
            parsed.append(param)
        kernels[name] = parsed
    return source, kernels


def launcher_source(name: str, params: list[Param]) -> str:
    """C++ entry point that unpacks a CUDA-style argument array and runs the kernel on the runtime."""
    call = ", ".join(f"*({p.ctype} *)args[{i}]" for i, p in enumerate(params))
    return f"""
extern "C" __attribute__((visibility("default"))) int emu_launch_{name}(
    unsigned grid_x, unsigned grid_y, unsigned block, unsigned long long shared, unsigned poison, int reverse,
    int ftz, void **args, char *error, unsigned long long error_len) {{
  std::string e = emu::launch(grid_x, grid_y, block, shared, (unsigned char)poison, reverse != 0, ftz != 0,
                              [&] {{ {name}({call}); }});
  snprintf(error, error_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}}
"""


def _load(path: Path) -> tuple[ctypes.CDLL, dict[str, list[Param]]]:
    """The ``.cu`` file translated, built (cached on disk, ``cxx_build``) and loaded, and its kernels' parameters."""
    cxx = compiler()
    if cxx is None:
        raise EmulatorError("no C++ compiler (set CXX or install g++): the CUDA emulator cannot build kernels")
    source, kernels = translate(path.read_text())
    # #line: compiler errors and sanitizer reports name the .cu file and its lines
    unit = f'#include "emulator_runtime.h"\n#line 1 "{path}"\n' + source + "".join(
        launcher_source(k, p) for k, p in kernels.items())
    from fractal_pretrain.render.kernel_constants import define_options

    options = [*cxx_flags(), *define_options()]  # the defines: the constants shared with Python, as for NVRTC
    out = cxx_build.library_path(cache_dir(), path.stem, cxx, [unit, (KERNEL_DIR / "common.cuh").read_text(),
                                                                RUNTIME_HEADER.read_text()], options)

    def build() -> None:
        result = cxx_build.build(out, [cxx, *options, f"-I{RENDER_DIR}", f"-I{KERNEL_DIR}", f"-I{path.parent}"], unit)
        if result.returncode != 0:
            raise EmulatorError(f"building {path} for the CPU failed:\n{result.stderr[-4000:]}")

    return cxx_build.load(out, build), kernels


_options = threading.local()


@contextlib.contextmanager
def launch_options(*, reverse: bool = False, poison: int = 0xCD, ftz: bool = False):
    """Thread order, shared-memory poison byte and denormal flushing (``ftz``: as CuPy's builds on the GPU,
    x86 only) of the launches inside the ``with`` block."""
    if not 0 <= poison <= 255:
        raise ValueError(f"poison={poison}: must be a byte value 0..255")
    previous = getattr(_options, "value", None)
    _options.value = (bool(reverse), int(poison), bool(ftz))
    try:
        yield
    finally:
        _options.value = previous


def _dims(value, what: str, most: int) -> tuple[int, ...]:
    """A CuPy grid or block (int or tuple) as `most` sizes; higher dimensions must be 1."""
    dims = [int(d) for d in (value if isinstance(value, tuple | list) else (value,))]
    if any(d != 1 for d in dims[most:]):
        raise EmulatorError(f"{what}={value}: the emulator runs blocks of one dimension and grids of at most two")
    return tuple((dims + [1] * most)[:most])


# CUDA's grid limits (every architecture since sm_30): a launch beyond them fails on a GPU.
MAX_GRID = (2**31 - 1, 65535, 65535)


def check_grid(grid) -> None:
    """A grid a GPU would refuse is an error here too (the emulator itself could run it)."""
    dims = [int(d) for d in (grid if isinstance(grid, tuple | list) else (grid,))]
    for axis, (d, most) in enumerate(zip(dims, MAX_GRID, strict=False)):
        if not 1 <= d <= most:
            raise EmulatorError(f"grid={tuple(dims)}: gridDim.{'xyz'[axis]}={d} is not in 1..{most} (CUDA's limit)")


class EmulatedKernel:
    """One kernel of an emulated module, called like a CuPy RawKernel."""

    def __init__(self, lib: ctypes.CDLL, name: str, params: list[Param]):
        self.name, self.params = name, params
        self.max_dynamic_shared_size_bytes = 48 * 1024  # as on a GPU: raise it for a larger dynamic size
        self._fn = getattr(lib, f"emu_launch_{name}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_uint,
                             ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulonglong]

    def _pack(self, args) -> tuple:
        if len(args) != len(self.params):
            raise EmulatorError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        buffers = []
        for param, value in zip(self.params, args, strict=True):
            size = struct.calcsize(param.fmt)
            if isinstance(value, np.generic) and value.nbytes != size:
                raise EmulatorError(f"kernel {self.name}: argument {param.name} ({param.ctype}) is "
                                    f"{value.dtype} ({value.nbytes} bytes), expected {size} bytes")
            self._check_scalar_type(param, value)
            scalar = value.item() if isinstance(value, np.generic) else value
            buffers.append(ctypes.create_string_buffer(struct.pack(param.fmt, scalar), size))
        pointers = (ctypes.c_void_p * len(buffers))(*(ctypes.addressof(b) for b in buffers))
        return pointers, buffers

    def _check_scalar_type(self, param: Param, value) -> None:
        """A value CuPy would pass with other bytes than the parameter's is an error here too: CuPy sends a
        NumPy scalar as its own dtype and a Python int, float or bool as int64, float64 or bool (it never
        looks at the kernel's signature), so only a NumPy scalar of the parameter's kind is safe. Pointers
        may be any 8-byte integer (``backend.ptr``, or a Python int: int64)."""
        if "*" in param.ctype:
            return
        kind = "f" if param.fmt in "fd" else "iu"
        if not isinstance(value, np.generic) or value.dtype.kind not in kind:
            what = f"a Python {type(value).__name__}" if not isinstance(value, np.generic) else str(value.dtype)
            want = "np.float32" if param.fmt == "f" else ("np.float64" if param.fmt == "d" else "a NumPy integer")
            raise EmulatorError(f"kernel {self.name}: argument {param.name} ({param.ctype}) is {what}, which CuPy "
                                f"would not pass as {param.ctype}; pass {want} of {struct.calcsize(param.fmt)} bytes")

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        check_grid(grid)
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise EmulatorError(f"kernel {self.name}: {shared_mem} bytes of dynamic shared memory exceed "
                                f"max_dynamic_shared_size_bytes={self.max_dynamic_shared_size_bytes}")
        reverse, poison, ftz = getattr(_options, "value", None) or (False, 0xCD, False)
        pointers, _keep = self._pack(args)
        error = ctypes.create_string_buffer(512)
        with _launch_lock:
            rc = self._fn(*_dims(grid, "grid", 2), *_dims(block, "block", 1), shared_mem, poison, int(reverse),
                          int(ftz), pointers, error, len(error))
        if rc != 0:
            raise EmulatorError(f"kernel {self.name}: {error.value.decode()}")


class EmulatedModule:
    def __init__(self, source: Path):
        self._lib, self._kernels = _load(source)
        self._functions: dict[str, EmulatedKernel] = {}

    def get_function(self, name: str) -> EmulatedKernel:
        if name not in self._kernels:
            raise EmulatorError(f"no kernel {name!r}; kernels: {', '.join(sorted(self._kernels))}")
        if name not in self._functions:
            self._functions[name] = EmulatedKernel(self._lib, name, self._kernels[name])
        return self._functions[name]


@functools.cache
def build_module(source: Path) -> EmulatedModule:
    """A ``.cu`` file built for the CPU (cached on disk by content, in memory per process)."""
    return EmulatedModule(Path(source).resolve())


def load_module(name: str) -> EmulatedModule:
    """The renderer's ``kernels/<name>.cu`` built for the CPU."""
    return build_module(KERNEL_DIR / f"{name}.cu")
