"""``ad-eval`` command line: run one evaluation cell, a grid of cells, or a report.

The subcommands exist so the entry point is stable; they are implemented in issue 5.

Usage::

    ad-eval run | grid | report
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "ad-eval"
EXIT_NOT_IMPLEMENTED = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ad-eval`` (subcommands run, grid, report)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Evaluate pretrained backbones for anomaly detection."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("run", "evaluate one (backbone, method, dataset) cell"),
        ("grid", "evaluate a grid of cells"),
        ("report", "aggregate cell results into tables"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(handler=_not_implemented)
    return parser


def _not_implemented(args: argparse.Namespace) -> int:
    print(f"{PROG} {args.command}: not implemented yet (see issue 5)", file=sys.stderr)
    return EXIT_NOT_IMPLEMENTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage + error (or --help)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
