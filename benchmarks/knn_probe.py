"""The two-view runs' k-NN probe (``fractal_pretrain/train/knn.py``) on any backbones, side by side.

Leave-one-out k-NN top-1 of each backbone's pooled features on one fixed labelled set of held-out Anderson
fractals (``classes`` systems drawn under ``probe_seed(seed)``, ``per_class`` renders each): a label-free
training run, a classification run and a random init get the same yardstick. Chance is 1 / classes.

    python3 benchmarks/knn_probe.py runs/recipe_study_x4/pretrain_*/backbone.pt random --arch resnet18
"""

from __future__ import annotations

import argparse
import sys

import torch

from ad_eval.backbones import IMAGENET_PREFIX, RANDOM_SPEC, BackboneError, load_backbone
from fractal_pretrain.train.data import normalise
from fractal_pretrain.train.knn import embed, knn_top1, probe_seed, render_probe_images


def probe(backbones: list[str], *, arch: str | None, classes: int, per_class: int, size: int, seed: int,
          num_points: int, k: int, device: str) -> list[tuple[str, float]]:
    """(backbone, k-NN top-1) per backbone, each normalised with its own mean/std."""
    # --arch names what a file cannot: random and imagenet: specs; a backbone.pt's json names its own
    loaded = [load_backbone(spec, arch if spec == RANDOM_SPEC or spec.startswith(IMAGENET_PREFIX) else None,
                            seed=seed) for spec in backbones]
    # rendered once as uint8; each backbone's normalisation then in the renderer's own arithmetic
    pixels, labels = render_probe_images(classes, per_class, size=size, seed=seed, device=device,
                                         num_points=num_points, chains=256, dtype="uint8", channels_last=False,
                                         mean=(0.0,) * 3, std=(1.0,) * 3)
    results = []
    for spec, backbone in zip(backbones, loaded, strict=True):
        images = normalise(pixels, backbone.mean, backbone.std, "float32", channels_last=False)
        features = embed(backbone.build().to(images.device), images)
        results.append((spec, knn_top1(features, labels, k, classes)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="+", help="backbone.pt files (or folders), imagenet:/file.pth, random")
    parser.add_argument("--arch", default=None, help="architecture of `random` and imagenet: backbones")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--points", type=int, default=20000, help="chaos-game points per fractal")
    parser.add_argument("--seed", type=int, default=0, help="run seed: the probe's systems are probe_seed(seed)'s")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        results = probe(args.backbones, arch=args.arch, classes=args.classes, per_class=args.per_class,
                        size=args.size, seed=args.seed, num_points=args.points, k=args.k, device=args.device)
    except BackboneError as err:
        print(f"knn_probe: {err}", file=sys.stderr)
        return 2
    print(f"k-NN top-1, {args.classes} held-out systems (bank seed {probe_seed(args.seed)}) x {args.per_class} "
          f"renders at {args.size} px, k={args.k}; chance {1 / args.classes:.3f}")
    for spec, top1 in results:
        print(f"{top1:.3f}  {spec}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
