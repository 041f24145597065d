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
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render import make_renderer
from fractal_pretrain.train.data import SideStreamPrefetch
from fractal_pretrain.train.model import build_resnet


def make_step(model, optimizer):
    def step(images, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def classifier_step(arch: str, num_classes: int, compile: bool):
    """The classification step the runs train: a channels-last ResNet on the GPU, SGD as the configs set it."""
    model = build_resnet(arch, num_classes).cuda().to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return make_step(model, optimizer)


def constant_input(batch: int, side: int, dtype: str) -> torch.Tensor:
    """The model-only ceiling's input: one random channels-last batch in ``dtype``, reused every step."""
    fixed = torch.randn(batch, 3, side, side, device="cuda").to(getattr(torch, dtype))
    return fixed.contiguous(memory_format=torch.channels_last)


def timed(fn, steps: int, warmup: int) -> float:
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        fn(warmup + i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / steps


def bench(arch: str, recipe: str, batch: int, size: int, steps: int, warmup: int, compile: bool,
          dtype: str, overrides: dict | None = None) -> dict:
    torch.manual_seed(0)
    renderer = make_renderer(get_recipe(recipe, overrides), size=size, seed=0, device="cuda")
    step = classifier_step(arch, renderer.recipe.num_classes, compile)
    fixed = constant_input(batch, size, dtype)
    fixed_labels = torch.randint(0, renderer.recipe.num_classes, (batch,), device="cuda")

    def ceiling(i):
        step(fixed, fixed_labels)

    def end_to_end(i):
        images, labels = renderer.render_tensor(np.arange(i * batch, (i + 1) * batch), epoch=0, dtype=dtype,
                                                channels_last=True)
        step(images, labels)

    prefetch = SideStreamPrefetch(
        lambda indices, epoch: renderer.render_tensor(indices, epoch, dtype=dtype, channels_last=True),
        torch.device("cuda"))

    def end_to_end_prefetch(i):
        pair = prefetch.take(("train", 0, i))
        if pair is None:
            pair = renderer.render_tensor(np.arange(i * batch, (i + 1) * batch), epoch=0,
                                           dtype=dtype, channels_last=True)
        prefetch.schedule(("train", 0, i + 1), np.arange((i + 1) * batch, (i + 2) * batch), 0)
        step(*pair)

    def render_only(i):
        renderer.render_tensor(np.arange(i * batch, (i + 1) * batch), epoch=0, dtype=dtype, channels_last=True)

    torch.cuda.reset_peak_memory_stats()
    t_ceiling = timed(ceiling, steps, warmup)
    t_e2e = timed(end_to_end, steps, warmup)
    t_prefetch = timed(end_to_end_prefetch, steps, warmup)
    t_render = timed(render_only, steps, warmup)
    return {
        "arch": arch, "recipe": recipe, "overrides": overrides or {}, "batch": batch, "size": size,
        "compile": compile, "dtype": dtype,
        "ceiling_img_s": round(batch / t_ceiling, 1), "end_to_end_img_s": round(batch / t_e2e, 1),
        "ratio": round(t_ceiling / t_e2e, 4), "ms_per_step": round(t_e2e * 1000, 2),
        "prefetch_img_s": round(batch / t_prefetch, 1), "prefetch_ratio": round(t_ceiling / t_prefetch, 4),
        "render_ms_per_batch": round(t_render * 1000, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }


def bench_ofdb(arch: str, batch: int, size: int, steps: int, warmup: int, compile: bool, dtype: str) -> dict:
    """The OFDB data path of FractalDataModule (fixed set on the device + augmentation) vs the model alone."""
    import lightning.pytorch as pl

    from fractal_pretrain.train.data import FractalDataModule

    torch.manual_seed(0)
    data = FractalDataModule("ofdb", size=size, batch_size=batch, val_samples=0, dtype=dtype,
                             augment={"enabled": True})
    data.trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                              enable_checkpointing=False)
    setup_start = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    setup_start[0].record()
    data.setup("fit")
    setup_start[1].record()
    torch.cuda.synchronize()
    crop = data.augment.size
    step = classifier_step(arch, data.num_classes, compile)
    fixed = constant_input(batch, crop, dtype)
    fixed_targets = F.one_hot(torch.randint(0, data.num_classes, (batch,), device="cuda"), data.num_classes).float()
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

    torch.cuda.reset_peak_memory_stats()
    t_ceiling = timed(ceiling, steps, warmup)
    t_e2e = timed(end_to_end, steps, warmup)
    t_augment = timed(augment_only, steps, warmup)
    return {
        "arch": arch, "recipe": "ofdb", "batch": batch, "size": size, "crop": crop, "compile": compile,
        "dtype": dtype, "set_setup_s": round(setup_start[0].elapsed_time(setup_start[1]) / 1000, 2),
        "set_gib": round(data.image_set.nbytes / 2**30, 2),
        "ceiling_img_s": round(batch / t_ceiling, 1), "end_to_end_img_s": round(batch / t_e2e, 1),
        "ratio": round(t_ceiling / t_e2e, 4), "ms_per_step": round(t_e2e * 1000, 2),
        "augment_ms_per_batch": round(t_augment * 1000, 3),
        "augment_share": round(t_augment / t_e2e, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }


def bench_simsiam(arch: str, batch: int, size: int, steps: int, warmup: int, compile: bool, dtype: str,
                  overrides: dict | None = None) -> dict:
    """SimSiam's two-view step fed by the selfsup recipe's views vs the same step on a constant input."""
    from fractal_pretrain.train.objectives import SimSiam

    torch.manual_seed(0)
    renderer = make_renderer(get_recipe("selfsup", overrides), size=size, seed=0, device="cuda")
    backbone = build_resnet(arch, 2)
    features = backbone.fc.in_features
    backbone.fc = torch.nn.Identity()
    backbone = backbone.cuda().to(memory_format=torch.channels_last)
    objective = SimSiam(features).cuda()
    if compile:
        backbone.compile()
    groups = [{"params": [*backbone.parameters(), *objective.projector.parameters()]},
              {"params": list(objective.predictor.parameters())}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(images, labels):
        view1, view2 = images.chunk(2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = objective(backbone, view1, view2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fixed = constant_input(2 * batch, size, dtype)
    fixed_labels = torch.zeros(batch, dtype=torch.int64, device="cuda")

    def render(i):
        return renderer.render_tensor(np.arange(i * batch, (i + 1) * batch), epoch=0, dtype=dtype, channels_last=True)

    prefetch = SideStreamPrefetch(
        lambda indices, epoch: renderer.render_tensor(indices, epoch, dtype=dtype, channels_last=True),
        torch.device("cuda"))

    def end_to_end_prefetch(i):
        pair = prefetch.take(("train", 0, i)) or render(i)
        prefetch.schedule(("train", 0, i + 1), np.arange((i + 1) * batch, (i + 2) * batch), 0)
        step(*pair)

    torch.cuda.reset_peak_memory_stats()
    t_ceiling = timed(lambda i: step(fixed, fixed_labels), steps, warmup)
    t_e2e = timed(lambda i: step(*render(i)), steps, warmup)
    t_prefetch = timed(end_to_end_prefetch, steps, warmup)
    t_render = timed(render, steps, warmup)
    return {
        "arch": arch, "recipe": "selfsup", "objective": "simsiam", "overrides": overrides or {}, "batch": batch,
        "views": 2, "size": size, "compile": compile, "dtype": dtype,
        "ceiling_samples_s": round(batch / t_ceiling, 1), "end_to_end_samples_s": round(batch / t_e2e, 1),
        "ratio": round(t_ceiling / t_e2e, 4), "prefetch_samples_s": round(batch / t_prefetch, 1),
        "prefetch_ratio": round(t_ceiling / t_prefetch, 4), "ms_per_step": round(t_e2e * 1000, 2),
        "render_ms_per_batch": round(t_render * 1000, 3), "render_share": round(t_render / t_e2e, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
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
    parser.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (YAML value)")
    parser.add_argument("--ofdb", action="store_true", help="OFDB-4AD settings: fixed set + data.augment (--size 512)")
    parser.add_argument("--simsiam", action="store_true", help="two-view SimSiam step on the selfsup recipe")
    parser.add_argument("--matmul-precision", default="high", choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision, as fit's --float32_matmul_precision (default high)")
    args = parser.parse_args(argv)
    import yaml

    overrides = dict((kv.split("=", 1)[0], yaml.safe_load(kv.split("=", 1)[1])) for kv in args.set)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision(args.matmul_precision)
    for arch in args.archs.split(","):
        if args.simsiam:
            row = bench_simsiam(arch, args.batch, args.size, args.steps, args.warmup, args.compile, args.dtype,
                                overrides)
            print(json.dumps(row), flush=True)
            continue
        if args.ofdb:
            row = bench_ofdb(arch, args.batch, args.size, args.steps, args.warmup, args.compile, args.dtype)
            print(json.dumps(row), flush=True)
            continue
        row = bench(arch, args.recipe, args.batch, args.size, args.steps, args.warmup, args.compile, args.dtype,
                    overrides)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
