"""``fractal-pretrain`` command line: list recipes, render preview grids, export shards, pre-train.

Usage::

    fractal-pretrain recipes
    fractal-pretrain render --recipe anderson --num 16 --seed 0 --size 256 --device cpu \\
        --out outputs/preview_anderson.png
    fractal-pretrain export --recipe anderson --num 64 --seed 0 --size 128 \\
        --out outputs/shards --shard-size 32
    fractal-pretrain render --recipe anderson --set num_points=20000 --set num_classes=10 ...
    fractal-pretrain fit --config jobs/pretrain/smoke.yaml [--trainer.max_steps 20 ...]
    fractal-pretrain preview --config jobs/pretrain/ofdb_smoke.yaml [--epoch 1 --step 0 --data.batch_size 16 ...] \\
        --out outputs/batch.png
    fractal-pretrain preview --config jobs/adapt/smoke.yaml [--batch 3] [--val] --out outputs/adapt_batch.png
    fractal-pretrain export-backbone runs/smoke/checkpoints/last.ckpt
    fractal-pretrain adapt --config jobs/adapt/smoke.yaml [--trainer.max_steps 20 ...]

``--set KEY=VALUE`` overrides a recipe field; VALUE is parsed as YAML (``10`` -> int,
``[1, 2]`` -> list, ``true`` -> bool). Configuration errors (unknown recipe, key or device)
print one line ``fractal-pretrain: error: ...`` on stderr and exit with status 2.

Every subcommand is reachable from Python as ``main([...])``, which returns the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from fractal_pretrain.cli_kit import (
    EXIT_USAGE,
    add_set_option,
    call_handler,
    check_output_dir,
    fail,
    overrides,
    parse_or_exit_status,
)

__all__ = ["EXIT_USAGE", "PROG", "build_parser", "main"]
PROG = "fractal-pretrain"


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= low, with an error that says which kind was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {what} integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _add_render_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``render`` and ``export``: what to render."""
    p.add_argument("--recipe", required=True, help="recipe name (see `fractal-pretrain recipes`)")
    p.add_argument("--num", type=_positive_int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="image side in pixels (default 256; 512 for a render-once recipe such as ofdb)")
    p.add_argument("--epoch", type=_non_negative_int, default=0, help="epoch (default 0)")
    p.add_argument(
        "--start", type=_non_negative_int, default=0, help="first global sample index (default 0)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (compiled C++, byte-identical to the reference), cpu-reference (NumPy reference) "
        "or cuda (CuPy kernels); default cpu",
    )
    p.add_argument(
        "--threads",
        type=_non_negative_int,
        default=None,
        help="CPU threads of --device cpu (default: every core of this process)",
    )
    add_set_option(p, "override a recipe field, VALUE parsed as YAML; repeatable")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fractal-pretrain`` (subcommands recipes, render, export)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Render IFS fractal images for pre-training vision backbones."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("recipes", help="list the recipes")
    p.set_defaults(handler=_cmd_recipes)

    p = sub.add_parser("render", help="render a preview grid PNG")
    _add_render_args(p)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--no-labels", action="store_true", help="no caption under each tile")
    p.set_defaults(handler=_cmd_render)

    p = sub.add_parser("export", help="write WebDataset tar shards")
    _add_render_args(p)
    p.add_argument("--out", required=True, help="output directory for shard-*.tar and manifest")
    p.add_argument("--shard-size", type=_positive_int, required=True, help="samples per shard")
    p.add_argument(
        "--batch-size", type=_positive_int, default=64, help="samples per render call (default 64)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_export)

    sub.add_parser("fit", help="pre-train a backbone (LightningCLI: fit --help)", add_help=False)
    sub.add_parser("preview", help="write the training batch a fit or adapt config gives its model as a PNG "
                                   "(preview --help)", add_help=False)
    sub.add_parser("adapt", help="train a residual-feature projector on synthetic anomalies (adapt --help)",
                   add_help=False)

    p = sub.add_parser("export-backbone", help="write backbone.pt + backbone.json from a checkpoint")
    p.add_argument("checkpoint", help="a pre-training checkpoint (.ckpt)")
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint's run directory)")
    p.set_defaults(handler=_cmd_export_backbone)
    return parser


def _cmd_recipes(args: argparse.Namespace) -> int:
    from fractal_pretrain.recipes import list_recipes

    recipes = list_recipes()
    width = max(len(name) for name in recipes)
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _caption(index: int, label: Any) -> str:
    import numpy as np

    label = np.asarray(label)
    if label.ndim == 0:
        return f"{index}: c{int(label)}"
    active = np.flatnonzero(label).tolist()  # multi-hot -> class ids
    return f"{index}: " + ",".join(str(c) for c in active)


def _cmd_render(args: argparse.Namespace) -> int:
    import numpy as np

    from fractal_pretrain.preview import save_grid
    from fractal_pretrain.recipes import default_size, get_recipe
    from fractal_pretrain.render import make_renderer

    recipe = get_recipe(args.recipe, overrides(args.overrides) or None)
    renderer = make_renderer(
        recipe, size=args.size or default_size(recipe), seed=args.seed, device=args.device, num_threads=args.threads
    )
    indices = np.arange(args.start, args.start + args.num, dtype=np.int64)
    batch = renderer.render(indices, epoch=args.epoch)
    views = getattr(recipe, "views", 0) or 1  # two-view recipes: each sample's views side by side
    images = batch.images.reshape(views, len(indices), *batch.images.shape[1:]).swapaxes(0, 1)
    labels = None
    if not args.no_labels:
        labels = [_caption(int(i), batch.labels[j]) + (f" v{v}" if views > 1 else "")
                  for j, i in enumerate(indices) for v in range(views)]
    print(save_grid(images.reshape(-1, *batch.images.shape[1:]), args.out, labels=labels))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fractal_pretrain.export import MANIFEST_NAME, export_shards

    check_output_dir(args.out)
    manifest = export_shards(
        args.recipe,
        out_dir=args.out,
        num=args.num,
        seed=args.seed,
        size=args.size,
        shard_size=args.shard_size,
        overrides=overrides(args.overrides),
        epoch=args.epoch,
        start=args.start,
        batch_size=args.batch_size,
        device=args.device,
        num_threads=args.threads,
        progress=not args.no_progress,
    )
    print(
        f"wrote {manifest['count']} samples in {len(manifest['shards'])} shards to {args.out} "
        f"(see {MANIFEST_NAME})"
    )
    return 0


def _cmd_export_backbone(args: argparse.Namespace) -> int:
    from fractal_pretrain.train.backbone import export_checkpoint

    if args.out is not None:
        check_output_dir(args.out)
    print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        Exit status: 0 on success, 2 (one line on stderr) for bad arguments, configuration or input errors.
    """
    from fractal_pretrain.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:  # LightningCLI parses its own arguments
        from fractal_pretrain.train.cli import fit

        try:
            return fit(argv[1:])
        except ConfigError as exc:
            return fail(PROG, exc)
    if argv[:1] == ["preview"]:  # its own options, then fit's or adapt's (LightningCLI)
        from fractal_pretrain.train.preview import preview

        try:
            return call_handler(PROG, preview, argv[1:])
        except SystemExit as exc:  # argparse printed usage + error (or --help)
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    if argv[:1] == ["adapt"]:  # LightningCLI too
        from fractal_pretrain.adapt.cli import adapt

        try:
            return adapt(argv[1:])
        except ConfigError as exc:
            return fail(PROG, exc)
    args, status = parse_or_exit_status(build_parser(), argv)
    if args is None:
        return status
    return call_handler(PROG, args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
