"""Training data without files or workers: each rank renders its batches on its own device.

An epoch is the global index space ``[0, samples_per_epoch)``; sample ``i`` of epoch ``e`` is the
image of key ``(seed, e, i)``, so epochs are fresh and any rank renders the same image for the same
key. Step ``s`` covers the global slice ``[s * G, (s + 1) * G)`` with ``G = batch_size * world_size``,
split into contiguous per-rank parts: ranks see disjoint samples whose union is the whole epoch,
whatever the world size. The loaders yield only index batches (a few KiB); images are rendered in
``on_before_batch_transfer`` right before the step, on the device, so the Lightning transfer is a no-op.

The validation set is fixed: indices ``[0, val_samples)`` of the reserved epoch ``VAL_EPOCH``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np

from fractal_pretrain.config import ConfigError, check_choice, check_range
from fractal_pretrain.recipes import get_recipe
from fractal_pretrain.render.fast_cpu import available_cores
from fractal_pretrain.render.renderer import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_THREADS,
    check_output,
    make_renderer,
)

VAL_EPOCH = 2**32 - 1  # an epoch number training never reaches: validation keys never meet training keys


def rank_slice(step: int, total: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Global sample indices of ``rank`` at ``step``: its contiguous part of the step's global slice."""
    lo = step * batch_size * world
    hi = min(lo + batch_size * world, total)
    return np.array_split(np.arange(lo, hi, dtype=np.int64), world)[rank]


def steps_per_epoch(total: int, batch_size: int, world: int) -> int:
    """Steps that cover ``total`` samples; a short last step must still give every rank a sample."""
    global_batch = batch_size * world
    steps = -(-total // global_batch)
    tail = total - (steps - 1) * global_batch
    if tail < world:
        raise ConfigError(
            f"samples_per_epoch={total}: the last step would hold {tail} sample(s) for {world} ranks; "
            f"use a multiple of batch_size * world_size = {global_batch}")
    return steps


class KeyBatches:
    """One rank's index batches for one split; stateful, so a mid-epoch resume continues exactly.

    Lightning prefetches a batch ahead, so the iterator position is not what training used: the
    data module reports each batch actually consumed (``mark_consumed``) and ``state_dict`` saves that.
    """

    def __init__(self, split: str, total: int, batch_size: int, rank: int, world: int, epoch_fn):
        self.split, self.total, self.batch_size, self.rank, self.world = split, total, batch_size, rank, world
        self.epoch_fn = epoch_fn
        self.steps = steps_per_epoch(total, batch_size, world)
        self.epoch, self.consumed = -1, 0
        self._resume: dict[int, int] = {}

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        epoch = self.epoch_fn()
        start = self._resume.pop(epoch, 0)
        self.epoch, self.consumed = epoch, start
        for step in range(start, self.steps):
            indices = rank_slice(step, self.total, self.batch_size, self.rank, self.world)
            yield {"split": self.split, "epoch": epoch, "step": step, "indices": indices}

    def mark_consumed(self, step: int) -> None:
        self.consumed = step + 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {int(state["epoch"]): int(state["consumed"])}


class SideStreamPrefetch:
    """Renders the next batch on a side CUDA stream while the current step runs on the main one.

    Only an optimisation: a batch is identified by its (split, epoch, step) and ``take`` returns it only
    if that exact batch was prefetched; anything else (a resume, a new epoch) is rendered on the spot.
    """

    def __init__(self, render, device):
        import torch

        self.render = render
        self.stream = torch.cuda.Stream(device=device)
        self.pending: dict[str, tuple] = {}  # split -> (key, images, labels): validation does not evict training

    def take(self, key: tuple):
        import torch

        pending = self.pending.pop(key[0], None)
        if pending is None or pending[0] != key:
            return None
        _, images, labels = pending
        main = torch.cuda.current_stream(images.device)
        main.wait_stream(self.stream)
        for tensor in (images, labels):  # made on the side stream, used on the main one
            tensor.record_stream(main)
        return images, labels

    def schedule(self, key: tuple, indices: np.ndarray, epoch: int) -> None:
        import torch

        with torch.cuda.stream(self.stream):
            images, labels = self.render(indices, epoch)
        self.pending[key[0]] = (key, images, labels)


class FractalDataModule(pl.LightningDataModule):
    """Fractal batches rendered on the rank's device (CuPy kernels on CUDA, compiled C++ on the CPU cores).

    Args:
        recipe: Recipe name (``fractal-pretrain recipes`` lists them).
        recipe_overrides: Recipe keys to change, e.g. ``{num_classes: 100, num_points: 20000}``.
        size: Image side in pixels.
        batch_size: Samples per rank and step.
        samples_per_epoch: Global samples per epoch, split across ranks.
        val_samples: Size of the fixed validation set (0 disables validation).
        seed: Base seed of every key (and of the system bank).
        mean: Per-channel input normalisation (recorded in ``backbone.json``).
        std: Per-channel input normalisation.
        prefetch: On CUDA, render the next batch on a side stream while the current step trains.
        dtype: Input dtype, ``float32`` or ``bfloat16`` (the float32 values rounded to nearest even, as a
            bf16 autocast would round them in the first convolution, without writing and reading float32);
            ``auto``: ``bfloat16`` on CUDA under ``trainer.precision`` bf16-mixed or bf16-true, else float32.
        num_threads: On CPU, threads that render a batch (null: the process's cores shared among the ranks of
            the node); the images do not depend on it.
    """

    def __init__(self, recipe: str = "fractal4ad", recipe_overrides: dict[str, Any] | None = None,
                 size: int = 256, batch_size: int = 512, samples_per_epoch: int = 1_000_000,
                 val_samples: int = 10_000, seed: int = 0, mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD, prefetch: bool = True, dtype: str = "auto",
                 num_threads: int | None = None):
        super().__init__()
        self.recipe = get_recipe(recipe, recipe_overrides or {})
        check_range("data.size", size, 8, 4096, integer=True)
        check_range("data.batch_size", batch_size, 1, None, integer=True)
        check_range("data.samples_per_epoch", samples_per_epoch, 1, None, integer=True)
        check_range("data.val_samples", val_samples, 0, None, integer=True)
        check_range("data.seed", seed, 0, 2**32 - 1, integer=True)
        check_output("float32", tuple(mean), tuple(std))
        check_choice("data.dtype", dtype, ("auto", "float32", "bfloat16"))
        if num_threads is not None:
            check_range("data.num_threads", num_threads, 0, MAX_THREADS, integer=True)
        self.num_threads = num_threads
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.samples_per_epoch, self.val_samples = samples_per_epoch, val_samples
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.save_hyperparameters()
        self.prefetch = prefetch
        self.dtype = dtype
        self.renderer = None
        self._prefetcher: SideStreamPrefetch | None = None
        self._loaders: dict[str, KeyBatches] = {}

    @property
    def num_classes(self) -> int:
        return self.recipe.num_classes

    @property
    def multi_label(self) -> bool:
        return self.recipe.multi_label

    def prepare_data(self) -> None:
        # Once per node, before the ranks set up: build (or load) the cached system bank (the reference
        # renderer: constructing it builds nothing else).
        make_renderer(self.recipe, size=self.size, seed=self.seed, device="cpu-reference")

    def setup(self, stage: str) -> None:
        if self.renderer is not None:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        name = f"cuda:{device.index or 0}" if device is not None and device.type == "cuda" else "cpu"
        self.renderer = make_renderer(self.recipe, size=self.size, seed=self.seed, device=name,
                                      num_threads=self._render_threads() if name == "cpu" else None)
        self.channels_last = name != "cpu"
        self.input_dtype = self._input_dtype(on_cuda=name != "cpu")
        if self.prefetch and name != "cpu":
            self._prefetcher = SideStreamPrefetch(self._render, device)

    def _render_threads(self) -> int:
        """data.num_threads, or the process's cores divided among this node's ranks (DDP on CPU runs one
        process per device, all on the same cores: each taking them all would oversubscribe them)."""
        if self.num_threads:
            return self.num_threads
        ranks_here = self.trainer.num_devices if self.trainer is not None else 1
        return max(1, available_cores() // max(1, ranks_here))

    def _input_dtype(self, on_cuda: bool) -> str:
        """The dtype batches are rendered in (see ``dtype``); bfloat16 needs a bf16 precision to run."""
        precision = str(self.trainer.precision) if self.trainer is not None else "32-true"
        bf16 = precision.startswith("bf16")
        if self.dtype == "auto":
            return "bfloat16" if on_cuda and bf16 else "float32"
        if self.dtype == "bfloat16" and not bf16:
            raise ConfigError(f"data.dtype=bfloat16 needs trainer.precision bf16-mixed or bf16-true, not {precision}")
        return self.dtype

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> KeyBatches:
        rank, world = self._world()
        if self.samples_per_epoch < world:
            raise ConfigError(f"data.samples_per_epoch={self.samples_per_epoch}: fewer samples than ranks ({world})")
        self._loaders["train"] = KeyBatches("train", self.samples_per_epoch, self.batch_size, rank, world,
                                            self._epoch)
        return self._loaders["train"]

    def val_dataloader(self):
        if self.val_samples == 0:
            return []
        rank, world = self._world()
        self._loaders["val"] = KeyBatches("val", self.val_samples, self.batch_size, rank, world, lambda: VAL_EPOCH)
        return self._loaders["val"]

    def _render(self, indices: np.ndarray, epoch: int):
        return self.renderer.render_tensor(indices, epoch, dtype=self.input_dtype, channels_last=self.channels_last,
                                           mean=self.mean, std=self.std)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Index batch -> (images, labels) rendered on this rank's device."""
        if not (isinstance(batch, dict) and "indices" in batch):
            return batch
        keys = self._loaders[batch["split"]]
        keys.mark_consumed(batch["step"])
        epoch = VAL_EPOCH if batch["split"] == "val" else batch["epoch"]
        key = (batch["split"], epoch, batch["step"])
        rendered = self._prefetcher.take(key) if self._prefetcher else None
        if rendered is None:
            rendered = self._render(batch["indices"], epoch)
        if self._prefetcher and batch["step"] + 1 < keys.steps:
            following = rank_slice(batch["step"] + 1, keys.total, keys.batch_size, keys.rank, keys.world)
            self._prefetcher.schedule((batch["split"], epoch, batch["step"] + 1), following, epoch)
        return rendered

    def describe(self) -> dict[str, Any]:
        """What ``backbone.json`` records about the data."""
        return {"recipe": self.recipe.name, "recipe_config": self.recipe.to_dict(), "seed": self.seed,
                "image_size": self.size, "mean": list(self.mean), "std": list(self.std),
                "samples_per_epoch": self.samples_per_epoch}

