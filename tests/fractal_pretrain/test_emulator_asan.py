"""The CUDA kernels stay inside their buffers: every recipe and code path rendered on the emulator built
with AddressSanitizer (a subprocess with the ASan runtime preloaded), which aborts on any out-of-bounds
or freed-memory access of a kernel and names the .cu line. A read past a buffer that happens not to
change an image (so the agreement tests pass) still faults here, as it could on a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fractal_pretrain.render import emulator

pytestmark = pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler for the CUDA emulator")

SCRIPT = """
import numpy as np
from fractal_pretrain.recipes import get_recipe, list_recipes
from fractal_pretrain.render.cupy_renderer import CupyRenderer

many_maps = {"min_maps": 5, "max_maps": 8}  # map choices stored at 4 bits per step
cases = [(name, 48, False, {}) for name in list_recipes("ifs")] + [
    ("anderson", 48, True, {}), ("anderson", 260, False, {}), ("anderson", 48, False, many_maps)]
for name, size, force_global, overrides in cases:
    recipe = get_recipe(name, {"num_classes": 10, "num_points": 1000, **overrides})
    renderer = CupyRenderer(recipe, size=size, seed=1, emulate=True, force_global_histogram=force_global)
    images, _ = renderer.render_tensor(np.arange(3), dtype="float32")
    images, _ = renderer.render_tensor(np.arange(3), dtype="bfloat16", channels_last=True)
    images, _ = renderer.render_tensor(np.arange(3), dtype="uint8", channels_last=True)
    print("ok", name, size, force_global, flush=True)
from fractal_pretrain.mandelbulb.renderer import MandelbulbKernelRenderer
small = {"rules": [42, 506, 413], "num_classes": 10, "bank_views": 2, "shadow": False}
cases = (("mandelbulbvar", "on_the_fly"), ("multimandelbulb", "on_the_fly"), ("multimandelbulb", "view_bank"))
for name, mode in cases:
    recipe = get_recipe(name, {**small, "num_classes": 51 if name == "mandelbulbvar" else 10, "mode": mode,
                               "background": "plasma"})
    MandelbulbKernelRenderer(recipe, size=12, seed=1, emulate=True).render_tensor(np.arange(3), dtype="float32")
    print("ok", name, mode, flush=True)
"""


def test_kernels_never_touch_memory_outside_their_buffers(tmp_path):
    env = {**emulator.asan_environment(), "FRACTAL_PRETRAIN_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ERROR: AddressSanitizer" not in result.stderr, result.stderr[-6000:]
    from fractal_pretrain.recipes import list_recipes

    expected = len(list_recipes("ifs")) + 3 + 3  # every IFS recipe, the three anderson paths, three Mandelbulb cases
    assert result.stdout.count("ok ") == expected, result.stdout
