"""Mandelbulb renderers: keys (seed, epoch, sample indices) in, labelled ray-marched images out.

``MandelbulbReferenceRenderer`` runs the NumPy reference (``reference.py``); ``MandelbulbKernelRenderer``
runs ``render/kernels/mandelbulb.cu`` on a GPU through CuPy, or on the CPU emulator (``emulate=True``, CI).
Both plan on the host (``params.py``: a few dozen floats per object, uploaded in one pinned copy) and give
bit-identical images for the same keys (the reference's docstring says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fractal_pretrain.config import ConfigError, check_range
from fractal_pretrain.mandelbulb import params as P
from fractal_pretrain.mandelbulb import reference
from fractal_pretrain.mandelbulb.recipe import MandelbulbRecipe
from fractal_pretrain.render import backend as render_backend
from fractal_pretrain.render import kernel_constants
from fractal_pretrain.render.backend import make_backend
from fractal_pretrain.render.backend import ptr as _ptr
from fractal_pretrain.render.base import IMAGENET_MEAN, IMAGENET_STD, Renderer, images_to_tensor, torch_labels

MIN_SIZE, MAX_SIZE = 8, 4096
PIXEL_BLOCK = 128  # march_sprites / paste_sprites threads per block
FINISH_BAND = 16  # compose.cu finish: rows per thread
FLAGS = kernel_constants.MB_FLAGS  # mandelbulb.cu MB_SHADOW, ... (generated from this table)


@dataclass
class MandelbulbBatch:
    """Images, labels and the generation record of a batch (the interface of render.RenderedBatch)."""

    images: np.ndarray  # (B, H, W, 3) uint8
    labels: np.ndarray  # (B,) int64
    recipe: MandelbulbRecipe
    seed: int
    epoch: int
    samples: P.MandelbulbSamples
    items: P.MandelbulbItems
    size: int
    extra: dict = field(default_factory=dict)

    degenerate = 0  # every formula renders (a miss is background, not an error)

    def metadata(self, i: int) -> dict:
        """JSON-serialisable record of sample i: its key and every generation parameter."""
        slots = P.slots_per_sample(self.recipe)
        objects = []
        for item in range(i * slots, i * slots + int(self.samples.num_objects[i])):
            it = self.items
            objects.append({
                "formula": int(it.formula[item]), "power": int(it.power[item]), "rule": int(it.rule[item]),
                "latitude": float(it.lat[item]), "longitude": float(it.lng[item]),
                "colours": it.colours[item].tolist(),
                **({"side": int(it.side[item]), "top": int(it.top[item]), "left": int(it.left[item])}
                   if self.recipe.multi_object else {}),
            })
        return {"seed": self.seed, "epoch": self.epoch, "index": int(self.samples.index[i]),
                "recipe": self.recipe.name, "size": self.size, "label": int(self.labels[i]), "objects": objects}


class MandelbulbRenderer:
    """Shared part: validation, class groups, the host plan."""

    device = "cpu"

    def __init__(self, recipe: MandelbulbRecipe, *, size: int = 256, seed: int = 0):
        check_range("size", size, MIN_SIZE, MAX_SIZE, integer=True)
        check_range("seed", seed, 0, 2**32 - 1, integer=True)
        self.recipe, self.size, self.seed = recipe, size, seed
        self.slots = P.slots_per_sample(recipe)
        self.members = P.class_members(recipe, seed)

    def plan(self, indices, epoch: int):
        indices = Renderer.check_keys(indices, epoch)
        samples = P.plan_samples(self.recipe, self.seed, epoch, indices)
        items = P.plan_items(self.recipe, self.seed, self.size, epoch, samples, self.members)
        return samples, items

    def batch(self, images, samples, items, epoch, **extra) -> MandelbulbBatch:
        return MandelbulbBatch(images=images, labels=samples.label.copy(), recipe=self.recipe, seed=self.seed,
                               epoch=epoch, samples=samples, items=items, size=self.size, extra=extra)

    def render(self, indices, epoch: int = 0) -> MandelbulbBatch:
        raise NotImplementedError

    def render_tensor(self, indices, epoch: int = 0, *, dtype: str = "uint8", channels_last: bool = False,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD):
        """(images (B, 3, H, W), labels) as torch tensors, in the IFS renderers' arithmetic."""
        batch = self.render(indices, epoch)
        return images_to_tensor(batch.images, dtype=dtype, channels_last=channels_last, mean=mean, std=std), \
            torch_labels(batch.labels)


class MandelbulbReferenceRenderer(MandelbulbRenderer):
    """The NumPy reference: exact semantics, any machine (slow: tests and previews at small sizes)."""

    def render(self, indices, epoch: int = 0) -> MandelbulbBatch:
        samples, items = self.plan(indices, epoch)
        images = reference.render(self.recipe, self.seed, epoch, samples, items, self.size, self.members)
        return self.batch(images, samples, items, epoch)


class MandelbulbCpuRenderer(MandelbulbRenderer):
    """The kernel's ray marcher compiled for the host (``cpu.py``) on ``num_threads`` threads (None or 0:
    every core this process may use); the same bytes as the reference, many times faster."""

    def __init__(self, recipe: MandelbulbRecipe, *, size: int = 256, seed: int = 0, num_threads: int | None = None):
        from fractal_pretrain.mandelbulb import cpu

        if num_threads is not None:
            check_range("num_threads", num_threads, 0, 1024, integer=True)
        cpu.load()  # before anything else: a missing compiler is reported here
        super().__init__(recipe, size=size, seed=seed)
        self.num_threads = num_threads

    def render(self, indices, epoch: int = 0) -> MandelbulbBatch:
        from fractal_pretrain.mandelbulb import cpu

        samples, items = self.plan(indices, epoch)
        images = cpu.render(self.recipe, self.seed, epoch, samples, items, self.size, self.members, self.num_threads)
        return self.batch(images, samples, items, epoch)


def kernel_flags(recipe: MandelbulbRecipe) -> int:
    on = {"SHADOW": recipe.shadow, "NEGATED_NORMAL": recipe.diffuse_normal == "negated",
          "TEXTBOOK_DERIVATIVE": recipe.derivative == "r^(p-1)", "EARLY_EXIT": recipe.early_exit}
    return sum(bit for name, bit in FLAGS.items() if on[name])


def device_items(recipe: MandelbulbRecipe, items: P.MandelbulbItems) -> dict[str, np.ndarray]:
    """Objects in the kernels' layouts (mandelbulb.cu MB_ITEM_INTS, MB_ITEM_FLOATS)."""
    item_i = np.stack([items.active, items.power, items.rule, items.side, items.top, items.left,
                       P.bank_row(recipe, items)], axis=1)
    item_f = np.concatenate([items.camera.reshape(-1, 12), items.colours.reshape(-1, 9)], axis=1)
    return {"item_i": item_i.astype(np.int32), "item_f": item_f.astype(np.float32)}


def device_plan(recipe: MandelbulbRecipe, samples: P.MandelbulbSamples, items: P.MandelbulbItems):
    """The plan in the kernels' layouts (mandelbulb.cu MB_ITEM_*, compose.cu SAMPLE_FLOATS)."""
    sample_f = np.zeros((len(samples.index), kernel_constants.SAMPLE_FLOATS), dtype=np.float32)  # blur flag 0
    sample_f[:, 4] = samples.decay
    sample_f[:, 5:9] = samples.corners
    sample_f[:, 9:15] = samples.bg_hsv
    return {"indices": samples.index.astype(np.int64), "label": samples.label.astype(np.int64),
            "num_objects": samples.num_objects.astype(np.int32), "sample_f": sample_f,
            **device_items(recipe, items)}


def bank_bytes(recipe: MandelbulbRecipe, size: int) -> int:
    """Device memory of the view bank: formulas in use x bank_views x bank side^2 x RGBA."""
    formulas = recipe.num_classes * recipe.members_per_class
    return formulas * recipe.bank_views * P.bank_side(recipe, size) ** 2 * 4


def check_bank_memory(recipe: MandelbulbRecipe, size: int, free_bytes: int) -> None:
    """A view bank that does not fit the device's free memory is a one-line error saying both sizes."""
    need = bank_bytes(recipe, size)
    if need > free_bytes:
        raise ConfigError(
            f"bank_views={recipe.bank_views}: the view bank needs {need / 2**30:.2f} GiB at {size} px "
            f"({recipe.num_classes * recipe.members_per_class} formulas x {recipe.bank_views} views of "
            f"{P.bank_side(recipe, size)} px RGBA), the device has {free_bytes / 2**30:.2f} GiB free; "
            f"use fewer bank_views or mode=on_the_fly")


def check_bank_fits(recipe: MandelbulbRecipe, size: int, device) -> None:
    """``check_bank_memory`` against ``device``'s free memory now (view_bank mode on a GPU; nothing to check
    on the CPU), without building anything: ``fit`` calls it before Lightning creates the run's logs."""
    if recipe.mode != "view_bank":
        return
    free = render_backend.device_free_memory(device)
    if free is not None:
        check_bank_memory(recipe, size, free)


@dataclass
class MandelbulbDeviceBatch:
    """A batch on the device between the kernels (layouts: ``device_plan``) and its host plan."""

    indices: object  # (B,) int64
    label: object  # (B,) int64
    num_objects: object  # (B,) int32
    sample_f: object  # (B, 15) float32: compose.cu's layout (plasma constants; blur flag 0)
    item_i: object  # (I, MB_ITEM_INTS) int32
    item_f: object  # (I, MB_ITEM_FLOATS) float32
    canvas: object  # (B, size, size, 3) uint8
    stream: object  # CuPy stream (None on the emulator)
    samples: P.MandelbulbSamples
    items: P.MandelbulbItems
    sprites: object = None  # (I, side, side, 4) uint8 on the fly


class MandelbulbKernelRenderer(MandelbulbRenderer):
    """The CUDA kernels, through CuPy on a GPU or through the CPU emulator (``emulate=True``)."""

    def __init__(self, recipe: MandelbulbRecipe, *, size: int = 256, seed: int = 0, device: str = "cuda",
                 emulate: bool = False):
        self.backend = make_backend(device, emulate)
        self.emulate, self.torch_device = emulate, self.backend.torch_device
        super().__init__(recipe, size=size, seed=seed)
        from fractal_pretrain.render.cupy_renderer import Finisher

        self.flags = kernel_flags(recipe)
        self._finisher = Finisher(self.backend)
        self.bank = self._build_bank() if recipe.mode == "view_bank" else None

    BANK_CHUNK = 4096  # views per march launch while building the bank (bounds the plan upload)

    def _build_bank(self):
        """Every view of every formula in use, rendered once on the device and kept resident:
        (formulas x bank_views, side, side, 4) uint8, row = member * bank_views + view."""
        import torch

        free = self.backend.free_memory()
        if free is not None:
            check_bank_memory(self.recipe, self.size, free)
        side = P.bank_side(self.recipe, self.size)
        rows = self.members.size * self.recipe.bank_views
        bank = torch.empty((rows, side, side, 4), dtype=torch.uint8, device=self.torch_device)
        stream = self.backend.stream()
        for lo in range(0, rows, self.BANK_CHUNK):
            views = P.plan_bank(self.recipe, self.seed, np.arange(lo, min(lo + self.BANK_CHUNK, rows)),
                                self.members, side)
            n = len(views.index)
            plan = {k: self.backend.upload(v) for k, v in device_items(self.recipe, views).items()}
            with self.backend.launching(stream):
                self._march(plan["item_i"], plan["item_f"], side, n, bank[lo:lo + n])
        return bank

    def _march(self, item_i, item_f, max_side: int, n_items: int, out) -> None:
        """march_sprites for the objects of ``item_i`` / ``item_f`` (device tensors) into ``out``."""
        self._kernel("mandelbulb", "march_sprites")(
            (-(-kernel_constants.mb_march_threads(max_side) // PIXEL_BLOCK), n_items), (PIXEL_BLOCK,),
            (np.int32(max_side), np.int32(self.recipe.supersample), np.int32(self.flags), _ptr(item_i),
             _ptr(item_f), _ptr(out)))

    def _kernel(self, module: str, name: str):
        return self.backend.kernel(module, name)

    def render_device(self, indices, epoch: int = 0) -> MandelbulbDeviceBatch:
        """Plan on the host, march (or take bank views) and compose on the device: the canvas and the plan."""
        import torch

        from fractal_pretrain.render.reference import plasma_grid_size

        samples, items = self.plan(indices, epoch)
        host = device_plan(self.recipe, samples, items)
        dev, b, size = self.torch_device, len(samples.index), self.size
        stream = self.backend.stream()
        t = MandelbulbDeviceBatch(**{k: self.backend.upload(v) for k, v in host.items()}, stream=stream,
                                  canvas=torch.empty((b, size, size, 3), dtype=torch.uint8, device=dev),
                                  samples=samples, items=items)
        seed, ep = np.uint32(self.seed), np.uint32(epoch)
        with self.backend.launching(stream):
            if self.recipe.background == "plasma":
                n = plasma_grid_size(size)
                grids = torch.empty((b, n, n), dtype=torch.float32, device=dev)
                self._kernel("compose", "plasma_background_global")(
                    (b,), (512,), (_ptr(t.indices), seed, ep, np.int32(size), np.int32(n), _ptr(t.sample_f),
                                   _ptr(grids), _ptr(t.canvas)))
            else:
                t.canvas.fill_(reference.BACKGROUND_LEVEL[self.recipe.background])
            pixels = (-(-size * size // PIXEL_BLOCK), b)
            if self.bank is not None:  # compose from the resident views: no ray marching per sample
                self._kernel("mandelbulb", "paste_bank")(
                    pixels, (PIXEL_BLOCK,),
                    (np.int32(size), np.int32(self.slots), np.int32(self.bank.shape[1]), _ptr(t.num_objects),
                     _ptr(t.item_i), _ptr(self.bank), _ptr(t.canvas)))
            else:
                max_side = int(items.side[items.active].max())
                t.sprites = torch.empty((len(items.index), max_side, max_side, 4), dtype=torch.uint8, device=dev)
                self._march(t.item_i, t.item_f, max_side, len(items.index), t.sprites)
                self._kernel("mandelbulb", "paste_sprites")(
                    pixels, (PIXEL_BLOCK,),
                    (np.int32(size), np.int32(self.slots), np.int32(max_side), _ptr(t.num_objects),
                     _ptr(t.item_i), _ptr(t.sprites), _ptr(t.canvas)))
        return t

    def finish(self, t: MandelbulbDeviceBatch, **kwargs):
        """The output tensor (B, 3, H, W): uint8, or float32 / bfloat16 normalised (compose.cu finish)."""
        return self._finisher(t, **kwargs)

    def render_tensor(self, indices, epoch: int = 0, **finish_kwargs):
        t = self.render_device(indices, epoch)
        return self.finish(t, **finish_kwargs), t.label

    def render(self, indices, epoch: int = 0) -> MandelbulbBatch:
        t = self.render_device(indices, epoch)
        images = self.finish(t, dtype="uint8", channels_last=True)
        return self.batch(images.permute(0, 2, 3, 1).contiguous().cpu().numpy(), t.samples, t.items, epoch,
                          device_plan=t)


def make_mandelbulb_renderer(recipe: MandelbulbRecipe, *, size: int = 256, seed: int = 0, device: str = "cpu",
                             num_threads: int | None = None) -> MandelbulbRenderer:
    """'cpu': the compiled ray marcher (``cpu.py``, ``num_threads`` threads, default every core; the NumPy
    reference, with a note on stderr once, where it cannot be built); 'cpu-reference': the NumPy reference;
    'cuda' / 'cuda:N': the kernels."""
    if device == "cpu":
        from fractal_pretrain.render.fast_cpu import FastCpuUnavailable, warn_unavailable

        try:
            return MandelbulbCpuRenderer(recipe, size=size, seed=seed, num_threads=num_threads)
        except FastCpuUnavailable as err:
            warn_unavailable(err)
    if device in ("cpu", "cpu-reference"):
        return MandelbulbReferenceRenderer(recipe, size=size, seed=seed)
    if device == "cuda" or device.startswith("cuda:"):
        return MandelbulbKernelRenderer(recipe, size=size, seed=seed, device=device)
    raise ConfigError(f"device={device!r}: must be one of cpu, cpu-reference, cuda, cuda:N")
