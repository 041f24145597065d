"""Training data: each rank renders its batches on its own device, or draws them from a fixed image set.

An epoch is the global index space ``[0, samples_per_epoch)``; sample ``i`` of epoch ``e`` is the
image of key ``(seed, e, i)``, so epochs are fresh and any rank renders the same image for the same
key. Step ``s`` covers the global slice ``[s * G, (s + 1) * G)`` with ``G = batch_size * world_size``,
split into contiguous per-rank parts: ranks see disjoint samples whose union is the whole epoch,
whatever the world size. The loaders yield only index batches (a few KiB); images are rendered in
``on_before_batch_transfer`` right before the step, on the device, so the Lightning transfer is a no-op.

The validation set is fixed: indices ``[0, val_samples)`` of the reserved epoch ``VAL_EPOCH``.

Fixed image sets (``train/images.py``: a recipe with ``images_per_class`` such as ``ofdb``, an image
folder, WebDataset shards) are decoded or rendered once and stay on the device as uint8; an epoch is
the set, visited in the order ``epoch_order(seed, epoch)``, so the same index batches (and resumes)
apply. Shards larger than ``data.resident_gb`` stream instead (``images.ShardStream``): each rank reads its
own contiguous part of the epoch's shard sequence, ``count // (batch_size * world)`` full batches on every
rank, and a resume skips the consumed batches, so it is exact for the same world size and worker count.
``data.augment`` (``fractal_pretrain/augment``) then makes every training batch on the device;
validation uses the first ``val_samples`` images of the set, resized to the augmentation's output size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import lightning.pytorch as pl
import numpy as np

from fractal_pretrain.config import ConfigError, check_choice, check_range
from fractal_pretrain.recipes import default_size, get_recipe, recipe_family
from fractal_pretrain.render.fast_cpu import available_cores
from fractal_pretrain.render.renderer import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_THREADS,
    check_output,
    make_renderer,
)
from fractal_pretrain.train import images as image_sets
from fractal_pretrain.transfer import host_to_device

SOURCES = ("render", "folder", "webdataset")

VAL_EPOCH = 2**32 - 1  # an epoch number training never reaches: validation keys never meet training keys


def rank_slice(step: int, total: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Global sample indices of ``rank`` at ``step``: its contiguous part of the step's global slice."""
    lo = step * batch_size * world
    hi = min(lo + batch_size * world, total)
    return np.array_split(np.arange(lo, hi, dtype=np.int64), world)[rank]


def steps_per_epoch(total: int, batch_size: int, world: int, per_rank: int = 1, split: str = "train") -> int:
    """Steps that cover ``total`` samples; a short last step must still give every rank ``per_rank`` samples
    (two views: 2; training: the objective's heads batch-normalise; validation: its statistics compare a pair
    with the others, and every rank must log them for the cross-rank mean)."""
    global_batch = batch_size * world
    steps = -(-total // global_batch)
    tail = total - (steps - 1) * global_batch
    if tail < world * per_rank:
        name, stage = ("samples_per_epoch", "training") if split == "train" else ("val_samples", "validation")
        need = f"; two-view {stage} needs {per_rank} per rank" if per_rank > 1 else ""
        raise ConfigError(
            f"{name}={total}: the last step would hold {tail} sample(s) for {world} ranks{need}; "
            f"use a multiple of batch_size * world_size = {global_batch}")
    return steps


class ResumableBatches:
    """A rank's batches of one split, stateful, so a mid-epoch resume continues exactly.

    Lightning prefetches a batch ahead, so the iterator position is not what training used: the
    data module reports each batch actually consumed (``mark_consumed``) and ``state_dict`` saves that;
    Lightning hands it back to ``load_state_dict`` on a restore, and the next iteration of that epoch
    starts after the consumed batches (``_begin``).
    """

    steps: int

    def __init__(self, epoch_fn):
        self.epoch_fn = epoch_fn
        self.epoch, self.consumed = -1, 0
        self._resume: dict[int, int] = {}

    def __len__(self) -> int:
        return self.steps

    def _begin(self) -> tuple[int, int]:
        """(epoch, first step) of a new iteration: step 0, or where a restored run stopped."""
        epoch = self.epoch_fn()
        start = self._resume.pop(epoch, 0)
        self.epoch, self.consumed = epoch, start
        return epoch, start

    def mark_consumed(self, step: int) -> None:
        self.consumed = step + 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, **self.geometry()}

    def geometry(self) -> dict[str, int]:
        """What else the position ``consumed`` depends on (ranks, stream workers): a resume under other values
        would skip or repeat samples, so ``fit`` refuses it (train/cli.py check_same_geometry)."""
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {int(state["epoch"]): int(state["consumed"])}


class KeyBatches(ResumableBatches):
    """One rank's index batches for one split (rendered keys or positions in a fixed set's epoch order)."""

    def __init__(self, split: str, total: int, batch_size: int, rank: int, world: int, epoch_fn, per_rank: int = 1):
        super().__init__(epoch_fn)
        self.split, self.total, self.batch_size, self.rank, self.world = split, total, batch_size, rank, world
        self.steps = steps_per_epoch(total, batch_size, world, per_rank, split)

    def geometry(self) -> dict[str, int]:
        return {"world": self.world}

    def __iter__(self):
        epoch, start = self._begin()
        for step in range(start, self.steps):
            indices = rank_slice(step, self.total, self.batch_size, self.rank, self.world)
            yield {"split": self.split, "epoch": epoch, "step": step, "indices": indices}


class StreamBatches(ResumableBatches):
    """One rank's batches of a streamed shard set (``images.ShardStream``): a DataLoader per epoch whose
    workers read the shards; each batch is a pure function of (seed, epoch, step, rank, world, workers)."""

    def __init__(self, stream: image_sets.ShardStream, num_workers: int, epoch_fn, pin_memory: bool = False):
        super().__init__(epoch_fn)
        self.stream, self.num_workers, self.steps = stream, num_workers, stream.steps
        self.pin_memory = pin_memory  # CUDA: batches arrive pinned (the loader's thread), their upload is async

    def geometry(self) -> dict[str, int]:
        return {"world": self.stream.world, "workers": self.stream.workers}

    def __iter__(self):
        from torch.utils.data import DataLoader

        self.stream.epoch, self.stream.start = self._begin()  # read by the workers this DataLoader starts
        try:
            yield from DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                  pin_memory=self.pin_memory)
        except ConfigError as err:  # from a worker, torch wraps the message in the worker's traceback
            raise ConfigError(str(err).rstrip().rsplit("ConfigError: ", 1)[-1]) from None


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


def normalise(images, mean, std, dtype: str, channels_last: bool):
    """uint8 (B, 3, H, W) on any device -> ``(x / 255 - mean) / std`` in ``dtype`` (the renderer's arithmetic)."""
    import torch

    m, s = channel_stats(tuple(mean), tuple(std), images.device)
    out = ((images.float() * np.float32(1.0 / 255.0) - m) / s).to(getattr(torch, dtype))
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@functools.cache
def channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device) -> tuple:
    """``mean`` and ``std`` as float32 (1, 3, 1, 1) tensors on ``device``, uploaded once (as BatchAugmenter's):
    ``normalise`` runs on every batch."""
    return tuple(host_to_device(np.asarray(v, dtype=np.float32), device).view(1, 3, 1, 1) for v in (mean, std))


def augment_config(augment: dict[str, Any] | None, mean, std):
    """The validated ``data.augment`` block (None: absent or not enabled), normalising with data.mean/std.

    The normalisation is the data module's (it is what ``backbone.json`` records), so the block may
    not set its own.
    """
    from fractal_pretrain.augment import AugmentConfig

    if augment is not None and isinstance(augment, dict):
        for key in ("mean", "std"):
            if key in augment:
                raise ConfigError(f"data.augment.{key}: set data.{key} instead (the run records it in backbone.json)")
        allowed = sorted(f.name for f in dataclasses.fields(AugmentConfig) if f.name not in ("mean", "std"))
        unknown = sorted(set(augment) - set(allowed))
        if unknown:  # AugmentConfig's own message would offer mean and std, refused above
            raise ConfigError(f"data.augment: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")
    try:
        config = AugmentConfig.from_dict(augment)
    except ConfigError as err:
        raise ConfigError(f"data.augment: {err}") from None
    if not config.enabled:
        return None
    return dataclasses.replace(config, mean=tuple(mean), std=tuple(std))


class FractalDataModule(pl.LightningDataModule):
    """Training batches made on the rank's device: rendered (CuPy kernels on CUDA, compiled C++ on the CPU
    cores), or drawn from a fixed image set.

    Args:
        recipe: Recipe name (``fractal-pretrain recipes`` lists them); with ``source: render``.
        recipe_overrides: Recipe keys to change, e.g. ``{num_classes: 100, num_points: 20000}``.
        size: Image side in pixels (rendered images; a fixed set's render size); null: 512 for a render-once
            recipe (``ofdb``, OFDB-4AD's size), else 256.
        batch_size: Samples per rank and step.
        samples_per_epoch: Global samples per epoch, split across ranks (fixed sets: the set's size).
        val_samples: Size of the fixed validation set (0 disables validation).
        seed: Base seed of every key (and of the system bank and of a fixed set's epoch order).
        mean: Per-channel input normalisation (recorded in ``backbone.json``).
        std: Per-channel input normalisation.
        prefetch: On CUDA, render the next batch on a side stream while the current step trains.
        dtype: Input dtype, ``float32`` or ``bfloat16`` (the float32 values rounded to nearest even, as a
            bf16 autocast would round them in the first convolution, without writing and reading float32);
            ``auto``: ``bfloat16`` on CUDA under ``trainer.precision`` bf16-mixed or bf16-true, else float32.
        num_threads: On CPU, threads that render a batch (null: the process's cores shared among the ranks of
            the node); the images do not depend on it.
        source: ``render`` (the recipe), ``folder`` (ImageFolder layout at ``path``) or ``webdataset``
            (tar shards at ``path``: a directory, a file or a brace pattern).
        path: The folder or shards of ``folder`` / ``webdataset``.
        augment: On-device augmentation (``fractal_pretrain.augment.AugmentConfig`` keys), or null.
        resident_gb: Largest fixed set kept on the device (uint8); larger shards stream.
        num_workers: Loader workers of a streamed shard set.
    """

    def __init__(self, recipe: str = "fractal4ad", recipe_overrides: dict[str, Any] | None = None,
                 size: int | None = None, batch_size: int = 512, samples_per_epoch: int = 1_000_000,
                 val_samples: int = 10_000, seed: int = 0, mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD, prefetch: bool = True, dtype: str = "auto",
                 num_threads: int | None = None, source: str = "render", path: str | None = None,
                 augment: dict[str, Any] | None = None, resident_gb: float = 16.0, num_workers: int = 4):
        super().__init__()
        self.recipe = get_recipe(recipe, recipe_overrides or {})
        if size is None:  # resolved before save_hyperparameters, which records it (checkpoints, backbone.json)
            size = default_size(self.recipe)
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
        check_choice("data.source", source, SOURCES)
        check_range("data.resident_gb", resident_gb, 0.0, None)
        check_range("data.num_workers", num_workers, 0, None, integer=True)
        if source != "render" and not path:
            raise ConfigError(f"data.source={source} needs data.path")
        if source == "render" and path:  # a forgotten data.source would train on rendered images instead
            raise ConfigError(f"data.path={path!r} is not read with data.source=render; set data.source to folder "
                              "or webdataset, or drop data.path")
        if source != "render" and self.recipe.views:  # else simsiam would say this recipe gives no views
            raise ConfigError(f"data.recipe={recipe}: its {self.recipe.views} views are rendered on the fly; "
                              f"data.source={source} gives one image per sample (use data.source: render)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.samples_per_epoch, self.val_samples = samples_per_epoch, val_samples
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.save_hyperparameters()
        self.prefetch = prefetch
        self.dtype = dtype
        self.source, self.path, self.resident_gb, self.num_workers = source, path, resident_gb, num_workers
        # Listing (and checking) a folder or the shards is cheap and gives the class count the model needs.
        self.listing = None
        if source == "folder":
            self.listing = image_sets.list_folder(path)
        elif source == "webdataset":
            self.listing = image_sets.list_shards(path)
        self.augment = augment_config(augment, self.mean, self.std)
        if self.views and batch_size < 2:
            raise ConfigError(f"data.batch_size={batch_size}: two-view training needs at least 2 samples per rank "
                              "(the objective's heads batch-normalise)")
        if self.augment is not None and self.views:
            raise ConfigError(f"data.augment: recipe {self.recipe.name!r} renders two views with their own draws; "
                              "set data.augment: null")
        self.augmenter = None  # built in setup, when the input dtype is known
        self.renderer = None
        self.image_set: image_sets.ImageSet | None = None
        self.record: dict[str, Any] = {}
        self._orders: dict[int, Any] = {}
        self._prefetcher: SideStreamPrefetch | None = None
        self._loaders: dict[str, ResumableBatches] = {}

    @property
    def num_classes(self) -> int:
        if self.source == "folder":
            return len(self.listing.classes)
        if self.source == "webdataset":
            return self.listing.num_classes
        return self.recipe.num_classes

    @property
    def views(self) -> int:
        """Views per sample (two-view recipes: batches of 2B images, all first views then all second views)."""
        return self.recipe.views if self.source == "render" else 0

    @property
    def multi_label(self) -> bool:
        return self.source == "render" and self.recipe.multi_label

    @property
    def fixed_set(self) -> bool:
        """True when training draws from a fixed image set kept on the device."""
        return (self.source == "render" and self.recipe.fixed_images > 0) or self.source == "folder" or (
            self.source == "webdataset" and not self.streams)

    @property
    def streams(self) -> bool:
        """Shards too large for ``resident_gb`` are streamed rather than kept."""
        if self.source != "webdataset":
            return False
        h, w = self.listing.shape
        return self.listing.count * 3 * h * w > self.resident_gb * 2**30

    def prepare_data(self) -> None:
        # Once per node, before the ranks set up: build (or load) the cached system bank (the reference
        # renderer: constructing it builds nothing else).
        if self.source == "render":
            make_renderer(self.recipe, size=self.size, seed=self.seed, device="cpu-reference")

    def setup(self, stage: str) -> None:
        if self.record:  # set up already (fit, then validate or test)
            return
        device = self._device()
        name = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
        self.device_name = name
        self.channels_last = name != "cpu"
        self.input_dtype = self._input_dtype(on_cuda=name != "cpu")
        if self.augment is not None:
            import torch

            from fractal_pretrain.augment import BatchAugmenter

            self.augmenter = BatchAugmenter(self.augment, self.num_classes, getattr(torch, self.input_dtype))
        if self.source == "render" and not self.fixed_set:
            self.renderer = make_renderer(self.recipe, size=self.size, seed=self.seed, device=name,
                                          num_threads=self._render_threads() if name == "cpu" else None)
            self.record = {"source": "render", "recipe": self.recipe.name, "size": self.size, "seed": self.seed}
            if self.prefetch and name != "cpu":
                self._prefetcher = SideStreamPrefetch(self._render, device)
        elif self.source == "render":
            self.image_set = image_sets.render_set(self.recipe, self.size, self.seed, name,
                                                   num_threads=self._render_threads() if name == "cpu" else None)
        elif self.source in ("folder", "webdataset") and not self.streams:
            self.load_images()
        else:
            self.record = {**self.listing.record(), "streamed": True}
        if self.image_set is not None:
            self.image_set = self.image_set.to(device if device is not None else "cpu")
            self.record = self.image_set.record
        if self.trainer is None or self.trainer.is_global_zero:
            print(f"images: {self.record}", flush=True)

    def load_images(self) -> None:
        """Decode a folder or resident shards on the host (once). ``fit`` calls it before the trainer
        starts, so an unreadable image or a size mismatch stops the run before it writes anything."""
        if self.image_set is not None or self.listing is None or self.streams:
            return
        mixed_sizes = self.augment is not None  # its crop (or resize) gives every image one size
        if self.source == "folder":
            self.image_set = image_sets.folder_set(self.listing, self.resident_gb, mixed_sizes)
        else:
            self.image_set = image_sets.shard_set(self.listing, mixed_sizes)

    def check_device_memory(self, device) -> None:
        """What setup would find too large for ``device`` (the trainer's root device), as a one-line error
        before the run writes anything: Lightning creates logs/version_N before ``setup``, so ``fit`` calls
        this first. Today: a Mandelbulb view bank larger than the device's free memory."""
        if self.source == "render" and recipe_family(self.recipe) == "mandelbulb":
            from fractal_pretrain.mandelbulb.renderer import check_bank_fits

            check_bank_fits(self.recipe, self.size, device)

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

    def _device(self):
        import torch

        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _train_total(self) -> int:
        """Samples per epoch: a fixed set's size, else ``samples_per_epoch``."""
        if self.source == "folder":
            return len(self.listing.files)
        if self.source == "webdataset":
            return self.listing.count
        return self.recipe.fixed_images or self.samples_per_epoch

    def train_steps_per_epoch(self, world: int | None = None) -> int:
        """Steps per epoch of this rank's train loader (the same on every rank), without building it; ``world``
        for a data module not yet attached to its trainer (``fit`` checks the count before the run starts)."""
        world = world or self._world()[1]
        if self.streams:
            return image_sets.stream_steps(self.listing.count, self.batch_size, world)
        return steps_per_epoch(self._train_total(), self.batch_size, world, self._per_rank)

    def val_steps_per_epoch(self, world: int | None = None) -> int:
        """Steps of this rank's validation loader (0: no validation), without building it; as above."""
        world = world or self._world()[1]
        if self.val_samples == 0 or self.streams:
            return 0
        return steps_per_epoch(self._val_total(), self.batch_size, world, self._per_rank, "val")

    def _val_total(self) -> int:
        return self.val_samples if not self.fixed_set else min(self.val_samples, self._train_total())

    @property
    def _per_rank(self) -> int:
        """Fewest samples a rank's batch may hold: two views need 2 (see steps_per_epoch)."""
        return 2 if self.views else 1

    def train_dataloader(self):
        rank, world = self._world()
        if self.streams:
            stream = image_sets.ShardStream(self.listing, self.batch_size, self.seed, rank, world, self.num_workers,
                                            mixed_sizes=self.augment is not None)  # its crop makes them one size
            if stream.steps < 1:
                raise ConfigError(f"data.path={self.path!r}: {self.listing.count} samples make no full batch of "
                                  f"{self.batch_size} for {world} rank(s)")
            self._loaders["train"] = StreamBatches(stream, self.num_workers, self._epoch,
                                                   pin_memory=self._device().type == "cuda")
            return self._loaders["train"]
        total = self._train_total()
        if total < world:
            raise ConfigError(f"data.samples_per_epoch={total}: fewer samples than ranks ({world})")
        self._loaders["train"] = KeyBatches("train", total, self.batch_size, rank, world, self._epoch,
                                            self._per_rank)
        return self._loaders["train"]

    def val_dataloader(self):
        rank, world = self._world()
        if not self.val_steps_per_epoch(world):
            return []
        self._loaders["val"] = KeyBatches("val", self._val_total(), self.batch_size, rank, world, lambda: VAL_EPOCH,
                                          self._per_rank)
        return self._loaders["val"]

    def _render(self, indices: np.ndarray, epoch: int):
        dtype = "uint8" if self.augmenter is not None else self.input_dtype
        return self.renderer.render_tensor(indices, epoch, dtype=dtype, channels_last=self.channels_last,
                                           mean=self.mean, std=self.std)

    def epoch_order(self, epoch: int):
        """The fixed set's order in ``epoch`` as a tensor on its device (cached for the running epoch)."""
        import torch

        if epoch not in self._orders:
            order = image_sets.epoch_order(self.seed, epoch, len(self.image_set))
            self._orders = {epoch: torch.from_numpy(order).to(self.image_set.labels.device)}
        return self._orders[epoch]

    def _take(self, split: str, epoch: int, indices: np.ndarray):
        """Image groups (one per image size; see ImageSet.gather) and labels of a fixed set at these epoch
        positions (validation: in set order)."""
        positions = host_to_device(indices, self.image_set.labels.device)  # every step: no host sync
        ids = positions if split == "val" else self.epoch_order(epoch)[positions]
        return self.image_set.gather(ids), self.image_set.labels[ids]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Index batch -> (images, targets) on this rank's device."""
        if not (isinstance(batch, dict) and ("indices" in batch or "images" in batch)):
            return batch
        keys = self._loaders[batch["split"]]
        keys.mark_consumed(batch["step"])
        if "images" in batch:
            return self._streamed(batch)
        epoch = VAL_EPOCH if batch["split"] == "val" else batch["epoch"]
        if self.image_set is not None:
            groups, labels = self._take(batch["split"], epoch, batch["indices"])
            return self._finish(groups, labels, batch["split"], epoch, batch["indices"], batch["step"])
        key = (batch["split"], epoch, batch["step"])
        rendered = self._prefetcher.take(key) if self._prefetcher else None
        if rendered is None:
            rendered = self._render(batch["indices"], epoch)
        if self._prefetcher and batch["step"] + 1 < keys.steps:
            following = rank_slice(batch["step"] + 1, keys.total, keys.batch_size, keys.rank, keys.world)
            self._prefetcher.schedule((batch["split"], epoch, batch["step"] + 1), following, epoch)
        if self.augmenter is None:
            return rendered
        images, labels = rendered
        return self._finish([(None, images)], labels, batch["split"], epoch, batch["indices"], batch["step"])

    def _streamed(self, batch):
        """A streamed shard batch (uint8 (B, H, W, 3) on the host, or a list of (H, W, 3) images of several
        sizes) -> the device, augmented like any other.

        Its samples take the global indices a resident set's step would give them (step-major, then rank),
        which key their augmentation draws.
        """
        import torch

        device = self._device()
        labels = host_to_device(np.asarray(batch["labels"], dtype=np.int64), device)
        if isinstance(batch["images"], (list, tuple)):  # several sizes: one group per size, as ImageSet.gather
            # positions stay on the host (known there; _merge uploads them): the draws index by them
            groups = [(np.asarray(where, dtype=np.int64), host_to_device(images, device))
                      for where, images in image_sets.size_groups([np.asarray(a) for a in batch["images"]])]
            if len(groups) == 1:
                groups = [(None, groups[0][1])]
        else:  # pinned by the loader on CUDA (StreamBatches): an asynchronous upload
            groups = [(None, host_to_device(torch.as_tensor(batch["images"]), device).permute(0, 3, 1, 2))]
        rank, world = self._world()
        step = int(batch["step"])
        indices = (step * world + rank) * self.batch_size + np.arange(len(labels), dtype=np.int64)
        return self._finish(groups, labels, "train", int(batch["epoch"]), indices, step)

    def _finish(self, groups, labels, split: str, epoch: int, indices: np.ndarray, step: int):
        """uint8 image groups (see ImageSet.gather) -> the model's input: augmented (training) or normalised."""
        import torch

        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if split == "train" and self.augmenter is not None:
            rank, _ = self._world()
            if len(groups) == 1 and groups[0][0] is None:
                images, targets = self.augmenter(groups[0][1], labels, seed=self.seed, epoch=epoch, indices=indices,
                                                 step=step, rank=rank)
            else:
                images, targets = self._augment_groups(groups, labels, epoch, indices, step, rank)
            return images.contiguous(memory_format=fmt), targets
        if split == "val" and self.augmenter is not None:
            groups = [(where, self._resize_for_validation(images)) for where, images in groups]
        images = self._merge(groups, len(labels))
        return normalise(images, self.mean, self.std, self.input_dtype, self.channels_last), labels

    def _augment_groups(self, groups, labels, epoch: int, indices: np.ndarray, step: int, rank: int):
        """BatchAugmenter's call for a batch of several image sizes: each size group gets its own samples'
        draws (keyed by their indices, so the same pixels as alone), then the whole batch is mixed."""
        from fractal_pretrain.augment import apply_mix
        from fractal_pretrain.augment.params import mix_params

        aug = self.augmenter
        parts = []
        for where, images in groups:
            own = indices[where if isinstance(where, np.ndarray) else where.cpu().numpy()]
            parts.append((where, aug.transform(images, aug.sample_params(images, self.seed, epoch, own))))
        images = self._merge(parts, len(labels))
        mix = mix_params(aug.config, self.seed, epoch, step, rank, len(images), *images.shape[-2:])
        images, targets = apply_mix(images, aug.targets(labels, images.device), mix)
        return images.to(aug.out_dtype), targets

    def _resize_for_validation(self, images):
        """Validation sees whole images at the training crop's size (OFDB-4AD's Resize(224))."""
        import torch.nn.functional as F

        side = self.augment.size
        if tuple(images.shape[-2:]) == (side, side):
            return images
        resized = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True,
                                align_corners=False)
        return resized.round().clamp(0, 255).to(images.dtype)

    @staticmethod
    def _merge(groups, n: int):
        """One batch tensor from groups of one size each, in batch order (positions: a tensor on the images'
        device, or a host array)."""
        if len(groups) == 1 and groups[0][0] is None:
            return groups[0][1]
        first = groups[0][1]
        out = first.new_empty((n, *first.shape[1:]))
        for where, images in groups:
            out[host_to_device(where, out.device) if isinstance(where, np.ndarray) else where] = images
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.record}
