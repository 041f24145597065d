"""``fractal-pretrain adapt``: LightningCLI over AdaptModule + AdaptData, the machinery of ``fit``.

    fractal-pretrain adapt --config jobs/adapt/smoke.yaml [--trainer.max_steps 20 ...]

The run directory is ``trainer.default_root_dir``: ``config.yaml``, ``checkpoints/last.ckpt`` (every
``--checkpoint_every_n_steps``), ``logs/version_*/metrics.csv`` and, at the end, ``projector.pt`` +
``projector.json``. ``--ckpt_path auto`` (the default) resumes from the newest checkpoint as ``fit`` does;
the batch counter is in the checkpoint, so a resumed run continues with the very next batch. Slurm
requeue and DDP come from the same callbacks and checks as ``fit`` (``train/cli.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from fractal_pretrain.adapt.model import AdaptModule
from fractal_pretrain.config import ConfigError, check_range
from fractal_pretrain.train.callbacks import RequeueOnSignal
from fractal_pretrain.train.cli import (
    add_run_callbacks,
    differing_keys,
    fit_resuming,
    held_startup_output,
    instantiate_cli,
    read_checkpoint,
    run_checkpoint,
    run_directory,
)


class AdaptData(pl.LightningDataModule):
    """Only batch numbers: every image is rendered from its key inside the step, on the device."""

    def __init__(self, batches_per_epoch: int = 1000, val_batches: int = 2):
        super().__init__()
        check_range("data.batches_per_epoch", batches_per_epoch, 1, 10**9, integer=True)
        check_range("data.val_batches", val_batches, 0, 10**6, integer=True)
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches

    def train_dataloader(self):
        return DataLoader(torch.arange(self.batches_per_epoch), batch_size=None)

    def val_dataloader(self):
        return DataLoader(torch.arange(self.val_batches), batch_size=None)


class ExportProjector(pl.Callback):
    """projector.pt + projector.json in the run directory when fit ends (rank 0), as ``ExportBackbone``:
    on fit end, not train end, so a run resumed from a checkpoint at ``max_steps`` (killed after its last
    checkpoint, before the export) still writes them; not after a requeue stop (the run is not finished)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or RequeueOnSignal.marker(trainer.default_root_dir).exists():
            return
        pl_module.export(Path(trainer.default_root_dir), trainer.global_step)
        print(f"wrote {Path(trainer.default_root_dir) / 'projector.pt'}", flush=True)


class AdaptCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", default="auto", help="auto (resume if possible), none, or a checkpoint")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=500, help="refresh last.ckpt")
        parser.add_argument("--requeue_check_every", type=int, default=10, help="steps between requeue checks")

    def instantiate_trainer(self, **kwargs):
        config = self.config_init
        root = run_directory(config, kwargs, "runs/adapt")
        if config["checkpoint_every_n_steps"] < 1:
            raise ConfigError("checkpoint_every_n_steps must be >= 1")
        if (config["trainer"].get("max_steps") or -1) < 1:
            raise ConfigError("trainer.max_steps: adapt needs a fixed number of steps (>= 1)")
        if self.model.mix.anomaly_p <= 0:  # the synthesizer allows it (clean copies); training learns nothing
            raise ConfigError("model.anomalies: anomaly_p=0: no image would get a defect, every step would be "
                              "skipped and the projector written untrained")
        add_run_callbacks(config, kwargs, root, [ExportProjector()])
        return super().instantiate_trainer(**kwargs)


def make_adapt_cli(argv: Sequence[str], prog: str = "fractal-pretrain adapt", **parser_kwargs) -> AdaptCLI:
    """The ``adapt`` command line parsed and instantiated (module, data, trainer), not run: every key and check
    of ``adapt``, also for ``fractal-pretrain preview``. A bad key or value is a ``ConfigError`` (one line),
    not the parser's usage text."""
    from ad_eval.backbones import BackboneError

    try:
        return instantiate_cli(AdaptCLI, AdaptModule, AdaptData, argv, prog, **parser_kwargs)
    except BackboneError as err:
        raise ConfigError(f"model.backbone: {err}") from None


# Model keys a resume may change: where images are rendered (the same images everywhere), the backbone's
# spelling (compared by its weights digest instead: a moved file is the same backbone, a retrained one is not).
RESUMABLE_KEYS = frozenset({"render_device", "backbone", "_instantiator"})


def check_resume(ckpt: str | None, model: AdaptModule, world: int = 1) -> None:
    """A checkpoint of another model config would continue (or, at max_steps, export) a projector that its
    projector.json, written from this config, misdescribes: refuse it, naming the differing keys; so would one
    written with another world size (its steps drew other batch numbers, and ``batches`` would be miscounted)."""
    if ckpt is None:
        return
    saved = read_checkpoint(ckpt, "fractal-pretrain adapt",
                            lambda saved: "backbone_seed" in (saved.get("hyper_parameters") or {}))
    before, now = saved["hyper_parameters"], dict(model.hparams)
    changed = [f"model.{key}: {before.get(key)!r} there, {now.get(key)!r} here"
               for key in differing_keys(before, now, sorted((set(before) | set(now)) - RESUMABLE_KEYS))]
    if saved.get("backbone_digest", model.backbone_digest) != model.backbone_digest:
        changed.insert(0, f"model.backbone weights: digest {saved['backbone_digest']} there, "
                          f"{model.backbone_digest} here")
    if saved.get("world_size", world) != world:
        changed.append(f"world size (trainer.devices x trainer.num_nodes): {saved['world_size']} there, {world} here")
    if changed:
        raise ConfigError(f"checkpoint {ckpt} was written by another adapt config ({'; '.join(changed)}): use "
                          "another trainer.default_root_dir, or --ckpt_path none to start afresh")


def adapt(argv: Sequence[str]) -> int:
    """Runs ``fractal-pretrain adapt ARGS``; returns the exit status."""
    with held_startup_output():
        cli = make_adapt_cli(argv)
        ckpt = run_checkpoint(cli)
        check_resume(ckpt, cli.model, cli.trainer.world_size)
    with warnings.catch_warnings():
        # Lightning warns that a mid-epoch resume with a stateless loader is "unreliable": the loader only
        # yields batch numbers, the batch counter is the module's (in the checkpoint), the resume is exact.
        warnings.filterwarnings("ignore", message=".*ended before the epoch ended and your dataloader is not resumable")
        return fit_resuming(cli, ckpt)
