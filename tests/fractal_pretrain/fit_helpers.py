"""What the `fit` tests share: a smoke run's command line, backbone weights, and the resume comparison."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback

from fractal_pretrain.cli import main


def fit_command(config: str, root: Path, *extra: str) -> list[str]:
    """`fractal-pretrain fit` of ``config`` into ``root``, deterministic and without a progress bar."""
    return ["fit", "--config", config, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
            "false", "--trainer.deterministic", "true", *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_split_run_equals_straight_run(fit_args, root: Path, stop_at: int, finish: tuple[str, ...],
                                         common: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Run ``root/straight`` to ``finish``; run ``root/split`` to step ``stop_at``, then resume it to ``finish``.

    Asserts both backbones have the same weights and returns the straight run's.
    """
    assert main(fit_args(root / "straight", *finish, *common)) == 0
    assert main(fit_args(root / "split", "--trainer.max_steps", str(stop_at), *common)) == 0
    assert main(fit_args(root / "split", *finish, *common)) == 0
    a, b = weights(root / "straight" / "backbone.pt"), weights(root / "split" / "backbone.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    return a


class SignalAtStep(Callback):
    """Sends this process a real signal (``SIGTERM``, ``SIGUSR1``) after optimiser step ``step``, once
    (``--trainer.callbacks+=fit_helpers.SignalAtStep``)."""

    def __init__(self, step: int = 2, signame: str = "SIGTERM"):
        self.step, self.signum = step, getattr(signal, signame)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
