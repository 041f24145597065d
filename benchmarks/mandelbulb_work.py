"""Work per ray of the Mandelbulb ray marcher, counted on the CPU emulator (no GPU needed).

Builds a copy of ``render/kernels/mandelbulb.cu`` with counters added (distance-estimator calls and
fractal iterations, by kind: primary march, orbit traps, normal taps, shadow march), renders a batch with
``MandelbulbKernelRenderer(emulate=True)`` and prints per-ray averages, plus a bound on SIMT efficiency:
mean iterations per ray over the mean of each warp's (its 4 x 8 pixel tile's) largest count. Multiply by
the per-iteration SASS counts of ``benchmarks/sass_loops.py --kernels march_sprites`` for a device
prediction (benchmarks/PENDING_GPU.md, "Mandelbulb ray marcher").

    PYTHONPATH=. python3 benchmarks/mandelbulb_work.py [--recipe mandelbulbvar] [--size 256] [--num 24]

Counts depend little on resolution (per ray); the warp bound does (a warp's tile is a smaller part of
the object at a higher resolution).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

KINDS = ("primary", "traps", "normal", "shadow")
MAX_RAYS = 1 << 22
# (anchor in mandelbulb.cu, text inserted after it): each anchor must occur exactly once.
PROBES = (
    ('#include "common.cuh"\n',
     f"static unsigned long long WORK[16];\nstatic int WORK_KIND = 0;\nstatic float RAY_WORK[{MAX_RAYS}];\n"
     "static long long RAYS = 0;\n"),
    ("  for (int i = 0; i < MB_MAX_ITERATIONS; ++i) {\n    last = r;\n    if (r > MB_BAILOUT) break;\n"
     "    r = iterate<P>(zx, zy, zz, dr, r, cx, cy, cz, rule, textbook);\n", "    WORK[4 + WORK_KIND]++;\n"),
    ("    r = iterate<P>(zx, zy, zz, dr, r, cx, cy, cz, rule, textbook);\n    const float az", None),
    ("  return ((0.5f * log32(last)) * last) / dr;", None),
    ("  float normal[3];\n", "  WORK_KIND = 2;\n"),
    ("    float probe;\n    lit = march<P>", None),
    ("      float probe;\n",
     "      WORK_KIND = 0;\n      const unsigned long long before = WORK[4] + WORK[5] + WORK[6] + WORK[7];\n"),
    ("        const Traps t = traps<P>(", None),
    ("        hits += 1;\n      }\n", "      RAY_WORK[RAYS++ % "
     f"{MAX_RAYS}] = (float)(WORK[4] + WORK[5] + WORK[6] + WORK[7] - before);\n"),
)
# Replacements where a counter must go before the anchor's last line.
BEFORE = {
    PROBES[2][0]: PROBES[2][0].replace("    const float az", "    WORK[5]++;\n    const float az"),
    PROBES[3][0]: "  WORK[WORK_KIND]++;\n" + PROBES[3][0],
    PROBES[5][0]: PROBES[5][0].replace("    lit = march<P>", "    WORK_KIND = 3;\n    lit = march<P>"),
    PROBES[7][0]: "        WORK[1]++;\n" + PROBES[7][0],
}
READER = f"""
extern "C" __global__ void read_work(unsigned long long *out, float *per_ray) {{
  for (int k = 0; k < 16; ++k) out[k] = WORK[k], WORK[k] = 0;
  for (long long k = 0; k < RAYS && k < {MAX_RAYS}; ++k) per_ray[k] = RAY_WORK[k];
  out[15] = RAYS;
  RAYS = 0;
}}
"""


def instrumented_source(source: str) -> str:
    for anchor, after in PROBES:
        if (found := source.count(anchor)) != 1:
            raise SystemExit(f"mandelbulb.cu changed: anchor {anchor.strip()[:60]!r} found {found} times")
        source = source.replace(anchor, BEFORE[anchor] if after is None else anchor + after)
    return source + READER


def main(argv=None) -> None:
    import torch

    from fractal_pretrain.mandelbulb.renderer import MandelbulbKernelRenderer
    from fractal_pretrain.recipes import get_recipe
    from fractal_pretrain.render import emulator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="mandelbulbvar")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--num", type=int, default=24)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mandelbulb_work.cu"
        path.write_text(instrumented_source((emulator.KERNEL_DIR / "mandelbulb.cu").read_text()))
        module = emulator.build_module(path)
    recipe = get_recipe(args.recipe, {"mode": "on_the_fly"})
    renderer = MandelbulbKernelRenderer(recipe, size=args.size, seed=args.seed, emulate=True)
    plain = renderer._kernel
    renderer._kernel = lambda m, name: module.get_function(name) if m == "mandelbulb" else plain(m, name)
    counts = torch.zeros(16, dtype=torch.int64)
    per_ray = torch.zeros(MAX_RAYS, dtype=torch.float32)
    read = module.get_function("read_work")
    indices = np.random.default_rng(args.seed).integers(0, recipe.num_classes * 1000, args.num)
    read((1, 1), (1,), (counts.data_ptr(), per_ray.data_ptr()))
    renderer.render(indices)
    read((1, 1), (1,), (counts.data_ptr(), per_ray.data_ptr()))
    c = counts.numpy()
    rays = int(c[15])
    print(f"{args.recipe}, {args.size} px, {args.num} images: {rays} rays ({rays / args.num:.0f} per image), "
          f"hit fraction {c[1] / rays:.3f}")
    print("| kind | DE calls per ray | iterations per ray | iterations per DE call |\n|---|---|---|---|")
    for k, kind in enumerate(KINDS):
        print(f"| {kind} | {c[k] / rays:.2f} | {c[4 + k] / rays:.2f} | {c[4 + k] / max(c[k], 1):.2f} |")
    print(f"| all | {c[:4].sum() / rays:.2f} | {c[4:8].sum() / rays:.2f} | {c[4:8].sum() / max(c[:4].sum(), 1):.2f} |")
    work = per_ray.numpy()[:min(rays, MAX_RAYS)]
    warps = work[: len(work) // 32 * 32].reshape(-1, 32)
    print(f"SIMT bound: mean iterations per ray {work.mean():.1f} / mean warp maximum {warps.max(axis=1).mean():.1f}"
          f" = {work.mean() / warps.max(axis=1).mean():.2f}")


if __name__ == "__main__":
    main()
