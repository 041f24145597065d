"""``fractal-pretrain fit``: LightningCLI over FractalClassifier + FractalDataModule.

    fractal-pretrain fit --config jobs/pretrain/smoke.yaml --trainer.max_steps 20 --data.batch_size 8

Config files and dotted overrides as in any LightningCLI; unknown keys are errors. The run directory
is ``trainer.default_root_dir``:

    config.yaml                 the resolved config (rewritten on each (re)start)
    checkpoints/last.ckpt       every ``--checkpoint_every_n_steps`` steps, for resuming
    checkpoints/epoch=*.ckpt    every ``--keep_every_n_epochs`` epochs, kept
    logs/version_*/metrics.csv  loss, accuracy, learning rate, images/s (TensorBoard too if installed)
    backbone.pt, backbone.json  at the end (or ``fractal-pretrain export-backbone CKPT``)

``--ckpt_path auto`` (the default) resumes from the newest of ``requeue.ckpt``,
``checkpoints/last.ckpt`` and ``hpc_ckpt_*.ckpt`` in the run directory, so re-running the same command,
or a Slurm requeue, continues where the run stopped; ``none`` starts fresh; a path resumes from it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fractal_pretrain.cli_kit import check_output_dir
from fractal_pretrain.config import ConfigError
from fractal_pretrain.train.callbacks import ExportBackbone, ImagesPerSecond, RequeueOnSignal, progress_bar
from fractal_pretrain.train.data import FractalDataModule
from fractal_pretrain.train.model import FractalClassifier

CHECKPOINT_DIR = "checkpoints"


class RunConfig(SaveConfigCallback):
    """Saves the resolved config as ``<default_root_dir>/config.yaml`` (rank 0)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, root / "config.yaml", skip_none=False, overwrite=True)


def resume_checkpoint(root: Path, ckpt_path: str) -> str | None:
    """The checkpoint to resume from: see the module docstring for auto / none / a path."""
    if ckpt_path == "none":
        return None
    if ckpt_path != "auto":
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path!r}: file not found")
        return ckpt_path
    candidates = [root / RequeueOnSignal.CHECKPOINT, root / CHECKPOINT_DIR / "last.ckpt", *root.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None


class FractalCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.multi_label", "model.multi_label", apply_on="instantiate")
        parser.link_arguments("data.views", "model.views", apply_on="instantiate")
        parser.add_argument("--ckpt_path", default="auto", help="auto (resume if possible), none, or a checkpoint")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=500, help="refresh last.ckpt")
        parser.add_argument("--keep_every_n_epochs", type=int, default=10, help="keep a checkpoint every N epochs")
        parser.add_argument("--requeue_check_every", type=int, default=10,
                            help="steps between checks for a requeue signal (each check syncs the ranks)")
        parser.add_argument("--float32_matmul_precision", default="high", choices=["highest", "high", "medium"],
                            help="torch.set_float32_matmul_precision on CUDA: 'high' lets float32 products "
                                 "(the augmentation's crop, anything outside autocast) use TF32")

    def instantiate_trainer(self, **kwargs):
        config = self.config_init
        root = run_directory(config, kwargs, "runs/default")
        if torch.cuda.is_available():  # CPU matmuls keep full float32 (tests compare runs bit for bit)
            torch.set_float32_matmul_precision(config["float32_matmul_precision"])
        if config["checkpoint_every_n_steps"] < 1 or config["keep_every_n_epochs"] < 1:
            raise ConfigError("checkpoint_every_n_steps and keep_every_n_epochs must be >= 1")
        add_run_callbacks(config, kwargs, root, [
            ModelCheckpoint(dirpath=root / CHECKPOINT_DIR, every_n_epochs=config["keep_every_n_epochs"],
                            save_top_k=-1, filename="{epoch:03d}-{step}"),
            LearningRateMonitor(logging_interval="step"),
            ImagesPerSecond(),
            ExportBackbone(),
        ])
        return super().instantiate_trainer(**kwargs)


def run_directory(config, kwargs: dict, default: str) -> Path:
    """The run directory (``trainer.default_root_dir``, else ``default``), with the default loggers in it
    unless the config names its own (``fit`` and ``adapt``)."""
    trainer = config["trainer"]
    root = check_output_dir(trainer.get("default_root_dir") or default, "trainer.default_root_dir")
    trainer["default_root_dir"] = str(root)
    if trainer.get("logger") in (None, True):
        kwargs["logger"] = default_loggers(root)
    return root


def add_run_callbacks(config, kwargs: dict, root: Path, callbacks: list) -> None:
    """last.ckpt every ``checkpoint_every_n_steps``, then ``callbacks``, then the requeue check; under Slurm
    the layout check and the plugin (``fit`` and ``adapt``)."""
    trainer = config["trainer"]
    trainer["callbacks"] = list(trainer.get("callbacks") or []) + [
        ModelCheckpoint(dirpath=root / CHECKPOINT_DIR, every_n_train_steps=config["checkpoint_every_n_steps"],
                        save_last=True, save_top_k=0),
        *callbacks,
        RequeueOnSignal(check_every=config["requeue_check_every"]),
    ]
    bar = progress_bar(trainer)
    if bar is not None:
        trainer["callbacks"].append(bar)
    if SLURMEnvironment.detect():
        check_slurm_layout(trainer.get("devices", "auto"), trainer.get("num_nodes", 1))
        if not trainer.get("plugins"):
            # Preemption is handled by RequeueOnSignal (+ host-side scontrol), which also works in containers.
            kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]


# What a pre-training run learns from and with. Resuming with another value would continue a different run
# (another recipe's classes, a changed recipe key: silently mixed images; another head size, or another
# decay_norm_and_bias and so other optimiser groups, whose saved state cannot load: a traceback).
SAME_RUN_KEYS = {"data": ("datamodule_hyper_parameters", ("recipe", "recipe_overrides", "size", "seed", "source",
                                                          "batch_size", "samples_per_epoch", "augment")),
                 "model": ("hyper_parameters", ("arch", "num_classes", "multi_label", "views", "objective",
                                                "decay_norm_and_bias"))}
# Same-run keys added later: the value a checkpoint written before the key existed ran with.
SAME_RUN_BEFORE_KEY = {"model": {"decay_norm_and_bias": True}}


def check_same_run(saved: dict, ckpt: str, model, datamodule) -> None:
    """A checkpoint written by another run configuration is a one-line error naming the first key that differs."""
    for section, (stored, keys) in SAME_RUN_KEYS.items():
        recorded = saved.get(stored) or {}
        recorded = {**SAME_RUN_BEFORE_KEY.get(section, {}), **recorded} if recorded else recorded
        current = (model if section == "model" else datamodule).hparams
        both = [key for key in keys if key in recorded and key in current]  # a key older checkpoints lack: not a change
        for key in differing_keys(recorded, current, both)[:1]:
            raise ConfigError(f"{section}.{key}={current[key]!r}: {ckpt} was written by a run with "
                              f"{recorded[key]!r}; resume with that value, or use another "
                              f"trainer.default_root_dir or --ckpt_path none")


def check_same_images(saved: dict, ckpt: str, datamodule) -> None:
    """An image folder or shard set is the run's by its file list (names and sizes, not its path: a copy on
    node-local scratch resumes); another set would continue the run on other images."""
    if datamodule.listing is None:  # rendered: the recipe keys (check_same_run) say which images
        return
    recorded = (saved.get(type(datamodule).__qualname__) or {}).get("images") or {}
    current = datamodule.listing.record()
    if recorded.get("source") != current["source"]:  # another source altogether: check_same_run names it
        return
    for key in differing_keys(recorded, current, [k for k in ("count", "digest") if k in recorded])[:1]:
        raise ConfigError(f"data.path={datamodule.path!r}: {key} {current[key]!r} of its images, but "
                          f"{ckpt} was trained on images with {key} {recorded[key]!r} (another file list); resume "
                          f"with those images, or use another trainer.default_root_dir or --ckpt_path none")


def check_same_geometry(saved: dict, ckpt: str, datamodule, world: int) -> None:
    """A mid-epoch position counts batches of the world size (and, streamed, the loader workers) that wrote it;
    under others the rest of the epoch would skip or repeat samples."""
    loaders = ((saved.get("loops") or {}).get("fit_loop") or {}).get("state_dict", {}).get("combined_loader") or []
    recorded = loaders[0] if loaders and isinstance(loaders[0], dict) else {}  # absent: written before it was saved
    current = {"world": world, "workers": max(1, datamodule.num_workers)}
    names = {"world": "world size (trainer.devices x trainer.num_nodes)", "workers": "data.num_workers"}
    for key in differing_keys(recorded, current, [k for k in ("world", "workers") if k in recorded])[:1]:
        raise ConfigError(f"{names[key]}={current[key]}: {ckpt} was written with {recorded[key]}, and a resume with "
                          "another would skip or repeat samples of its epoch; resume with that value, or use another "
                          "trainer.default_root_dir or --ckpt_path none")


def read_checkpoint(ckpt: str, command: str, is_ours) -> dict:
    """The checkpoint to resume from, loaded for the resume checks (``fit``, ``adapt``) before anything is written:
    a file that cannot be read (cut short, not a checkpoint at all), or a checkpoint ``is_ours`` refuses (another
    command's), is a one-line ``ConfigError`` naming the path."""
    try:
        saved = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # noqa: BLE001  (any unreadable file: pickle, zip, EOF errors)
        raise ConfigError(f"ckpt_path={ckpt!r}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(saved, dict) or not is_ours(saved):
        raise ConfigError(f"ckpt_path={ckpt!r}: not a checkpoint of {command}")
    return saved


def differing_keys(recorded, current, keys) -> list[str]:
    """Those of ``keys`` whose value in a checkpoint's hyper-parameters ``recorded`` differs from this config's
    ``current``, in order (absent: None; a list and a tuple of the same values are the same)."""
    plain = lambda value: json.loads(json.dumps(value, default=list))  # noqa: E731
    return [key for key in keys if plain(recorded.get(key)) != plain(current.get(key))]


def run_checkpoint(cli: LightningCLI) -> str | None:
    """The checkpoint ``--ckpt_path`` names (auto: the newest in the run directory), or None."""
    return resume_checkpoint(Path(cli.trainer.default_root_dir), cli.config["ckpt_path"])


def fit_resuming(cli: LightningCLI, ckpt: str | None) -> int:
    """``trainer.fit`` from ``ckpt`` (``run_checkpoint``, checked by the caller)."""
    root = Path(cli.trainer.default_root_dir)
    if ckpt:
        print(f"resuming from {ckpt}", flush=True)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    except SIGTERMException:  # a SystemExit without a code: the run would look finished (status 0)
        if cli.trainer.is_global_zero:
            last = resume_checkpoint(root, "auto")
            print(f"{cli.parser.prog}: stopped by SIGTERM at step {cli.trainer.global_step}, not finished; the same "
                  f"command resumes from {last or 'the start (no checkpoint yet)'}", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    return 0


def check_slurm_layout(devices, num_nodes) -> None:
    """One task per device: Lightning checks this for multi-device runs only, so 2 tasks x devices=1 would
    train twice into one run directory. Catch every mismatch before anything starts."""
    tasks, nodes = os.environ.get("SLURM_NTASKS_PER_NODE"), os.environ.get("SLURM_NNODES")
    devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices  # "2" from the CLI
    if tasks and tasks.isdigit() and isinstance(devices, int) and devices != int(tasks):
        raise ConfigError(f"You set `devices={devices}` but Slurm runs --ntasks-per-node={tasks}: they must be "
                          f"equal (one task per device); set --trainer.devices {tasks}")
    if nodes and nodes.isdigit() and isinstance(num_nodes, int) and num_nodes != int(nodes):
        raise ConfigError(f"You set `num_nodes={num_nodes}` but the job has --nodes={nodes}: they must be equal")


def default_loggers(root: Path) -> list:
    loggers = [CSVLogger(root, name="logs")]
    if importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root, name="logs"))
    return loggers


def instantiate_cli(cli_class, model_class, data_class, argv: Sequence[str], prog: str, **parser_kwargs):
    """A LightningCLI parsed and instantiated (model, data module, trainer), not run (``fit``, ``adapt`` and their
    ``preview``): a bad key or value, or a trainer it cannot build (no GPU), is one ``ConfigError`` line instead of
    the parser's usage text, with no "Seed set to N" line before it (config.yaml records the seed)."""
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    with warnings.catch_warnings():  # we always pass args; LightningCLI warns when sys.argv has some too
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        seed_log.setLevel(logging.WARNING)
        try:
            return cli_class(model_class, data_class, run=False, args=list(argv), save_config_callback=RunConfig,
                             save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
                             seed_everything_default=0,
                             parser_kwargs={"prog": prog, "exit_on_error": False, **parser_kwargs})
        except ArgumentError as err:
            raise ConfigError(str(err)) from None
        except MisconfigurationException as err:  # Lightning's words name no key; a GPU one is the accelerator's
            gpu = "gpu" in str(err).lower()
            raise ConfigError(f"trainer.accelerator: {err} (no usable GPU here: --trainer.accelerator cpu, or auto)"
                              if gpu else str(err)) from None
        finally:
            seed_log.setLevel(level)


@contextmanager
def held_startup_output(shown_from: int = logging.NOTSET):
    """Lightning's start-up lines (GPU available, tips, srun hints: log records and warnings) held back while the
    block runs, so a bad config prints its one-line error only; shown once it passes (``fit``, ``adapt``: the checks
    that need the built trainer passed, the run starts), but for log records below level ``shown_from``, dropped
    (``preview``, which trains nothing: :func:`fractal_pretrain.train.preview.quiet_lightning`)."""
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    # Every logger with handlers, root included: Lightning's lines come from whichever package set the shared
    # rank_zero logger last (lightning.pytorch, lightning.fabric, or the standalone pytorch_lightning).
    loggers = [logging.root, *(logger for logger in logging.root.manager.loggerDict.values()
                               if isinstance(logger, logging.Logger) and logger.handlers)]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [Hold()], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # recorded as they would be shown, once per place
            yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
    for record in held:  # only reached when the block succeeded
        if record.levelno >= shown_from:
            logging.getLogger(record.name).handle(record)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def make_cli(argv: Sequence[str], prog: str = "fractal-pretrain fit", **parser_kwargs) -> FractalCLI:
    """The ``fit`` command line parsed and instantiated, not run: every key and check of ``fit``, also for
    ``fractal-pretrain preview``."""
    return instantiate_cli(FractalCLI, FractalClassifier, FractalDataModule, argv, prog, **parser_kwargs)


def fit(argv: Sequence[str]) -> int:
    """Runs ``fractal-pretrain fit ARGS``; returns the exit status."""
    with held_startup_output():
        cli = make_cli(argv)
        cli.datamodule.load_images()  # bad images are errors before the run directory is touched
        cli.datamodule.check_device_memory(cli.trainer.strategy.root_device)  # so is a view bank that cannot fit
        cli.model.check_schedule(cli.trainer, cli.datamodule)  # so is a schedule that does not fit the run
        steps = cli.datamodule.train_steps_per_epoch(cli.trainer.world_size)  # and a batch split that cannot train
        cli.datamodule.val_steps_per_epoch(cli.trainer.world_size)  # or validate
        check_val_interval(cli.trainer, steps)
        ckpt = run_checkpoint(cli)
        check_resumable(ckpt, cli.model, cli.datamodule, cli.trainer.world_size)
    return fit_resuming(cli, ckpt)


def check_val_interval(trainer, steps: int) -> None:
    """Lightning refuses a step count ``val_check_interval`` longer than the epoch with a traceback once the run
    directory exists (e.g. a GPU config shrunk for a CPU try); the same condition as one line, earlier."""
    interval = trainer.val_check_interval
    if (isinstance(interval, int) and not isinstance(interval, bool) and interval > steps
            and trainer.check_val_every_n_epoch is not None and trainer.limit_val_batches > 0
            and trainer.limit_train_batches == 1.0):
        raise ConfigError(f"trainer.val_check_interval={interval}: more than the {steps} training steps of an epoch; "
                          "lower it, or set trainer.check_val_every_n_epoch null to count steps across epochs")


def check_resumable(ckpt: str | None, model, datamodule, world: int = 1) -> None:
    """A checkpoint of another run (recipe, size, seed, source, arch, classes, images, batch geometry...) or whose
    weights this config's model cannot take is an error naming the key, before the run directory (and its
    config.yaml) is rewritten; Lightning would fail later with a traceback, or silently continue a different run."""
    if ckpt is None:
        return
    saved = read_checkpoint(ckpt, "fractal-pretrain fit", lambda saved: isinstance(saved.get("state_dict"), dict))
    check_same_run(saved, ckpt, model, datamodule)
    check_same_images(saved, ckpt, datamodule)
    check_same_geometry(saved, ckpt, datamodule, world)
    theirs = saved["state_dict"]
    ours = model.state_dict()
    for key in sorted(set(ours) | set(theirs)):
        if key not in theirs or key not in ours or theirs[key].shape != ours[key].shape:
            there = tuple(theirs[key].shape) if key in theirs else "missing"
            here = tuple(ours[key].shape) if key in ours else "missing"
            raise ConfigError(f"ckpt_path={ckpt!r}: {key} is {there} there, {here} in this config's model (another "
                              "arch or class count?); resume with the config that wrote it, or --ckpt_path none")
