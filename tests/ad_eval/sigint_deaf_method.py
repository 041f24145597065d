"""A method whose fit does not stop on SIGINT, as Lightning's does not (it takes one as a "graceful shutdown").

The local grid's Ctrl-C test (``test_grid.py``) runs it; the grid and its tasks import this module through
``AD_EVAL_METHODS=sigint_deaf_method`` with this folder on their ``PYTHONPATH``. The run writes the file named
by ``SIGINT_DEAF_STARTED`` once SIGINT is ignored, then waits to be killed.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ad_eval.methods import MethodSpec, register

STARTED_ENV = "SIGINT_DEAF_STARTED"  # test_grid.py sets it (by name: importing this module registers the method)


@dataclass(frozen=True)
class DeafConfig:
    """No hyper-parameters."""


def run_deaf(backbone, split, *, layers, size, crop, config, device, seed, work_dir):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Path(os.environ[STARTED_ENV]).touch()
    time.sleep(300)
    raise RuntimeError("sigintdeaf: still running after 300 s; only SIGKILL was to end it")


register(MethodSpec(name="sigintdeaf", label="SigintDeaf", config=DeafConfig, run=run_deaf, pixel_maps=False))
