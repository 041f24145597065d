"""Callbacks of every pre-training run: images/s, the backbone export, a clean stop on a requeue signal, the
progress bar's epoch caption."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl

from fractal_pretrain.train.backbone import backbone_meta, backbone_state, write_backbone


class ImagesPerSecond(pl.Callback):
    """Logs ``train/images_per_s`` (all ranks together) averaged over the logging interval.

    Wall-clock between batch ends without device syncs: in steady state the host waits on the GPU
    queue, so the interval measures the device. The first interval of each fit is skipped (warm-up).
    """

    def __init__(self):
        self._start: float | None = None
        self._steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start, self._steps = now, 0
            return
        self._steps += 1
        if self._steps >= trainer.log_every_n_steps:
            images = self._steps * len(batch[1]) * trainer.world_size  # samples: two views count once
            pl_module.log("train/images_per_s", images / (now - self._start), rank_zero_only=True)
            self._start, self._steps = now, 0


def progress_bar(trainer_config: dict):
    """Lightning's default (Rich) progress bar, captioned "Epoch 0 (max_steps 10000)" where Lightning writes
    "Epoch 0/-2" (runs bounded by steps, max_epochs -1); None where Lightning's own choice stands (no bar,
    a bar the config names, no rich)."""
    import importlib.util

    callbacks = trainer_config.get("callbacks") or []
    if trainer_config.get("enable_progress_bar") is False or importlib.util.find_spec("rich") is None or any(
            isinstance(c, pl.callbacks.ProgressBar) for c in callbacks):
        return None
    from lightning.pytorch.callbacks import RichProgressBar

    class StepsCaptionedBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
            if max_epochs is not None and max_epochs >= 0 or max_steps < 0:
                return super()._get_train_description(current_epoch)
            caption = f"Epoch {current_epoch} (max_steps {max_steps})"
            return f"{caption:{len(self.validation_description)}}"  # same width as "Validation" (no flicker)

    return StepsCaptionedBar()


class ExportBackbone(pl.Callback):
    """Writes backbone.pt + backbone.json into the run directory when fit ends."""

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        if RequeueOnSignal.marker(trainer.default_root_dir).exists():
            return  # stopped for a requeue: the run is not finished
        state = backbone_state(pl_module.state_dict(), pl_module.hparams.arch)
        meta = backbone_meta(pl_module.hparams, trainer.datamodule.hparams, epoch=trainer.current_epoch,
                             steps=trainer.global_step, source=str(Path(trainer.default_root_dir).resolve()),
                             images=getattr(trainer.datamodule, "record", None))
        path = write_backbone(state, meta, trainer.default_root_dir)
        print(f"backbone: {path}", flush=True)


class RequeueOnSignal(pl.Callback):
    """Container-friendly preemption: on the signal, checkpoint at the next batch end and stop.

    Lightning's own Slurm auto-requeue runs ``scontrol`` inside this process, which a container
    usually lacks. Here every rank agrees to stop after the same batch, the checkpoint is exact
    (saved between steps), and rank 0 leaves a ``REQUEUE`` marker for the batch script, which then
    runs ``scontrol requeue`` on the host (slurm/pretrain.sbatch).
    """

    CHECKPOINT = "requeue.ckpt"
    MARKER = "REQUEUE"
    MARKER_ENV = "FRACTAL_PRETRAIN_REQUEUE_MARKER"  # the batch script says where it looks

    @classmethod
    def marker(cls, root: str | Path) -> Path:
        return Path(os.environ.get(cls.MARKER_ENV) or Path(root) / cls.MARKER)

    def __init__(self, signum: int = signal.SIGUSR1, check_every: int = 10):
        self.signum, self.check_every = signum, check_every
        self.requested = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        signal.signal(self.signum, self._handle)
        if trainer.is_global_zero:  # an earlier stop's marker (this run is its resume) would block the export
            self.marker(trainer.default_root_dir).unlink(missing_ok=True)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Agreeing is a collective that syncs the device: only every check_every steps.
        if trainer.global_step % self.check_every:
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        root = Path(trainer.default_root_dir)
        trainer.save_checkpoint(root / self.CHECKPOINT)
        if trainer.is_global_zero:
            self.marker(root).write_text(f"step {trainer.global_step}\n")
            print(f"requeue requested: checkpoint at step {trainer.global_step}", flush=True)
        trainer.should_stop = True
