"""Renderers: keys (seed, epoch, sample indices) in, labelled fractal images out.

``ReferenceRenderer`` runs the NumPy reference (``reference.py``) anywhere (``device: cpu-reference``);
``FastCpuRenderer`` (``fast_cpu.py``, ``device: cpu``) the same pipeline as compiled C++ on every core;
``CupyRenderer`` (``cupy_renderer.py``) as CUDA kernels. All three share planning, labels and
metadata from this module, so they differ only in where the pixels are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fractal_pretrain.config import ConfigError, check_range
from fractal_pretrain.ifs.bank import SystemBank, cached_bank
from fractal_pretrain.recipes import Recipe
from fractal_pretrain.render import reference
from fractal_pretrain.render.params import (
    ItemPlan,
    SamplePlan,
    object_size,
    plan_items,
    plan_samples,
    slots_per_sample,
)

MIN_SIZE = 8
MAX_SIZE = 4096
MAX_THREADS = 4096  # CPU render threads (num_threads; 0 or None: every core)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Output dtypes, in the order of compose.cu finish's out_kind; bfloat16: the float32 values rounded to nearest even.
OUTPUT_DTYPES = ("uint8", "float32", "bfloat16")


@dataclass
class RenderedBatch:
    """Images, labels and the generation record of a batch of samples."""

    images: np.ndarray  # (B, H, W, 3) uint8 on the host
    labels: np.ndarray  # (B,) int64 classes, or (B, num_classes) uint8 multi-hot
    recipe: Recipe
    seed: int
    epoch: int
    samples: SamplePlan
    items: ItemPlan
    points: np.ndarray  # (I,) recorded points per item (0 = degenerate system)
    size: int
    extra: dict = field(default_factory=dict)

    @property
    def degenerate(self) -> int:
        """Active fractals that produced no finite point (they render as background only)."""
        return int(((self.points == 0) & self.items.active).sum())

    def metadata(self, i: int) -> dict:
        """JSON-serialisable record of sample i: its key and every generation parameter."""
        s, slots = self.samples, slots_per_sample(self.recipe)
        objects = []
        for item in range(i * slots, i * slots + int(s.num_objects[i])):
            it = self.items
            objects.append({
                "system": int(it.system[item]),
                "class": int(it.object_class[item]),
                "jitter": int(it.jitter_try[item]),
                "shift": [float(v) for v in it.shift[item]],
                "scale": [float(v) for v in it.scale[item]],
                "patch_mask": int(it.mask[item]),
                "flips": int(it.flips[item]),
                "hue_shift": float(it.hue_shift[item]),
                "saturation": int(it.sat8[item]),
                "value": int(it.val8[item]),
                "points": int(self.points[item]),
                **({"side": int(it.side[item]), "top": int(it.top[item]), "left": int(it.left[item])}
                   if self.recipe.multi_object else {}),
            })
        label = self.labels[i]
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "index": int(s.index[i]),
            "recipe": self.recipe.name,
            "size": self.size,
            "label": label.nonzero()[0].tolist() if self.recipe.multi_label else int(label),
            "blur_sigma": float(s.blur_sigma[i]) if s.blur[i] else None,
            "objects": objects,
        }


def make_labels(recipe: Recipe, samples: SamplePlan, items: ItemPlan) -> np.ndarray:
    if not recipe.multi_label:
        return samples.label.copy()
    slots = slots_per_sample(recipe)
    hot = np.zeros((len(samples.index), recipe.num_classes), dtype=np.uint8)
    sample = np.arange(len(items.active)) // slots
    hot[sample[items.active], items.object_class[items.active]] = 1
    return hot


class Renderer:
    """Shared part of both renderers: validation, the bank, planning and labels."""

    device = "cpu"

    def __init__(self, recipe: Recipe, *, size: int = 256, seed: int = 0,
                 bank: SystemBank | None = None, cache_dir: Path | None = None):
        check_range("size", size, MIN_SIZE, MAX_SIZE, integer=True)
        check_range("seed", seed, 0, 2**32 - 1, integer=True)
        if recipe.multi_object and size // 2 < MIN_SIZE:
            raise ConfigError(f"size={size}: multi-object recipes need size >= {2 * MIN_SIZE}")
        self.recipe, self.size, self.seed = recipe, size, seed
        self.bank = bank if bank is not None else cached_bank(recipe.bank_spec(), seed, cache_dir)
        if len(self.bank) != recipe.num_systems:
            raise ConfigError(
                f"bank has {len(self.bank)} systems, recipe {recipe.name!r} needs {recipe.num_systems}")

    @staticmethod
    def check_keys(indices, epoch: int) -> np.ndarray:
        """Validated keys: a 1-D int64 array of indices >= 0 and an epoch that fits 32 bits."""
        check_range("epoch", epoch, 0, 2**32 - 1, integer=True)
        indices = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).reshape(-1))
        if indices.size == 0:
            raise ConfigError("cannot render an empty batch of indices")
        if indices.min() < 0:
            raise ConfigError(f"sample indices must be >= 0, got {int(indices.min())}")
        return indices

    def plan(self, indices, epoch: int) -> tuple[np.ndarray, SamplePlan, ItemPlan]:
        indices = self.check_keys(indices, epoch)
        samples = plan_samples(self.recipe, self.seed, epoch, indices)
        items = plan_items(self.recipe, self.bank, self.size, self.seed, epoch, samples)
        return indices, samples, items

    def render(self, indices, epoch: int = 0) -> RenderedBatch:
        raise NotImplementedError

    def render_tensor(self, indices, epoch: int = 0, *, dtype: str = "uint8", channels_last: bool = False,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD):
        """(images (B, 3, H, W), labels) as torch tensors: uint8, or float32 ``(x / 255 - mean) / std``.

        This host version renders with ``render`` and converts; the CuPy renderer overrides it to stay
        on the device. Same arithmetic on both, so a model sees the same inputs on CPU and GPU.
        """
        batch = self.render(indices, epoch)
        return images_to_tensor(batch.images, dtype=dtype, channels_last=channels_last, mean=mean, std=std), \
            torch_labels(batch.labels)


def check_output(dtype: str, mean, std) -> None:
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype={dtype!r}: must be one of {', '.join(OUTPUT_DTYPES)}")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise ConfigError(f"{name}={list(values)!r}: must have 3 values (R, G, B)")
    if min(std) <= 0:
        raise ConfigError(f"std={list(std)!r}: every value must be > 0")


def images_to_tensor(images: np.ndarray, *, dtype: str, channels_last: bool, mean, std):
    """(B, H, W, 3) uint8 host images -> (B, 3, H, W) torch tensor in the finish kernel's arithmetic."""
    import torch

    check_output(dtype, mean, std)
    out = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # an NHWC-strided view
    if dtype != "uint8":
        scale = torch.tensor(np.float32(1.0 / 255.0))
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        out = ((out.float() * scale - m) / s).to(getattr(torch, dtype))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=fmt)


def torch_labels(labels: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(labels))


class ReferenceRenderer(Renderer):
    """The NumPy reference: exact semantics, any machine."""

    def render(self, indices, epoch: int = 0) -> RenderedBatch:
        _, samples, items = self.plan(indices, epoch)
        side = object_size(self.recipe, self.size)
        rgb, density, points = reference.render_items(self.recipe, self.seed, epoch, items, side)
        images = reference.compose(self.recipe, self.seed, epoch, samples, items, rgb, density, self.size)
        return RenderedBatch(
            images=images, labels=make_labels(self.recipe, samples, items), recipe=self.recipe,
            seed=self.seed, epoch=epoch, samples=samples, items=items, points=points, size=self.size)


def make_renderer(recipe: Recipe, *, size: int = 256, seed: int = 0, device: str = "cpu",
                  bank: SystemBank | None = None, num_threads: int | None = None) -> Renderer:
    """A renderer for the recipe on 'cpu' (compiled C++, every core or ``num_threads``; the NumPy reference
    with a one-line note on stderr where it cannot be built), 'cpu-reference' (the NumPy reference) or
    'cuda' / 'cuda:N' (CuPy kernels). All of them draw the same images for the same keys."""
    if num_threads is not None:
        check_range("num_threads", num_threads, 0, MAX_THREADS, integer=True)
    if device == "cpu":
        from fractal_pretrain.render import fast_cpu

        try:
            return fast_cpu.FastCpuRenderer(recipe, size=size, seed=seed, bank=bank, num_threads=num_threads)
        except fast_cpu.FastCpuUnavailable as err:
            fast_cpu.warn_unavailable(err)
            return ReferenceRenderer(recipe, size=size, seed=seed, bank=bank)
    if device == "cpu-reference":
        return ReferenceRenderer(recipe, size=size, seed=seed, bank=bank)
    if device == "cuda" or device.startswith("cuda:"):
        from fractal_pretrain.render.cupy_renderer import CupyRenderer

        return CupyRenderer(recipe, size=size, seed=seed, bank=bank, device=device)
    raise ConfigError(f"device={device!r}: must be one of cpu, cpu-reference, cuda, cuda:N")
