"""The project's one cache folder: ``$FRACTAL_PRETRAIN_CACHE``, else ``~/.cache/fractal_pretrain``.

Everything kept between processes lives in a subfolder of it: ``banks/`` (IFS system banks),
``emulator/``, ``fast_cpu/`` and ``mandelbulb_cpu/`` (compiled kernels, named by content hash, machine,
C library and compiler). Deleting it loses nothing but time.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FRACTAL_PRETRAIN_CACHE"


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "fractal_pretrain"
