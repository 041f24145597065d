"""``ad-eval`` command line: one evaluation cell, a grid of cells on a cluster, or the report.

Usage::

    ad-eval run --method patchcore --dataset mvtec --root /data/mvtec --category bottle \\
        --backbone runs/paper_wrn50/backbone.pt [--arch wide_resnet50_2] [--layers 2,3] [--size 256] --out results/
    ad-eval run ... --backbone imagenet:/weights/wide_resnet50_2-95faca4d.pth --arch wide_resnet50_2
    ad-eval run ... --backbone random --arch resnet18
    ad-eval grid --config jobs/eval/smoke.yaml --cluster local --out results/smoke
    ad-eval report --results results/smoke --out reports/smoke [--backbones ImageNet,Fractals] [--layers padim=1,2]
    ad-eval report --results results/smoke --out reports/smoke --control random-resnet18  # differences to a control
    ad-eval run ... --shots 4                      # few-shot: 4 normal train images (ad_eval.fewshot)
    ad-eval synthetic --out /tmp/synth [--layout mvtec|visa] [--size 128] [--seed 0]
    ad-eval methods                                # the registered methods, their layers and --set keys

Errors (bad path, category, method, layer, config key or value, backbone file) print one line
``ad-eval: error: ...`` and exit with status 2 (``fractal_pretrain.cli_kit``); a cell that fails
while running also leaves ``<cell_id>.failed.json`` with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fractal_pretrain.cli_kit import EXIT_USAGE, add_set_option, check_output_dir, overrides, run_main
from fractal_pretrain.config import ConfigError

PROG = "ad-eval"
__all__ = ["EXIT_USAGE", "PROG", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from ad_eval.adabn import BN_STATS
    from ad_eval.cell import DATASETS
    from ad_eval.grid import CLUSTERS
    from ad_eval.methods import list_methods

    parser = argparse.ArgumentParser(prog=PROG, description="Evaluate pretrained backbones for anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="evaluate one cell and write <out>/<cell-id>.json")
    p.add_argument("--method", required=True, choices=list_methods())
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--category", required=True)
    p.add_argument("--backbone", required=True, help="backbone.pt path, imagenet:/path/file.pth, or random")
    p.add_argument("--name", default="", help="backbone label in reports (default: derived from --backbone)")
    p.add_argument("--arch", default=None, help="architecture (required for imagenet: and random)")
    p.add_argument("--layers", default=None, help="feature layers, e.g. 2,3 (default: the method's)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", default=None, metavar="K",
                   help="train on K normal images chosen by (seed, category, K), nested in 2K; default: all")
    p.add_argument("--projector", default=None, metavar="PATH",
                   help="projector.pt of `fractal-pretrain adapt` for this backbone: projected residual features")
    p.add_argument("--projector-shots", type=int, default=None, metavar="K",
                   help="reference images of the projector (default: its projector.json shots)")
    p.add_argument("--bn-stats", default="source", choices=BN_STATS,
                   help="BatchNorm running statistics: the backbone's own (default) or re-estimated on the cell's "
                        "normal train images (AdaBN; label +adabn)")
    add_set_option(p, "method hyper-parameter override (YAML value), repeatable")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--keep-maps", action="store_true", help="also save the anomaly maps (npz) for figures")
    p.add_argument("--out", required=True, help="results folder")
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("methods", help="list the registered methods: layers, outputs, --set keys and defaults")
    p.set_defaults(handler=_cmd_methods)

    p = sub.add_parser("grid", help="evaluate every cell of a grid config with submitit job arrays")
    p.add_argument("--config", required=True, help="grid YAML (jobs/eval/*.yaml)")
    p.add_argument("--cluster", default="local", choices=CLUSTERS)
    p.add_argument("--out", required=True, help="results folder (shared with the compute nodes on Slurm)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_cmd_grid)

    p = sub.add_parser("report", help="tables (Markdown, CSV, LaTeX) and figures from a results folder")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backbones", default=None, help="backbone labels in cell order, e.g. ImageNet,Fractals")
    p.add_argument("--layers", metavar="METHOD=SET", action="append", default=[],
                   help="the layer set of a method's table column, e.g. patchcore=1,2 (repeatable; default: the set "
                        "with the most cells, ties: the method's reference set)")
    p.add_argument("--control", default=None, metavar="LABEL",
                   help="backbone label of the control (e.g. random-resnet18): every other backbone's difference "
                        "to it, paired by seed, with its standard error (control_<dataset>.{md,csv,png})")
    p.add_argument("--grid", default=None, metavar="CONFIG",
                   help="report only the cells of this grid config (jobs/eval/*.yaml; paths resolve as for "
                        "`ad-eval grid`), e.g. when --results also holds records of an earlier version of it")
    p.set_defaults(handler=_cmd_report)

    from ad_eval.synthetic import add_arguments as add_synthetic_arguments

    p = sub.add_parser("synthetic", help="write a small generated MVTec-like or VisA-like dataset")
    add_synthetic_arguments(p)
    p.set_defaults(handler=_cmd_synthetic)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from ad_eval.cell import Cell, preflight, resolve_device, run_cell
    from ad_eval.fewshot import parse_shots

    check_output_dir(args.out)
    cell = Cell(method=args.method, dataset=args.dataset, root=args.root, category=args.category,
                backbone=args.backbone, backbone_name=args.name, arch=args.arch, layers=args.layers,
                size=args.size, crop=args.crop, seed=args.seed, config=overrides(args.overrides),
                shots=parse_shots(args.shots), projector=args.projector, projector_shots=args.projector_shots,
                bn_stats=args.bn_stats)
    device = resolve_device(args.device)  # a bad or absent device: one line, no failure record
    preflight(cell)  # a bad dataset or backbone path: one line, no failure record
    record = run_cell(cell, args.out, device=device, keep_maps=args.keep_maps)
    metrics = ", ".join(f"{k} {record[k]:.4f}" for k in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
                        if record.get(k) is not None)
    print(f"{cell.cell_id}: {metrics} ({record['wall_time_s']:.1f} s) -> {args.out}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from ad_eval.methods import get_method, list_methods
    from ad_eval.methods.registry import describe

    for name in list_methods():
        print(describe(get_method(name)))
    return 0


def _cmd_grid(args: argparse.Namespace) -> int:
    from ad_eval.grid import run_grid

    check_output_dir(args.out)
    summary = run_grid(args.config, args.out, cluster=args.cluster, progress=not args.no_progress)
    print(f"{summary['done']}/{summary['cells']} cells done in {args.out}")
    if summary["missing"]:
        print(f"{len(summary['missing'])} cell(s) missing (see *.failed.json); re-run the same command to retry",
              file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ad_eval.report import build_report

    check_output_dir(args.out)
    backbones = args.backbones.split(",") if args.backbones else None
    cells = None
    if args.grid:
        from ad_eval.grid import load_grid

        cells = {cell.cell_id for cell in load_grid(args.grid).cells}
    written = build_report(args.results, args.out, backbones=backbones, layers=_report_layers(args.layers),
                           control=args.control, cells=cells)
    print(f"report written to {args.out}")
    # the summary's warnings on the terminal too: a --backbones typo or an empty folder is not a silent success
    for problem in [*written["problems"], *written["warnings"]]:
        print(f"  warning: {problem}", file=sys.stderr)
    if written["failures"]:
        print(f"  warning: {len(written['failures'])} failed cell(s), listed in {written['summary']}", file=sys.stderr)
    return 0


def _report_layers(pairs: Sequence[str]) -> dict[str, tuple[str, ...]] | None:
    """``--layers patchcore=1,2 ...`` -> {"patchcore": ("layer1", "layer2")}; a bad method or set is one line."""
    from ad_eval.methods import get_method

    layers = {}
    for pair in pairs:
        method, sep, layer_set = pair.partition("=")
        if not sep:
            raise ConfigError(f"--layers {pair!r}: expected METHOD=SET, e.g. patchcore=1,2")
        spec = get_method(method.strip())
        layers[spec.name] = spec.resolve_layers(layer_set.replace("+", ","))
    return layers or None


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from ad_eval.synthetic import run_from_args

    check_output_dir(args.out)
    print(run_from_args(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 and one line on stderr for bad input)."""
    return run_main(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
