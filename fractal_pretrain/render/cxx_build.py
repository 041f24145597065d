"""Host C++ builds cached on disk: the one place the compiled CPU renderers and the CUDA emulator name,
build and load their shared libraries.

A build's file name hashes everything that decides its bytes or whether it loads: the source texts, the
compiler (its path and the first line of its ``--version``), the flags and defines, the machine's
architecture and its C library (``platform.libc_ver()``). A cache in a ``$HOME`` shared by cluster nodes
that differ in any of these (x86 and ARM, an older glibc, another module-loaded ``g++`` on the same
``PATH`` name) then holds one build per kind of node instead of one that some nodes cannot load. A cached
build that still does not load (cut short, or built where the name missed a difference) is rebuilt once in
place and loaded again; the caller falls back only when that fails too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def compiler() -> str | None:
    """The host C++ compiler ($CXX or g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


@functools.cache
def compiler_identity(cxx: str) -> str:
    """The first line of ``cxx --version`` (once per process and compiler): two g++ found at one path by
    different nodes (environment modules) differ here. Empty where it does not answer: the build says why."""
    try:
        result = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((line.strip() for line in result.stdout.splitlines() if line.strip()), "")


def library_path(folder: Path, name: str, cxx: str, texts: Sequence[str], options: Sequence[str]) -> Path:
    """``folder/name-<hash>.so``: where the build of these source texts with this compiler, these options
    (flags and defines) on this kind of machine lives (it may not exist yet)."""
    libc, libc_version = platform.libc_ver()
    key = [*texts, cxx, compiler_identity(cxx), platform.machine(), libc, libc_version, *options]
    return folder / f"{name}-{hashlib.sha256(chr(0).join(key).encode()).hexdigest()[:16]}.so"


def build(out: Path, command: Sequence[str], unit: str | None = None) -> subprocess.CompletedProcess:
    """Run the compiler ``command`` (compiler, options, sources; ``unit``, when given, is a source text
    written to a ``.cpp`` file appended to them) with ``-o`` a file beside ``out``, moved to ``out`` only
    when it succeeds. The caller judges the result (its return code and stderr)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        sources = []
        if unit is not None:
            sources = [Path(tmp) / f"{out.stem}.cpp"]
            sources[0].write_text(unit)
        lib = Path(tmp) / out.name
        result = subprocess.run([*command, *map(str, sources), "-o", str(lib)], capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(lib, out)  # atomic: a concurrent build of the same key writes the same bytes
    return result


def load(out: Path, rebuild: Callable[[], object]) -> ctypes.CDLL:
    """``out`` loaded, built first by ``rebuild`` where it is missing. A cached build that does not load
    (ctypes' OSError: GLIBC_x.y not found, wrong ELF class, a truncated file) is rebuilt once in place and
    loaded again; ``rebuild``'s error, or the second load's OSError, is the caller's to report."""
    if out.exists():
        try:
            return ctypes.CDLL(str(out))
        except OSError:
            pass  # a build this node cannot load: replace it with its own
    rebuild()
    return ctypes.CDLL(str(out))


def once_per_process(failure: type[Exception]):
    """``functools.cache`` for a no-argument loader that also keeps its ``failure``: a build that failed is
    not retried by every renderer of the process (each try costs a compiler run, and the caller already
    said once that it falls back)."""

    def wrap(loader: Callable[[], object]):
        @functools.cache
        def outcome() -> tuple[object, Exception | None]:
            try:
                return loader(), None
            except failure as err:
                return None, err

        @functools.wraps(loader)
        def cached():
            value, err = outcome()
            if err is not None:
                raise failure(*err.args)
            return value

        cached.cache_clear = outcome.cache_clear
        return cached

    return wrap
