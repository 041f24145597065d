"""Fractal rendering throughput: GPU images/s per recipe, and CPU images/s per core and on all cores.

GPU: CUDA-event timing of ``CupyRenderer.render_tensor`` (uint8, channels_last) after warm-up, at
256x256, batch 512, 100k points per fractal (the recipe defaults). CPU (``--device cpu``): per recipe, side
by side, the NumPy reference (``cpu-reference``, one core), the compiled renderer on one thread (per core)
and on every core (``--threads``); best of ``--trials`` timings (the development machine is shared), with
images per CPU-second (all threads' CPU time: what a core makes when other processes take turns on it) and
the 1-minute load average. Two-view recipes (``selfsup``) count a sample (two views of one fractal) once in
``images_per_s`` and add ``view_images_per_s``.
``--device cpu-reference`` times the reference alone.

    python3 benchmarks/render_throughput.py --device cuda [--recipes anderson,...] [--batch 512] [--profile]
    OMP_NUM_THREADS=1 python3 benchmarks/render_throughput.py --device cpu --batch 8 --size 256
    python3 benchmarks/render_throughput.py --recipes mandelbulbvar,multimandelbulb --set mode=on_the_fly

Mandelbulb rows (GPU) add ``setup_s`` (renderer construction: the whole view bank in view_bank mode; the
kernels are compiled before, by one on-the-fly image) and ``rays_per_s`` (primary rays: pixels of every
object x supersample^2): on the fly, those of the timed batches; in view_bank mode, those of the bank's views
over ``setup_s`` (a sample there marches no ray).

Every row also has ``digest``: a hash of the uint8 images of keys 0..63 (epoch 0), so that rows of
different versions of the renderer (``--label``, benchmarks/kernel_versions.sh) show whether they draw the
same images.

``--device emulator`` runs the GPU rows' code with the CUDA kernels on the CPU emulator (render/emulator.py),
timed by the wall clock: for tests at tiny sizes (tests/benchmarks), not for numbers; ``kernel_ms`` (needs
CUPTI) is null there.

The ``versions`` stage runs this script against older copies of the package (.bench-versions): the GPU path
may use only what every one of them has (get_recipe, make_renderer(recipe, size, seed, device), render,
render_tensor, use_shared), and newer names are imported where they are needed, with a fallback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np

from fractal_pretrain.recipes import get_recipe, list_recipes
from fractal_pretrain.render import make_renderer


def recipe_family(recipe) -> str:
    """"ifs" or "mandelbulb"; "ifs" in package versions from before the Mandelbulb recipes."""
    try:
        from fractal_pretrain.recipes import recipe_family as family
    except ImportError:
        return "ifs"
    return family(recipe)


def ifs_recipes() -> str:
    """The default --recipes: every IFS recipe (older versions list only those, and take no family)."""
    try:
        return ",".join(list_recipes("ifs"))
    except TypeError:
        return ",".join(list_recipes())


def emulated_renderer(recipe, size: int):
    """The CUDA kernels of this recipe on the CPU emulator, as ``--device cuda`` would run them."""
    if recipe_family(recipe) == "mandelbulb":
        from fractal_pretrain.mandelbulb.renderer import MandelbulbKernelRenderer

        return MandelbulbKernelRenderer(recipe, size=size, seed=0, emulate=True)
    from fractal_pretrain.render.cupy_renderer import CupyRenderer

    return CupyRenderer(recipe, size=size, seed=0, emulate=True)


def bench_gpu(renderer, batch: int, repeats: int, warmup: int = 3, cuda: bool = True) -> float:
    """Seconds per batch: CUDA events, or the wall clock for the emulator (``cuda=False``)."""
    import torch

    for i in range(warmup):
        renderer.render_tensor(np.arange(batch) + i * batch, channels_last=True)
    if not cuda:
        start = time.perf_counter()
        for i in range(repeats):
            renderer.render_tensor(np.arange(batch) + (i + warmup) * batch, channels_last=True)
        return (time.perf_counter() - start) / repeats
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


def bench_cpu(renderer, batch: int, repeats: int, trials: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds per batch: the best of `trials` means over `repeats` batches each (other load on a
    shared machine only slows a trial down). CPU seconds are the process's, all threads together."""
    renderer.render(np.arange(batch))  # warm-up (bank cache, allocations)
    wall = cpu = float("inf")
    for _ in range(trials):
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(repeats):
            renderer.render(np.arange(batch) + (i + 1) * batch)
        wall = min(wall, (time.perf_counter() - start) / repeats)
        cpu = min(cpu, (time.process_time() - start_cpu) / repeats)
    return wall, cpu


def cpu_variants(device: str, threads: list[int]) -> list[tuple[str, int]]:
    """(device, threads) of the CPU rows: the reference on one core, the compiled renderer per thread count."""
    if device == "cpu-reference":
        return [("cpu-reference", 1)]
    return [("cpu-reference", 1)] + [("cpu", t) for t in threads]


def view_images(recipe, samples_per_s: float) -> dict:
    """Two-view recipes: images_per_s counts samples (a pair of views once); this adds the views made per second."""
    views = getattr(recipe, "views", 0)
    return {"view_images_per_s": round(views * samples_per_s, 1)} if views else {}


def uses_view_bank(recipe) -> bool:
    return recipe_family(recipe) == "mandelbulb" and getattr(recipe, "mode", None) == "view_bank"


def warm_ray_marcher(recipe, device: str) -> None:
    """One on-the-fly image at 8 px: the ray marcher is compiled (NVRTC, or the emulator's build) before the
    bank's setup is timed."""
    import dataclasses

    small = dataclasses.replace(recipe, mode="on_the_fly")
    warm = emulated_renderer(small, 8) if device == "emulator" else make_renderer(small, size=8, seed=0, device=device)
    warm.render_tensor(np.arange(1))


def bank_rays(renderer) -> int:
    """Primary rays marched to build the view bank: views x side^2 x supersample^2."""
    views, side = renderer.bank.shape[:2]
    return views * side * side * renderer.recipe.supersample ** 2


def base_row(args, name: str, device: str, overrides: dict) -> dict:
    row = {"recipe": name, "device": device, "size": args.size, "batch": args.batch}
    if overrides:
        row["overrides"] = overrides
    if args.label:
        row["version"] = args.label
    return row


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda",
                        help="cuda | cuda:N | cpu | cpu-reference | emulator (the GPU rows on the CPU emulator)")
    parser.add_argument("--recipes", default=ifs_recipes())
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--trials", type=int, default=3, help="CPU: best of this many timings")
    parser.add_argument("--threads", default="1,all", help="CPU: thread counts of the compiled renderer rows")
    parser.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (YAML value)")
    parser.add_argument("--profile", action="store_true", help="GPU: also ms per batch of every kernel")
    parser.add_argument("--label", default="", help="a name for the renderer version, copied into every row")
    args = parser.parse_args(argv)
    import yaml

    overrides = dict((kv.split("=", 1)[0], yaml.safe_load(kv.split("=", 1)[1])) for kv in args.set)
    rows = []
    for name in args.recipes.split(","):
        recipe = get_recipe(name, overrides)
        if args.device.startswith("cpu"):
            from fractal_pretrain.render.fast_cpu import available_cores

            threads = [available_cores() if t == "all" else int(t) for t in args.threads.split(",")]
            bank = None
            for device, count in cpu_variants(args.device, threads):
                renderer = make_renderer(recipe, size=args.size, seed=0, device=device, bank=bank,
                                         num_threads=count if device == "cpu" else None)
                bank = getattr(renderer, "bank", None) if recipe_family(recipe) == "ifs" else None
                seconds, cpu_seconds = bench_cpu(renderer, args.batch, args.repeats, args.trials)
                rows.append(emit({**base_row(args, name, device, overrides), "threads": count,
                                  "ms_per_batch": round(seconds * 1e3, 3),
                                  "images_per_s": round(args.batch / seconds, 1),
                                  "images_per_s_per_core": round(args.batch / seconds / count, 1),
                                  "images_per_cpu_s": round(args.batch / cpu_seconds, 1),
                                  **view_images(recipe, args.batch / seconds),
                                  "load": round(os.getloadavg()[0], 1),
                                  "digest": image_digest(renderer)}))
            continue
        cuda = args.device != "emulator"
        if uses_view_bank(recipe):
            warm_ray_marcher(recipe, args.device)
        setup = time.perf_counter()
        if cuda:
            renderer = make_renderer(recipe, size=args.size, seed=0, device=args.device)
            import torch

            torch.cuda.synchronize()
        else:
            renderer = emulated_renderer(recipe, args.size)
        setup = time.perf_counter() - setup
        seconds = bench_gpu(renderer, args.batch, args.repeats, cuda=cuda)
        row = {**base_row(args, name, args.device, overrides), "ms_per_batch": round(seconds * 1e3, 3),
               "images_per_s": round(args.batch / seconds, 1), "digest": image_digest(renderer)}
        if recipe_family(recipe) == "mandelbulb":
            row["setup_s"] = round(setup, 2)
            if recipe.mode == "on_the_fly":
                _, items = renderer.plan(np.arange(args.batch), 0)
                rays = int((items.side[items.active] ** 2).sum()) * recipe.supersample ** 2
                row["rays_per_s"] = round(rays / seconds)
            else:
                row["rays_per_s"] = round(bank_rays(renderer) / setup)
        else:
            row["shared_histogram"] = bool(renderer.use_shared)
        if args.profile:
            row["kernel_ms"] = kernel_ms(renderer, args.batch) if cuda else None
        rows.append(emit(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
