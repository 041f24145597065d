"""Augmentation cost at OFDB-4AD's settings: ms per batch, by stage, and its share of a training step.

One process, one device (CUDA when available, else CPU):
  * host: the per-batch draws on the host (params, mix, grouping), which the device never waits for;
  * stages: crop+flip (512 -> 224), AutoAugment, normalise+erase, mix, each timed alone;
  * augment: the whole ``BatchAugmenter`` call, ms per batch and images/s;
  * with ``--model``: the model-only training step (constant input, bf16 autocast, channels_last,
    SGD) against the same step fed by the augmenter, side by side: ratio (target >= 0.97) and the
    augmentation's share of the step (target < 3%).
Prints one JSON line per measurement. On the CPU (``--device cpu``, tests at tiny sizes) the augmenter's
output is float32 rather than bfloat16, and the step's bf16 autocast is the CPU's.

    python3 benchmarks/augment_throughput.py [--batch 128] [--source 512] [--size 224] [--model resnet50] [--tf32]
    python3 benchmarks/augment_throughput.py --device cpu --batch 2 --source 64 --size 32 --model resnet18
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from fractal_pretrain.augment import AugmentConfig, BatchAugmenter
from fractal_pretrain.augment.augmenter import apply_mix
from fractal_pretrain.augment.params import mix_params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of fn(i), after warmup, measured between device syncs."""
    for i in range(warmup):
        fn(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    sync(device)
    return (time.perf_counter() - start) / steps


def test_images(batch: int, side: int, device: torch.device) -> torch.Tensor:
    """Smooth colour blobs on black, like rendered fractals: histogram ops see realistic content."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, side // 32, side // 32, generator=g)
    coarse = coarse * (torch.rand(batch, 1, side // 32, side // 32, generator=g) < 0.3)
    images = F.interpolate(coarse, size=(side, side), mode="bilinear").mul(255).round().to(torch.uint8)
    return images.to(device)


def bench_augment(args, device: torch.device) -> BatchAugmenter:
    cfg = AugmentConfig(enabled=True, size=args.size)
    aug = BatchAugmenter(cfg, num_classes=1000, out_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    images = test_images(args.batch, args.source, device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    def indices(i):
        return np.arange(i * args.batch, (i + 1) * args.batch)

    def host_only(i):
        params = aug.sample_params(images, 0, 0, indices(i))
        aug._groups(params, args.size, args.size)
        mix_params(cfg, 0, 0, i, 0, args.batch, args.size, args.size)

    params = [aug.sample_params(images, 0, 0, indices(i)) for i in range(args.warmup + args.steps)]
    cropped = aug.crop(images, params[0])
    augmented = aug.autoaugment(cropped, params[0])
    normalised = aug.finish(cropped, params[0])
    targets = aug.targets(labels, device)
    stages = {
        "host_draws": lambda i: host_only(i),
        "crop_flip": lambda i: aug.crop(images, params[i]),
        "autoaugment": lambda i: aug.autoaugment(cropped, params[i]),
        "normalise_erase": lambda i: aug.finish(augmented, _no_autoaugment(params[i])),
        "mix": lambda i: apply_mix(normalised, targets, mix_params(cfg, 0, 0, i, 0, args.batch, args.size, args.size)),
        "augment": lambda i: aug(images, labels, seed=0, epoch=0, indices=indices(i), step=i),
    }
    for name, fn in stages.items():
        seconds = timed(fn, args.steps, args.warmup, device)
        print(json.dumps({"measure": name, "device": str(device), "tf32": args.tf32, "batch": args.batch,
                          "source": args.source,
                          "size": args.size, "ms_per_batch": round(seconds * 1e3, 3),
                          "images_per_s": round(args.batch / seconds, 1)}), flush=True)
    return aug


def _no_autoaugment(params):
    import dataclasses

    return dataclasses.replace(params, policy=np.full_like(params.policy, -1))


def bench_step(args, aug: BatchAugmenter, device: torch.device) -> None:
    from train_throughput import make_step  # the step train_throughput times (benchmarks/ is on sys.path)

    from fractal_pretrain.train.model import build_resnet

    torch.manual_seed(0)
    model = build_resnet(args.model, 1000).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = test_images(args.batch, args.source, device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    constant = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=torch.bfloat16)
    constant = constant.contiguous(memory_format=torch.channels_last)
    onehot = F.one_hot(labels, 1000).float()

    train = make_step(model, optimizer, device.type)

    def ceiling(i):
        train(constant, onehot)

    def end_to_end(i):
        x, targets = aug(images, labels, seed=0, epoch=0, indices=np.arange(i * args.batch, (i + 1) * args.batch),
                         step=i)
        train(x.contiguous(memory_format=torch.channels_last), targets)

    results = {}
    for _ in range(args.repeats):  # interleaved, so drift hits both
        for name, fn in (("ceiling", ceiling), ("end_to_end", end_to_end)):
            results.setdefault(name, []).append(timed(fn, args.steps, args.warmup, device))
    best = {name: min(values) for name, values in results.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(json.dumps({"measure": "train_step", "arch": args.model, "device": name,
                      "tf32": args.tf32,
                      "batch": args.batch, "source": args.source, "size": args.size,
                      "ceiling_img_s": round(args.batch / best["ceiling"], 1),
                      "end_to_end_img_s": round(args.batch / best["end_to_end"], 1),
                      "ratio": round(best["ceiling"] / best["end_to_end"], 4),
                      "augment_share": round(1 - best["ceiling"] / best["end_to_end"], 4)}), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--source", type=int, default=512, help="side of the uint8 source images")
    parser.add_argument("--size", type=int, default=224, help="output side (RandomResizedCrop)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the step comparison")
    parser.add_argument("--model", default="", help="e.g. resnet50: also time the training step")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--tf32", action="store_true",
                        help="float32 matmuls on TF32 (the crop's products; rare pixels move by one level)")
    args = parser.parse_args(argv)
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    aug = bench_augment(args, device)
    if args.model:
        bench_step(args, aug, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
