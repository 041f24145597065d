"""``fractal-pretrain preview``: the training batch a ``fit`` or ``adapt`` config feeds its model, as a contact sheet.

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

An ``adapt`` config (:func:`config_command`: a ``model.*`` / ``data.*`` key that only ``adapt`` accepts, such as
``model.shots``; one only ``fit`` accepts, such as ``data.recipe``, means ``fit``; both or neither: a one-line
error) goes to :func:`preview_adapt`:

    fractal-pretrain preview --config jobs/adapt/smoke.yaml --batch 3 --out adapt.png
    fractal-pretrain preview --config jobs/adapt/cpu_r18.yaml --batch 0 --val --out adapt_val.png

It builds the module with ``adapt``'s own command line (``adapt/cli.py`` ``make_adapt_cli``, on the CPU as
above) and draws ``AdaptModule.batch_inputs`` of batch number ``--batch N`` (with ``--val`` validation batch N):
the images ``make_batch`` gives the backbone, one row per sample: the first
MAX_REFERENCE_TILES of its K references (``ref 1/K``), the normal image (``i: class c``), the anomalous image
(captioned with the defect kind drawn, or ``none``), the anomalous image with its exact mask in half red
(``mask 3.2%`` of the pixels), the two photometric views. Training batch N is step N // W of rank N % W of a
run of world size W (``AdaptModule.training_step``; one device: step N); W is the config's, as for ``fit``
(``trainer.devices`` x ``trainer.num_nodes``; pass ``--trainer.devices 4`` to number a 4-GPU run's batches),
and the output line says which step and rank the batch is.

The sheet-independent parts (options, output check, writing) are ``preview_options``, ``parse_preview``,
``Sheet`` and ``write_sheet``, shared by :func:`preview_fit` and :func:`preview_adapt`.
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
    """What to show and where: the batch of ``epoch`` / ``step`` (adapt: batch number ``step``, of validation
    with ``val``), its first ``num`` samples, into ``out``."""

    epoch: int
    step: int
    out: Path
    num: int
    zoom: int | None  # None: the smallest factor giving tiles of MIN_TILE_PX
    val: bool = False


@dataclasses.dataclass(frozen=True)
class Sheet:
    """Tiles to write: uint8 ``pixels`` (N, H, W, 3), one caption each; ``group`` tiles share a row (pairs);
    ``cols`` columns (None: a near-square grid)."""

    pixels: np.ndarray
    captions: list[str]
    group: int = 1
    cols: int | None = None


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
    override = "--model.batch_size 8" if command == "adapt" else "--data.batch_size 16"
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description=f"Write the training batch a `{command}` config gives its model as a PNG contact sheet (a fit "
                    f"or an adapt config, told apart by its keys; `--help` after an adapt --config shows adapt's). "
                    f"Every other argument is `fractal-pretrain {command}`'s (a --config file, dotted overrides "
                    f"such as {override}; see `fractal-pretrain {command} --help`).",
    )
    parser.add_argument("--out", required=True, help="output PNG (its folder must exist)")
    if command == "adapt":  # one batch counter over the whole run, and fixed validation batches
        parser.add_argument("--batch", "--step", dest="step", metavar="N", type=_non_negative, default=0,
                            help="batch number N (default 0): step N // W of rank N %% W at the config's world size "
                                 "W = trainer.devices x trainer.num_nodes (one device: step N); with --val, "
                                 "validation batch N")
        parser.add_argument("--val", action="store_true", help="a held-out validation batch, not a training one")
    else:
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
    return PreviewOptions(getattr(args, "epoch", 0), args.step, out, args.num, args.zoom,
                          getattr(args, "val", False)), rest


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
    path = save_grid(zoom(sheet.pixels, factor), out, labels=sheet.captions, group=sheet.group, cols=sheet.cols)
    return path, factor


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
    """``fit``'s :func:`~fractal_pretrain.train.cli.held_startup_output` for a preview: a bad config prints its
    one-line error only, as ``fit``; but a preview trains nothing, so on success Lightning's start-up info lines
    (accelerators, tips) and the srun hint are dropped instead of shown. Its warnings still show (at the end)."""
    from fractal_pretrain.train.cli import held_startup_output

    with held_startup_output(shown_from=logging.WARNING), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`srun` command is available.*")
        yield


def parsed_cli(make, command: str, argv: Sequence[str]):
    """(preview options, the ``command``'s LightningCLI built by ``make`` on the CPU, not run): every key and
    check of ``fit`` / ``adapt``; a bad key or value is one line (``train.cli.instantiate_cli``)."""
    options, rest = parse_preview(preview_options(PROG, command), argv)
    return options, make(on_cpu(rest), prog=PROG)


def preview_fit(argv: Sequence[str]) -> int:
    """Runs ``fractal-pretrain preview ARGS`` (see the module docstring); returns the exit status."""
    from fractal_pretrain.train.cli import make_cli

    options, cli = parsed_cli(make_cli, "fit", argv)
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


# ---------------------------------------------------------------------------------------------- adapt

MAX_REFERENCE_TILES = 4  # references shown per sample (the caption says how many of K)
MASK_COLOUR = (255, 0, 0)  # the mask tile: the anomalous image with the mask's pixels half this colour
_IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # to_pixels of float [0, 1] images (the photometric views)


def _uint8_pixels(images) -> np.ndarray:
    """(N, 3, H, W) uint8 tensor -> (N, H, W, 3) array."""
    return np.ascontiguousarray(images.detach().cpu().permute(0, 2, 3, 1).numpy())


def mask_overlay(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 ``pixels`` with the (N, H, W) bool ``mask`` drawn in: masked pixels become the
    mean of the pixel and MASK_COLOUR (rounded down), the others stay."""
    blended = (pixels.astype(np.uint16) + np.array(MASK_COLOUR, dtype=np.uint16)) // 2
    return np.where(mask[..., None], blended, pixels).astype(np.uint8)


def anomaly_kinds(module, inputs) -> list[str]:
    """Per sample of an ``AdaptBatch``, the defect kind its synthesizer drew (``anomalies.KINDS``), or "none":
    the same keyed plan as ``AnomalySynthesizer.apply`` (host draws only, nothing rendered)."""
    from fractal_pretrain.adapt.anomalies import KINDS, AnomalySynthesizer, sample_words

    batch, _, height, width = inputs.images.shape
    synth = AnomalySynthesizer(module.mix, seed=module.hparams.seed)
    plan = synth.plan(sample_words(module.hparams.seed, inputs.epoch, inputs.keys), height, width, batch)
    kinds = ["none"] * batch
    for row, kind in zip(plan["chosen"], plan["kind"], strict=True):
        kinds[int(row)] = KINDS[int(kind)]
    return kinds


def adapt_sheet(inputs, kinds: Sequence[str], num: int) -> Sheet:
    """One row per sample of an ``AdaptBatch`` (its first ``num``): the first MAX_REFERENCE_TILES of its K
    references, the normal image, the anomalous image, the anomalous image with the mask overlaid, the two
    photometric views."""
    batch, _, height, width = inputs.images.shape
    shown, refs = min(num, batch), min(inputs.k, MAX_REFERENCE_TILES)
    references = _uint8_pixels(inputs.references).reshape(batch, inputs.k, height, width, 3)[:shown, :refs]
    anomalous = _uint8_pixels(inputs.anomalous[:shown])
    mask = inputs.mask[:shown].cpu().numpy()
    columns = [_uint8_pixels(inputs.images[:shown]), anomalous, mask_overlay(anomalous, mask),
               *(to_pixels(view[:shown], *_IDENTITY) for view in inputs.views)]
    rows = np.concatenate([references, np.stack(columns, axis=1)], axis=1)
    captions = []
    for i in range(shown):
        captions += [f"ref {j + 1}/{inputs.k}" for j in range(refs)]
        captions += [f"{i}: class {int(inputs.classes[i])}", kinds[i], f"mask {100 * mask[i].mean():.1f}%",
                     "view 1", "view 2"]
    tiles = rows.shape[1]
    return Sheet(rows.reshape(-1, height, width, 3), captions, group=tiles, cols=tiles)


def _check_batch(cli, options: PreviewOptions) -> None:
    if options.val:
        val_batches = cli.datamodule.val_batches
        if options.step >= val_batches:
            raise ConfigError(f"--batch {options.step} --val: validation has batches 0..{val_batches - 1} "
                              f"(data.val_batches={val_batches})" if val_batches else
                              "--val: validation has no batches (data.val_batches=0)")
        return
    max_steps, world = cli.trainer.max_steps, cli.trainer.world_size
    if options.step >= max_steps * world:
        raise ConfigError(f"--batch {options.step}: the run trains batches 0..{max_steps * world - 1} "
                          f"(trainer.max_steps={max_steps} x world size {world})")


def batch_origin(batch: int, world_size: int) -> str:
    """Which step and rank train batch number ``batch`` (``AdaptModule.training_step``: s * world_size + r)."""
    step, rank = divmod(batch, world_size)
    return f"step {step}, rank {rank} of world size {world_size}"


def preview_adapt(argv: Sequence[str]) -> int:
    """Runs ``fractal-pretrain preview ARGS`` for an ``adapt`` config; returns the exit status."""
    from fractal_pretrain.adapt.cli import make_adapt_cli

    options, cli = parsed_cli(make_adapt_cli, "adapt", argv)
    _check_batch(cli, options)
    module = cli.model.to(cli.trainer.strategy.root_device)
    module.setup("fit")  # its renderers and anomaly synthesizer, as at the start of a run
    inputs = module.batch_inputs(options.step, val=options.val)
    kinds = anomaly_kinds(module, inputs)
    sheet = adapt_sheet(inputs, kinds, options.num)
    path, factor = write_sheet(sheet, options.out, options.zoom)
    batch = len(inputs.images)
    which = (f"validation batch {options.step}" if options.val else
             f"training batch {options.step} ({batch_origin(options.step, cli.trainer.world_size)})")
    print(f"wrote {path}: {which}, K={inputs.k}, "
          f"{len(sheet.captions) // sheet.group} of {batch} samples ({sum(k != 'none' for k in kinds)} anomalous) "
          f"on {module.device}, {inputs.images.shape[-1]} px x{factor}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- which config

def _config_keys(argv: Sequence[str]) -> tuple[list[str], set[str], bool]:
    """The readable ``--config`` files among ``argv``, the ``model.*`` / ``data.*`` keys they and the dotted
    overrides name (an unreadable file is left to the command line that parses it), and whether overrides
    name some."""
    import yaml

    paths, keys = [], set()
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.partition("=")[2])
        elif arg.startswith(("--model.", "--data.")):
            section, _, key = arg[2:].partition("=")[0].partition(".")
            keys.add(f"{section}.{key.split('.')[0]}")
    overridden = bool(keys)
    readable = []
    for path in paths:
        try:
            config = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if not isinstance(config, dict):
            continue
        readable.append(path)
        for section in ("model", "data"):
            if isinstance(config.get(section), dict):
                keys |= {f"{section}.{key}" for key in config[section]}
    return readable, keys, overridden


def _init_keys(model, data) -> set[str]:
    import inspect

    return {f"{section}.{name}" for section, cls in (("model", model), ("data", data))
            for name in inspect.signature(cls.__init__).parameters if name != "self"}


def config_command(argv: Sequence[str]) -> str:
    """``"fit"`` or ``"adapt"``: whose config ``argv`` gives, told apart by the ``model.*`` / ``data.*`` keys
    of its ``--config`` files and dotted overrides that only one of the two accepts (``data.recipe`` is
    fit's, ``model.shots`` adapt's; shared ones such as ``model.lr`` decide nothing). No config file that
    can be read and no such key: ``fit`` (its command line reports what is wrong)."""
    from fractal_pretrain.adapt.cli import AdaptData
    from fractal_pretrain.adapt.model import AdaptModule
    from fractal_pretrain.train.data import FractalDataModule
    from fractal_pretrain.train.model import FractalClassifier

    configs, keys, overridden = _config_keys(argv)
    fit_keys, adapt_keys = _init_keys(FractalClassifier, FractalDataModule), _init_keys(AdaptModule, AdaptData)
    fit_only, adapt_only = sorted(keys & (fit_keys - adapt_keys)), sorted(keys & (adapt_keys - fit_keys))
    where = f"--config {' '.join(configs)}{' with its overrides' if overridden else ''}" if configs else "the arguments"
    if fit_only and adapt_only:
        raise ConfigError(f"{where}: mixes keys of fit ({', '.join(fit_only[:3])}) and of adapt "
                          f"({', '.join(adapt_only[:3])}); preview takes a config of one of them")
    if adapt_only:
        return "adapt"
    if fit_only or not configs:
        return "fit"
    raise ConfigError(f"{where}: neither a fit config (no model/data key of fit's, such as data.recipe) nor an "
                      f"adapt config (no model/data key of adapt's, such as model.shots)")


def preview(argv: Sequence[str]) -> int:
    """Runs ``fractal-pretrain preview ARGS``: :func:`preview_fit` or :func:`preview_adapt` by the config's
    keys (:func:`config_command`); returns the exit status."""
    with quiet_lightning():
        return (preview_adapt if config_command(argv) == "adapt" else preview_fit)(argv)
