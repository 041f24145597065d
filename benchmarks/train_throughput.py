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
    model = build_resnet(arch, renderer.recipe.num_classes).cuda().to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    step = make_step(model, optimizer)
    fixed = torch.randn(batch, 3, size, size, device="cuda").to(getattr(torch, dtype))
    fixed = fixed.contiguous(memory_format=torch.channels_last)
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
    args = parser.parse_args(argv)
    import yaml

    overrides = dict((kv.split("=", 1)[0], yaml.safe_load(kv.split("=", 1)[1])) for kv in args.set)
    torch.backends.cudnn.benchmark = True
    for arch in args.archs.split(","):
        row = bench(arch, args.recipe, args.batch, args.size, args.steps, args.warmup, args.compile, args.dtype,
                    overrides)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
