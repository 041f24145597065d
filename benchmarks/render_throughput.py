"""Fractal rendering throughput: GPU images/s per recipe, and reference images/s per CPU core.

GPU: CUDA-event timing of ``CupyRenderer.render_tensor`` (uint8, channels_last) after warm-up, at
256x256, batch 512, 100k points per fractal (the recipe defaults). CPU: the NumPy reference on one
process (``OMP_NUM_THREADS=1``), small batches, reported per core.

    python3 benchmarks/render_throughput.py --device cuda [--recipes anderson,...] [--batch 512] [--profile]
    OMP_NUM_THREADS=1 python3 benchmarks/render_throughput.py --device cpu --batch 8 --repeats 2
    python3 benchmarks/render_throughput.py --recipes mandelbulbvar,multimandelbulb --set mode=on_the_fly

Mandelbulb rows add ``setup_s`` (renderer construction: the whole view bank in view_bank mode) and, on
the fly, ``rays_per_s`` (primary rays: pixels of every object x supersample^2).

Every row also has ``digest``: a hash of the uint8 images of keys 0..63 (epoch 0), so that rows of
different versions of the renderer (``--label``, benchmarks/kernel_versions.sh) show whether they draw the
same images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np

from fractal_pretrain.recipes import get_recipe, list_recipes, recipe_family
from fractal_pretrain.render import make_renderer


def bench_gpu(renderer, batch: int, repeats: int, warmup: int = 3) -> float:
    import torch

    for i in range(warmup):
        renderer.render_tensor(np.arange(batch) + i * batch, channels_last=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(repeats):
        renderer.render_tensor(np.arange(batch) + (i + warmup) * batch, channels_last=True)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / repeats


def kernel_ms(renderer, batch: int, repeats: int = 5) -> dict[str, float]:
    """Device time per batch of every kernel (CUPTI through torch.profiler: CuPy's launches included)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(repeats):
            renderer.render_tensor(np.arange(batch) + i * batch, channels_last=True)
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if total > 0:
            times[event.key] = round(total / 1e3 / repeats, 3)
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def image_digest(renderer, count: int = 64) -> str:
    """First 12 hex digits of the sha1 of the uint8 images of keys 0..count-1, epoch 0."""
    return hashlib.sha1(renderer.render(np.arange(count), 0).images.tobytes()).hexdigest()[:12]


def bench_cpu(renderer, batch: int, repeats: int) -> float:
    renderer.render(np.arange(batch))  # warm-up (bank cache, allocations)
    start = time.perf_counter()
    for i in range(repeats):
        renderer.render(np.arange(batch) + (i + 1) * batch)
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--recipes", default=",".join(list_recipes("ifs")))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (YAML value)")
    parser.add_argument("--profile", action="store_true", help="GPU: also ms per batch of every kernel")
    parser.add_argument("--label", default="", help="a name for the renderer version, copied into every row")
    args = parser.parse_args(argv)
    import yaml

    overrides = dict((kv.split("=", 1)[0], yaml.safe_load(kv.split("=", 1)[1])) for kv in args.set)
    rows = []
    for name in args.recipes.split(","):
        setup = time.perf_counter()
        renderer = make_renderer(get_recipe(name, overrides), size=args.size, seed=0, device=args.device)
        if args.device != "cpu":
            import torch

            torch.cuda.synchronize()
        setup = time.perf_counter() - setup
        if args.device == "cpu":
            seconds = bench_cpu(renderer, args.batch, args.repeats)
        else:
            seconds = bench_gpu(renderer, args.batch, args.repeats)
        row = {"recipe": name, "device": args.device, "size": args.size, "batch": args.batch,
               "ms_per_batch": round(seconds * 1e3, 3), "images_per_s": round(args.batch / seconds, 1)}
        if overrides:
            row["overrides"] = overrides
        if args.label:
            row["version"] = args.label
        row["digest"] = image_digest(renderer)
        recipe = renderer.recipe
        if recipe_family(recipe) == "mandelbulb":
            row["setup_s"] = round(setup, 2)
            if recipe.mode == "on_the_fly":
                _, items = renderer.plan(np.arange(args.batch), 0)
                rays = int((items.side[items.active] ** 2).sum()) * recipe.supersample ** 2
                row["rays_per_s"] = round(rays / seconds)
        elif args.device != "cpu":
            row["shared_histogram"] = bool(renderer.use_shared)
            if args.profile:
                row["kernel_ms"] = kernel_ms(renderer, args.batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
