"""The two-view runs' k-NN probe (``fractal_pretrain/train/knn.py``) on any backbones, side by side.

Leave-one-out k-NN top-1 of each backbone's pooled features on one fixed labelled set of held-out Anderson
fractals (``classes`` systems drawn under ``probe_seed(seed)``, ``per_class`` renders each): a label-free
training run, a classification run and a random init get the same yardstick. Chance is 1 / classes.

``--task views`` asks instead what SimSiam itself is trained on: ``classes`` held-out ``selfsup`` pairs (two
views of one fractal, each its own colour, size, position, plasma and blur), and the share of first views
whose cosine-nearest second view is their own (chance 1 / classes). A backbone can learn this instance task
and still fail the class probe, whose renders of one system differ in jitter, points and window too.

    python3 benchmarks/knn_probe.py runs/recipe_study_x4/pretrain_*/backbone.pt random --arch resnet18
    python3 benchmarks/knn_probe.py runs/recipe_study_x4/pretrain_*/backbone.pt random --arch resnet18 \
        --task views --classes 200
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from ad_eval.backbones import IMAGENET_PREFIX, RANDOM_SPEC, BackboneError, load_backbone
from fractal_pretrain.config import ConfigError
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render.renderer import make_renderer
from fractal_pretrain.train.data import normalise
from fractal_pretrain.train.knn import PROBE_BATCH, PROBE_EPOCH, embed, knn_top1, probe_seed, render_probe_images

TASKS = ("class", "views")


def render_view_pairs(pairs: int, *, size: int, seed: int, device: str, num_points: int,
                      overrides: dict | None = None) -> torch.Tensor:
    """(2 * pairs, 3, H, W) uint8: all first views of held-out ``selfsup`` samples, then all second views."""
    recipe = get_recipe("selfsup", {**(overrides or {}), "num_classes": pairs, "num_points": num_points,
                                    "chains": 256})
    renderer = make_renderer(recipe, size=size, seed=probe_seed(seed), device=device)
    indices = np.arange(pairs, dtype=np.int64)
    chunks = [renderer.render_tensor(indices[i:i + PROBE_BATCH // 2], PROBE_EPOCH)[0]
              for i in range(0, pairs, PROBE_BATCH // 2)]  # each chunk: its first views, then its second views
    return torch.cat([c[:len(c) // 2] for c in chunks] + [c[len(c) // 2:] for c in chunks])


def view_top1(features: torch.Tensor) -> float:
    """Share of first views whose cosine-nearest second view is their own pair's."""
    f = F.normalize(features.float(), dim=1)
    first, second = f[:len(f) // 2], f[len(f) // 2:]
    return ((first @ second.T).argmax(1) == torch.arange(len(first), device=f.device)).float().mean().item()


def probe(backbones: list[str], *, arch: str | None, classes: int, per_class: int, size: int, seed: int,
          num_points: int, k: int, device: str, task: str = "class",
          overrides: dict | None = None) -> list[tuple[str, float]]:
    """(backbone, top-1 of ``task``) per backbone, each normalised with its own mean/std."""
    # --arch names what a file cannot: random and imagenet: specs; a backbone.pt's json names its own
    loaded = [load_backbone(spec, arch if spec == RANDOM_SPEC or spec.startswith(IMAGENET_PREFIX) else None,
                            seed=seed) for spec in backbones]
    # rendered once as uint8; each backbone's normalisation then in the renderer's own arithmetic
    if task == "views":
        pixels = render_view_pairs(classes, size=size, seed=seed, device=device, num_points=num_points,
                                   overrides=overrides)
    else:
        pixels, labels = render_probe_images(classes, per_class, size=size, seed=seed, device=device,
                                             num_points=num_points, chains=256, dtype="uint8", channels_last=False,
                                             mean=(0.0,) * 3, std=(1.0,) * 3)
    results = []
    for spec, backbone in zip(backbones, loaded, strict=True):
        images = normalise(pixels, backbone.mean, backbone.std, "float32", channels_last=False)
        features = embed(backbone.build().to(images.device), images)
        results.append((spec, view_top1(features) if task == "views" else knn_top1(features, labels, k, classes)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="+", help="backbone.pt files (or folders), imagenet:/file.pth, random")
    parser.add_argument("--arch", default=None, help="architecture of `random` and imagenet: backbones")
    parser.add_argument("--task", choices=TASKS, default="class",
                        help="class: k-NN of systems; views: retrieval of a sample's second view")
    parser.add_argument("--classes", type=int, default=20, help="systems (class) or view pairs (views)")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--points", type=int, default=20000, help="chaos-game points per fractal")
    parser.add_argument("--seed", type=int, default=0, help="run seed: the probe's systems are probe_seed(seed)'s")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--overrides", type=json.loads, default=None,
                        help='views: selfsup recipe overrides as JSON, e.g. \'{"background": false}\'')
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.overrides is not None and args.task != "views":
        parser.error("--overrides: only with --task views (the class probe is the fixed anderson set)")
    fixed = sorted(set(args.overrides or {}) & {"num_classes", "num_points", "chains"})
    if fixed:
        parser.error(f"--overrides: {fixed[0]!r} is set by the probe (--classes, --points)")
    try:
        results = probe(args.backbones, arch=args.arch, classes=args.classes, per_class=args.per_class,
                        size=args.size, seed=args.seed, num_points=args.points, k=args.k, device=args.device,
                        task=args.task, overrides=args.overrides)
    except (BackboneError, ConfigError) as err:
        print(f"knn_probe: {err}", file=sys.stderr)
        return 2
    if args.task == "views":
        print(f"second-view retrieval top-1, {args.classes} held-out selfsup pairs (seed {probe_seed(args.seed)}) "
              f"at {args.size} px; chance {1 / args.classes:.3f}")
    else:
        print(f"k-NN top-1, {args.classes} held-out systems (bank seed {probe_seed(args.seed)}) x {args.per_class} "
              f"renders at {args.size} px, k={args.k}; chance {1 / args.classes:.3f}")
    for spec, top1 in results:
        print(f"{top1:.3f}  {spec}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
