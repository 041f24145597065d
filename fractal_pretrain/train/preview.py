"""``fractal-pretrain preview``: the training batch a ``fit`` config feeds its model, as a contact sheet.

    fractal-pretrain preview --config jobs/pretrain/ofdb_smoke.yaml --epoch 1 --step 0 --out batch.png
    fractal-pretrain preview --config jobs/pretrain/ofdb_r50.yaml --data.batch_size 16 --out batch.png

Every option of ``fit`` (a config file, dotted overrides) is parsed and checked by ``fit``'s own command line
(``train/cli.py`` ``make_cli``), which builds the model, data module and trainer; then rank 0's batch of
(``--epoch``, ``--step``) is made exactly as during training: the train loader resumed at that step (the
resume path of a requeued run), ``on_before_batch_transfer`` rendering or gathering the images and
augmenting and mixing them. Every draw is a pure function of (seed, epoch, index) and (seed, epoch, step,
rank), so the sheet is the batch the run trains on, and the same command writes the same bytes.

It runs on the CPU: ``--trainer.accelerator cpu`` is put after the last ``--config`` (a later
``--trainer.accelerator gpu`` wins and renders on the GPU). The world size stays the config's
(``trainer.devices`` x ``trainer.num_nodes``; ``devices: auto`` is 1 on the CPU, so pass
``--trainer.devices N`` to see an N-GPU run's rank 0), because it decides which samples rank 0 gets and
the batch mix. The CPU's float32 batch equals a GPU run's up to its float rounding (bf16 inputs,
TF32 crops).

Tiles are un-normalised with ``data.mean`` / ``data.std`` (:func:`fractal_pretrain.preview.to_pixels`) and
zoomed by an integer factor (nearest neighbour, so a tile's pixels are the batch's) to at least
``MIN_TILE_PX``. Captions: the class; the top two classes with their weights when the target is soft
(CutMix / MixUp: ``12:0.63 480:0.37``); the label set of multi-label recipes; ``pair i view 1`` and
``pair i view 2`` side by side for two-view recipes.

The sheet-independent parts (options, output check, writing) are ``preview_options``, ``parse_preview``,
``Sheet`` and ``write_sheet``, so a preview of ``adapt``'s batches (images, masks, references) is a second
function beside :func:`preview_fit` that builds its own ``Sheet``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fractal_pretrain.cli_kit import check_output_file
from fractal_pretrain.config import ConfigError
from fractal_pretrain.preview import save_grid, to_pixels, zoom

PROG = "fractal-pretrain preview"
MIN_TILE_PX = 128  # default zoom: tiles at least this wide, so a caption such as "12:0.63 480:0.37" fits
DEFAULT_NUM = 64  # samples shown by default (the whole batch is still made: mixing pairs samples within it)


@dataclasses.dataclass(frozen=True)
class PreviewOptions:
    """What to show and where: the batch of ``epoch`` / ``step``, its first ``num`` samples, into ``out``."""

    epoch: int
    step: int
    out: Path
    num: int
    zoom: int | None  # None: the smallest factor giving tiles of MIN_TILE_PX


@dataclasses.dataclass(frozen=True)
class Sheet:
    """Tiles to write: uint8 ``pixels`` (N, H, W, 3), one caption each; ``group`` tiles share a row (pairs)."""

    pixels: np.ndarray
    captions: list[str]
    group: int = 1


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be a positive integer, got 0")
    return value


def preview_options(prog: str, command: str) -> argparse.ArgumentParser:
    """The preview's own options; everything else goes to ``command``'s command line."""
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description=f"Write the training batch a `{command}` config gives its model as a PNG contact sheet. "
                    f"Every other argument is `fractal-pretrain {command}`'s (a --config file, dotted overrides "
                    f"such as --data.batch_size 16; see `fractal-pretrain {command} --help`).",
    )
    parser.add_argument("--out", required=True, help="output PNG (its folder must exist)")
    parser.add_argument("--epoch", type=_non_negative, default=0, help="epoch (default 0)")
    parser.add_argument("--step", type=_non_negative, default=0, help="step within the epoch (default 0)")
    parser.add_argument("--num", type=_positive, default=DEFAULT_NUM,
                        help=f"show the batch's first NUM samples (default {DEFAULT_NUM}; a pair counts once)")
    parser.add_argument("--zoom", type=_positive, default=None,
                        help=f"integer zoom of each tile (default: tiles at least {MIN_TILE_PX} px wide)")
    return parser


def parse_preview(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[PreviewOptions, list[str]]:
    """The preview's options and the remaining arguments; checks ``--out`` before anything is built."""
    args, rest = parser.parse_known_args(list(argv))
    out = check_output_file(args.out)
    return PreviewOptions(args.epoch, args.step, out, args.num, args.zoom), rest


def on_cpu(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--trainer.accelerator cpu`` after its last ``--config`` (later overrides still win)."""
    argv = list(argv)
    last = -1
    for i, arg in enumerate(argv):
        if arg == "--config":
            last = i + 1
        elif arg.startswith("--config="):
            last = i
    return [*argv[:last + 1], "--trainer.accelerator", "cpu", *argv[last + 1:]]


def write_sheet(sheet: Sheet, out: Path, factor: int | None) -> tuple[Path, int]:
    """Writes ``sheet`` zoomed by ``factor`` (None: tiles of at least MIN_TILE_PX) as a PNG; returns the path
    and the zoom used."""
    factor = factor or max(1, math.ceil(MIN_TILE_PX / sheet.pixels.shape[2]))
    return save_grid(zoom(sheet.pixels, factor), out, labels=sheet.captions, group=sheet.group), factor


def target_caption(target, multi_label: bool) -> str:
    """A sample's caption: the class, the top two classes of a soft (mixed) target with their weights, or the
    class set of a multi-label target (with weights where mixing made them fractional)."""
    target = np.asarray(target, dtype=np.float64)
    if target.ndim == 0:
        return str(int(target))
    classes = np.flatnonzero(target)
    weights = target[classes]
    if multi_label:
        if np.all(weights == 1):
            return ",".join(str(c) for c in classes)
        return ",".join(f"{c}:{w:.2f}" for c, w in zip(classes, weights, strict=True))
    if len(classes) == 1 and weights[0] == 1:
        return str(int(classes[0]))
    top = np.argsort(-target, kind="stable")[:2]  # ties: the lower class first
    return " ".join(f"{c}:{target[c]:.2f}" for c in top if target[c] > 0)


def training_batch(data, trainer, epoch: int, step: int):
    """Rank ``trainer.global_rank``'s training batch ``(images, targets)`` of ``epoch`` / ``step``, made by
    ``data`` exactly as for the step's ``training_step``: the loader resumed at the step, then
    ``on_before_batch_transfer``."""
    data.trainer = trainer
    data.prepare_data()
    data.setup("fit")
    loader = data.train_dataloader()
    if step >= len(loader):
        raise ConfigError(f"--step {step}: an epoch has {len(loader)} steps (0..{len(loader) - 1}) at "
                          f"data.batch_size={data.batch_size} and world size {trainer.world_size}")
    loader.epoch_fn = lambda: epoch  # the trainer's current epoch during a run
    loader.load_state_dict({"epoch": epoch, "consumed": step})  # what a resume at this step restores
    batches = iter(loader)
    try:
        batch = next(batches)
    finally:
        close = getattr(batches, "close", None)  # stops a stream's loader workers
        if close is not None:
            close()
    return data.on_before_batch_transfer(batch, 0)


def batch_sheet(images, targets, *, mean, std, views: int, multi_label: bool, num: int) -> Sheet:
    """The first ``num`` samples of a model input batch as tiles: two-view batches (all first views, then all
    second views) as adjacent pairs."""
    pixels = to_pixels(images, mean, std)
    if views:
        samples = len(pixels) // views
        shown = min(num, samples)
        order = [v * samples + i for i in range(shown) for v in range(views)]
        captions = [f"pair {i} view {v + 1}" for i in range(shown) for v in range(views)]
        return Sheet(pixels[order], captions, group=views)
    targets = targets.detach().cpu().float().numpy() if targets.is_floating_point() else targets.cpu().numpy()
    shown = min(num, len(pixels))
    return Sheet(pixels[:shown], [target_caption(t, multi_label) for t in targets[:shown]])


def _check_epoch(trainer, epoch: int) -> None:
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and epoch >= max_epochs:
        raise ConfigError(f"--epoch {epoch}: the run trains epochs 0..{max_epochs - 1} "
                          f"(trainer.max_epochs={max_epochs})")


@contextlib.contextmanager
def quiet_lightning():
    """A preview trains nothing: Lightning's start-up lines (seed, accelerators, tips, the srun hint) are
    noise there. Its warnings and errors still show."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`srun` command is available.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def preview_fit(argv: Sequence[str]) -> int:
    """Runs ``fractal-pretrain preview ARGS`` (see the module docstring); returns the exit status."""
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from fractal_pretrain.train.cli import make_cli

    options, rest = parse_preview(preview_options(PROG, "fit"), argv)
    with quiet_lightning():
        try:
            cli = make_cli(on_cpu(rest), prog=PROG, exit_on_error=False)
        except (ArgumentError, MisconfigurationException) as exc:  # a bad key or value, as one line
            raise ConfigError(str(exc)) from None
        _check_epoch(cli.trainer, options.epoch)
        data = cli.datamodule
        images, targets = training_batch(data, cli.trainer, options.epoch, options.step)
    sheet = batch_sheet(images, targets, mean=data.mean, std=data.std, views=data.views,
                        multi_label=data.multi_label, num=options.num)
    path, factor = write_sheet(sheet, options.out, options.zoom)
    samples = len(images) // max(1, data.views)
    print(f"wrote {path}: epoch {options.epoch} step {options.step}, rank {cli.trainer.global_rank} of "
          f"{cli.trainer.world_size} on {cli.trainer.strategy.root_device}, {len(sheet.captions) // sheet.group} of "
          f"{samples} samples, {images.shape[-1]} px x{factor}", flush=True)
    return 0
