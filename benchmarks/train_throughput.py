"""Training throughput: the model-only ceiling vs the same step fed by the on-device fractal renderer.

Side by side in one process, same model, batch and settings (bf16 autocast, channels_last, SGD step):
  * ceiling: a constant random input tensor, as in the project's yardsticks;
  * end_to_end: every step renders a fresh batch of fractal keys with the CuPy renderer first;
  * prefetch: the same, but the next batch renders on a side stream during the step (the data module's way).
Reports images/s of both and their ratio (target >= 0.98), optionally with ``torch.compile``. Both feed the
model the same input dtype (``--dtype``): bfloat16 by default, as the data module renders under bf16
precision on CUDA; float32 is what earlier measurements used (the first convolution then casts it).

    python3 benchmarks/train_throughput.py --archs wide_resnet50_2,resnet50,resnet18 [--compile] [--dtype float32]
    python3 benchmarks/train_throughput.py --archs wide_resnet50_2 --recipe mandelbulbvar --set mode=on_the_fly

``--ofdb``: OFDB-4AD's settings instead (recipe ofdb, 1000 images rendered once at ``--size`` 512 and kept on
the device, batch 128, 224 px crops with the full ``data.augment`` block): the ceiling is the model step on a
constant 224 px input; end to end is the data module's own path per step (gather by the epoch order,
BatchAugmenter, then the step); ``augment_ms_per_batch`` is gather + augmentation alone. Target: ratio >= 0.97.

    python3 benchmarks/train_throughput.py --ofdb --archs resnet50 --batch 128 --size 512

``--simsiam``: the two-view step of ``model.objective: simsiam`` (recipe selfsup: 2B images per batch of B
samples, two backbone passes, projector and predictor, symmetric negative cosine, SGD) fed by the renderer's
two views vs the same step on a constant 2B-image input. images/s count samples (a pair once); targets:
render_share (two-view rendering / end-to-end step) < 0.05, prefetch_ratio >= 0.95.

    python3 benchmarks/train_throughput.py --simsiam --archs resnet50 --batch 512 --size 224

``--device cpu`` runs every path on the CPU with the CPU renderer (compiled C++; the NumPy reference for
Mandelbulb recipes), ``--device emulator`` with the CUDA kernels on the CPU emulator (render/emulator.py:
the device's render path, view bank included): both for tests at tiny sizes (tests/benchmarks), not for
numbers. There, times are wall clock (perf_counter) instead of CUDA events, and what needs a GPU is left
out and null in the row: the side-stream prefetch (``prefetch_img_s``, ``prefetch_ratio``,
``prefetch_samples_s``) and ``peak_gib``. Every row says its ``device``.

    python3 benchmarks/train_throughput.py --device emulator --archs resnet18 --batch 4 --size 32 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from fractal_pretrain.cli_kit import add_set_option, fail
from fractal_pretrain.cli_kit import overrides as overrides_from
from fractal_pretrain.config import ConfigError
from fractal_pretrain.recipes import get_recipe, recipe_family
from fractal_pretrain.render import make_renderer
from fractal_pretrain.train.data import SideStreamPrefetch
from fractal_pretrain.train.model import build_resnet

DEVICES = ("cuda", "cpu", "emulator")  # emulator: the model on the CPU, the renderer's CUDA kernels emulated


def torch_device(device: str) -> str:
    """Where the model and its inputs live: "cuda", or "cpu" for both CPU modes."""
    return "cuda" if device == "cuda" else "cpu"


def bench_renderer(recipe, size: int, device: str):
    """The renderer a benchmark feeds from: CuPy kernels on CUDA, the CPU renderer, or the same kernels on the
    CPU emulator (``emulator``: the device's code path, slowly)."""
    if device != "emulator":
        return make_renderer(recipe, size=size, seed=0, device=device)
    if recipe_family(recipe) == "mandelbulb":
        from fractal_pretrain.mandelbulb.renderer import MandelbulbKernelRenderer

        return MandelbulbKernelRenderer(recipe, size=size, seed=0, emulate=True)
    from fractal_pretrain.render.cupy_renderer import CupyRenderer

    return CupyRenderer(recipe, size=size, seed=0, emulate=True)


def make_prefetch(render, device: str):
    """The data module's side-stream prefetch, on CUDA only (None elsewhere: the row's prefetch fields are null)."""
    return SideStreamPrefetch(render, torch.device("cuda")) if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None


def rate(count: int, seconds: float | None, digits: int = 1) -> float | None:
    return None if seconds is None else round(count / seconds, digits)


def make_step(model, optimizer, device_type: str = "cuda"):
    def step(images, labels):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def classifier_step(arch: str, num_classes: int, compile: bool, device: str = "cuda"):
    """The classification step the runs train: a channels-last ResNet on the GPU, SGD as the configs set it."""
    model = build_resnet(arch, num_classes).to(torch_device(device)).to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return make_step(model, optimizer, torch_device(device))


def constant_input(batch: int, side: int, dtype: str, device: str = "cuda") -> torch.Tensor:
    """The model-only ceiling's input: one random channels-last batch in ``dtype``, reused every step."""
    fixed = torch.randn(batch, 3, side, side, device=torch_device(device)).to(getattr(torch, dtype))
    return fixed.contiguous(memory_format=torch.channels_last)


def timed(fn, steps: int, warmup: int, device: str = "cuda") -> float:
    """Seconds per call of fn(i) after ``warmup`` calls: CUDA events on the GPU, wall clock elsewhere."""
    for i in range(warmup):
        fn(i)
    if device != "cuda":
        start = time.perf_counter()
        for i in range(steps):
            fn(warmup + i)
        return (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        fn(warmup + i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / steps


def bench(arch: str, recipe: str, batch: int, size: int, steps: int, warmup: int, compile: bool,
          dtype: str, overrides: dict | None = None, device: str = "cuda") -> dict:
    torch.manual_seed(0)
    renderer = bench_renderer(get_recipe(recipe, overrides), size, device)
    step = classifier_step(arch, renderer.recipe.num_classes, compile, device)
    fixed = constant_input(batch, size, dtype, device)
    fixed_labels = torch.randint(0, renderer.recipe.num_classes, (batch,), device=torch_device(device))

    def ceiling(i):
        step(fixed, fixed_labels)

    def end_to_end(i):
        images, labels = renderer.render_tensor(np.arange(i * batch, (i + 1) * batch), epoch=0, dtype=dtype,
                                                channels_last=True)
        step(images, labels)

    prefetch = make_prefetch(
        lambda indices, epoch: renderer.render_tensor(indices, epoch, dtype=dtype, channels_last=True), device)

    def end_to_end_prefetch(i):
        pair = prefetch.take(("train", 0, i))
        if pair is None:
            pair = renderer.render_tensor(np.arange(i * batch, (i + 1) * batch), epoch=0,
                                           dtype=dtype, channels_last=True)
        prefetch.schedule(("train", 0, i + 1), np.arange((i + 1) * batch, (i + 2) * batch), 0)
        step(*pair)

    def render_only(i):
        renderer.render_tensor(np.arange(i * batch, (i + 1) * batch), epoch=0, dtype=dtype, channels_last=True)

    reset_peak(device)
    t_ceiling = timed(ceiling, steps, warmup, device)
    t_e2e = timed(end_to_end, steps, warmup, device)
    t_prefetch = timed(end_to_end_prefetch, steps, warmup, device) if prefetch else None
    t_render = timed(render_only, steps, warmup, device)
    return {
        "arch": arch, "recipe": recipe, "overrides": overrides or {}, "batch": batch, "size": size,
        "compile": compile, "dtype": dtype, "device": device,
        "ceiling_img_s": round(batch / t_ceiling, 1), "end_to_end_img_s": round(batch / t_e2e, 1),
        "ratio": round(t_ceiling / t_e2e, 4), "ms_per_step": round(t_e2e * 1000, 2),
        "prefetch_img_s": rate(batch, t_prefetch), "prefetch_ratio": rate(t_ceiling, t_prefetch, 4),
        "render_ms_per_batch": round(t_render * 1000, 3),
        "peak_gib": peak_gib(device),
    }


def bench_ofdb(arch: str, batch: int, size: int, steps: int, warmup: int, compile: bool, dtype: str,
               overrides: dict | None = None, crop: int | None = None, device: str = "cuda") -> dict:
    """The OFDB data path of FractalDataModule (fixed set on the device + augmentation) vs the model alone.

    Off CUDA the data module renders the set with the CPU renderer (``emulator`` included: its trainer is on
    the CPU) and augments on the CPU."""
    import lightning.pytorch as pl

    from fractal_pretrain.train.data import FractalDataModule

    torch.manual_seed(0)
    augment = {"enabled": True, **({"size": crop} if crop else {})}
    data = FractalDataModule("ofdb", recipe_overrides=overrides, size=size, batch_size=batch, val_samples=0,
                             dtype=dtype, augment=augment)
    if data.recipe.fixed_images < batch:  # batches() below would never find a full batch
        raise ConfigError(f"--batch {batch}: the OFDB set has {data.recipe.fixed_images} images, fewer than a batch")
    data.trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                              logger=False, enable_checkpointing=False)
    if device == "cuda":
        setup_start = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        setup_start[0].record()
        data.setup("fit")
        setup_start[1].record()
        torch.cuda.synchronize()
        setup_s = setup_start[0].elapsed_time(setup_start[1]) / 1000
    else:
        setup_s = time.perf_counter()
        data.setup("fit")
        setup_s = time.perf_counter() - setup_s
    crop = data.augment.size
    step = classifier_step(arch, data.num_classes, compile, device)
    fixed = constant_input(batch, crop, dtype, device)
    fixed_targets = F.one_hot(torch.randint(0, data.num_classes, (batch,), device=torch_device(device)),
                              data.num_classes).float()
    loader = data.train_dataloader()

    def batches():
        while True:  # full batches only: the epoch's short last step would time a different shape
            for keys in loader:
                if len(keys["indices"]) == batch:
                    yield keys

    stream = batches()

    def ceiling(i):
        step(fixed, fixed_targets)

    def end_to_end(i):
        step(*data.on_before_batch_transfer(next(stream), 0))

    def augment_only(i):
        data.on_before_batch_transfer(next(stream), 0)

    reset_peak(device)
    t_ceiling = timed(ceiling, steps, warmup, device)
    t_e2e = timed(end_to_end, steps, warmup, device)
    t_augment = timed(augment_only, steps, warmup, device)
    return {
        "arch": arch, "recipe": "ofdb", "overrides": overrides or {}, "batch": batch, "size": size, "crop": crop,
        "compile": compile, "dtype": dtype, "device": device, "set_setup_s": round(setup_s, 2),
        "set_gib": round(data.image_set.nbytes / 2**30, 2),
        "ceiling_img_s": round(batch / t_ceiling, 1), "end_to_end_img_s": round(batch / t_e2e, 1),
        "ratio": round(t_ceiling / t_e2e, 4), "ms_per_step": round(t_e2e * 1000, 2),
        "augment_ms_per_batch": round(t_augment * 1000, 3),
        "augment_share": round(t_augment / t_e2e, 4),
        "peak_gib": peak_gib(device),
    }


def bench_simsiam(arch: str, batch: int, size: int, steps: int, warmup: int, compile: bool, dtype: str,
                  overrides: dict | None = None, device: str = "cuda") -> dict:
    """SimSiam's two-view step fed by the selfsup recipe's views vs the same step on a constant input."""
    from fractal_pretrain.train.objectives import SimSiam

    torch.manual_seed(0)
    renderer = bench_renderer(get_recipe("selfsup", overrides), size, device)
    where = torch_device(device)
    backbone = build_resnet(arch, 2)
    features = backbone.fc.in_features
    backbone.fc = torch.nn.Identity()
    backbone = backbone.to(where).to(memory_format=torch.channels_last)
    objective = SimSiam(features).to(where)
    if compile:
        backbone.compile()
    groups = [{"params": [*backbone.parameters(), *objective.projector.parameters()]},
              {"params": list(objective.predictor.parameters())}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(images, labels):
        view1, view2 = images.chunk(2)
        with torch.autocast(where, dtype=torch.bfloat16):
            loss, _ = objective(backbone, view1, view2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fixed = constant_input(2 * batch, size, dtype, device)
    fixed_labels = torch.zeros(batch, dtype=torch.int64, device=where)

    def render(i):
        return renderer.render_tensor(np.arange(i * batch, (i + 1) * batch), epoch=0, dtype=dtype, channels_last=True)

    prefetch = make_prefetch(
        lambda indices, epoch: renderer.render_tensor(indices, epoch, dtype=dtype, channels_last=True), device)

    def end_to_end_prefetch(i):
        pair = prefetch.take(("train", 0, i)) or render(i)
        prefetch.schedule(("train", 0, i + 1), np.arange((i + 1) * batch, (i + 2) * batch), 0)
        step(*pair)

    reset_peak(device)
    t_ceiling = timed(lambda i: step(fixed, fixed_labels), steps, warmup, device)
    t_e2e = timed(lambda i: step(*render(i)), steps, warmup, device)
    t_prefetch = timed(end_to_end_prefetch, steps, warmup, device) if prefetch else None
    t_render = timed(render, steps, warmup, device)
    return {
        "arch": arch, "recipe": "selfsup", "objective": "simsiam", "overrides": overrides or {}, "batch": batch,
        "views": 2, "size": size, "compile": compile, "dtype": dtype, "device": device,
        "ceiling_samples_s": round(batch / t_ceiling, 1), "end_to_end_samples_s": round(batch / t_e2e, 1),
        "ratio": round(t_ceiling / t_e2e, 4), "prefetch_samples_s": rate(batch, t_prefetch),
        "prefetch_ratio": rate(t_ceiling, t_prefetch, 4), "ms_per_step": round(t_e2e * 1000, 2),
        "render_ms_per_batch": round(t_render * 1000, 3), "render_share": round(t_render / t_e2e, 4),
        "peak_gib": peak_gib(device),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="wide_resnet50_2,resnet50,resnet18")
    parser.add_argument("--recipe", default="fractal4ad")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="model input dtype")
    add_set_option(parser, "recipe override KEY=VALUE (YAML value)")
    parser.add_argument("--ofdb", action="store_true", help="OFDB-4AD settings: fixed set + data.augment (--size 512)")
    parser.add_argument("--simsiam", action="store_true", help="two-view SimSiam step on the selfsup recipe")
    parser.add_argument("--crop", type=int, default=None,
                        help="--ofdb: data.augment.size, the crop side (default: the augment block's 224)")
    parser.add_argument("--device", default="cuda", choices=DEVICES,
                        help="cuda; cpu or emulator (CPU renderer / CUDA kernels emulated) for tests at tiny sizes")
    parser.add_argument("--matmul-precision", default="high", choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision, as fit's --float32_matmul_precision (default high)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except ConfigError as err:  # a bad --set key or value, or sizes that do not fit: one line, status 2
        return fail("train_throughput", err)
    return 0


def run(args) -> None:
    overrides = overrides_from(args.overrides)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision(args.matmul_precision)
    for arch in args.archs.split(","):
        if args.simsiam:
            row = bench_simsiam(arch, args.batch, args.size, args.steps, args.warmup, args.compile, args.dtype,
                                overrides, args.device)
            print(json.dumps(row), flush=True)
            continue
        if args.ofdb:
            row = bench_ofdb(arch, args.batch, args.size, args.steps, args.warmup, args.compile, args.dtype,
                             overrides, args.crop, args.device)
            print(json.dumps(row), flush=True)
            continue
        row = bench(arch, args.recipe, args.batch, args.size, args.steps, args.warmup, args.compile, args.dtype,
                    overrides, args.device)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
