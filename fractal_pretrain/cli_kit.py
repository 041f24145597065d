"""What both command lines (``fractal-pretrain``, ``ad-eval``) share: ``KEY=VALUE`` parsing, the one-line
error printer with exit status 2, and the guard against writing into a path that is a file.

A configuration or input error is never a traceback: ``main`` prints ``<prog>: error: <one line>`` on
stderr and returns ``EXIT_USAGE`` (argparse's own status for bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fractal_pretrain.config import ConfigError

EXIT_USAGE = 2  # argparse's status for bad arguments; used for configuration and input errors too
# What a handler may raise for bad input: configs, datasets, backbones and grids raise ValueError
# subclasses; a missing or clashing path raises an OSError subclass.
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def key_value(text: str) -> tuple[str, Any]:
    """An argparse type for ``--set KEY=VALUE``: VALUE parsed as YAML, a YAML error as one line."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise argparse.ArgumentTypeError(f"bad YAML value for {key}: {problem}") from None
    return key, value


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, a list of (key, value) pairs."""
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", type=key_value, action="append",
                        default=[], help=help)


def overrides(pairs: list[tuple[str, Any]] | None) -> dict[str, Any]:
    """The ``--set`` pairs as a dict (a repeated key: the last one wins)."""
    return dict(pairs or [])


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output folder: absent (created later) or a folder; an existing file is an error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    for folder in (path, *path.parents):  # a file higher up would fail at mkdir with a traceback
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"{flag} {path}: {folder} is a file, not a folder")
            _check_writable(folder, path, flag)
            break
    return path


def _check_writable(folder: Path, path: Path, flag: str) -> None:
    """Writes (and drops) a nameless file in ``folder``: an unwritable ``--out`` fails now, not after the
    work (a permission bit, a read-only filesystem; root ignores the bits, so ``os.access`` cannot tell)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output file: not a folder, in a folder that exists (nothing is created for it)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder, not a file")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise ConfigError(f"{flag} {path}: its folder {path.parent} {what}")
    return path


def fail(prog: str, exc: BaseException) -> int:
    """Prints an error as one line ``<prog>: error: ...`` on stderr and returns ``EXIT_USAGE``."""
    print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return EXIT_USAGE


def parse_or_exit_status(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """``(args, None)``, or ``(None, status)`` when argparse exited (it printed usage + error, or --help)."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as exc:
        return None, exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)


def run_main(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and call ``args.handler(args)``; bad input becomes one line and exit status 2."""
    args, status = parse_or_exit_status(parser, argv)
    if args is None:
        return status
    return call_handler(prog, args.handler, args)


def call_handler(prog: str, handler: Callable[..., int], *args) -> int:
    """``handler(*args)`` with ``USAGE_ERRORS`` printed as one line (exit status 2)."""
    try:
        return handler(*args)
    except USAGE_ERRORS as exc:
        return fail(prog, exc)
