"""CuPy renderer: the reference pipeline as CUDA kernels, a whole batch on the device.

Kernels live in ``kernels/*.cu`` (shared code in ``common.cuh``) and compile with NVRTC on first use,
never at import. Buffers are torch tensors (one caching allocator for training), kernels run on
torch's current stream, and the output is a torch tensor in the layout and dtype the model wants:
no host round trip.

Agreement with the NumPy reference (tests/fractal_pretrain/test_render_kernels.py: on the GPU, marker
``gpu``, and in CI on the CPU emulator, ``CupyRenderer(..., emulate=True)``, render/emulator.py):
all arithmetic is float32 with ``--fmad=false`` in the reference's operation order, integer
histograms are order-independent, so the expected result is *bit-identical* images, labels and
plans for the same keys. The test asserts identical plans and histogram point counts, and images
identical in at least 99.9% of pixels with no pixel more than 1 grey level off (slack kept for a
libm difference we have not seen); see the module docstring of that test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fractal_pretrain.recipes import Recipe
from fractal_pretrain.render import params as P
from fractal_pretrain.render.backend import (  # noqa: F401 - KERNEL_DIR, NVRTC_OPTIONS: re-exported
    KERNEL_DIR,
    NVRTC_OPTIONS,
    make_backend,
)
from fractal_pretrain.render.backend import ptr as _ptr
from fractal_pretrain.render.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OUTPUT_DTYPES,
    RenderedBatch,
    Renderer,
    check_output,
    make_labels,
)
from fractal_pretrain.render.kernel_constants import (  # noqa: F401 - the layouts, re-exported
    ITEM_FLOATS,
    ITEM_INTS,
    RECIPE_FLOAT_PAIRS,
    RECIPE_INTS,
    SAMPLE_FLOATS,
    recipe_floats,
    recipe_ints,
)
from fractal_pretrain.render.reference import plasma_grid_size

KERNEL_FILES = ("plan", "chaos", "compose")
# chaos.cu: scratch, params, window, colour table; ptxas rounds a kernel's static shared memory up to 16 bytes
STATIC_SHARED_BYTES = -(-4 * (1024 + ITEM_FLOATS + 4 + 256) // 16) * 16
PLASMA_STATIC_SHARED_BYTES = 4 * 1024  # compose.cu: the reduction scratch
PLAN_BLOCK = 128
PIXEL_BLOCK = 256
FINISH_BAND = 16  # rows of a column one thread of `finish` blurs and writes
PLASMA_BLOCK = 512


class Finisher:
    """compose.cu's ``finish`` for any canvas: optional blur (per-sample flag in ``sample_f``), then the output
    tensor (B, 3, H, W) as uint8 or float32 / bfloat16 normalised by mean/std, NCHW or channels_last."""

    def __init__(self, backend):
        self.backend = backend
        self._norm_cache: dict[tuple, tuple] = {}

    def __call__(self, t, *, dtype: str = "uint8", channels_last: bool = False, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        """``t`` has ``canvas`` (B, H, W, 3) uint8, ``sample_f`` (B, SAMPLE_FLOATS) and ``stream``."""
        import torch

        mean, std = tuple(mean), tuple(std)
        check_output(dtype, mean, std)
        b, size = t.canvas.shape[:2]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((b, 3, size, size), dtype=getattr(torch, dtype), device=self.backend.torch_device,
                          memory_format=fmt)
        mean_t, std_t = self._normalisation(mean, std)
        with self.backend.launching(t.stream):
            runs = size * -(-size // FINISH_BAND)
            self.backend.kernel("compose", "finish")(
                (-(-runs // PIXEL_BLOCK), b), (PIXEL_BLOCK,),
                (np.int32(size), np.int32(FINISH_BAND), _ptr(t.sample_f), _ptr(t.canvas),
                 np.int32(OUTPUT_DTYPES.index(dtype)), np.int32(channels_last), _ptr(mean_t), _ptr(std_t),
                 _ptr(out)))
        return out

    def _normalisation(self, mean: tuple, std: tuple):
        """mean and std as device tensors, made once: a fresh host-to-device copy each batch would sync."""
        import torch

        key = (mean, std)
        if key not in self._norm_cache:
            self._norm_cache[key] = tuple(torch.tensor(v, dtype=torch.float32, device=self.backend.torch_device)
                                          for v in key)
        return self._norm_cache[key]


@dataclass
class DeviceBatch:
    """A batch on the device between the kernels: plans (plan.cu layouts), point counts, the canvas."""

    indices: object  # (B,) int64 sample indices
    label: object  # (B,) int64
    num_objects: object  # (B,) int32
    sample_f: object  # (B, SAMPLE_FLOATS) float32
    item_i: object  # (I, ITEM_INTS) int32
    item_f: object  # (I, ITEM_FLOATS) float32
    points: object  # (I,) int32 recorded points per item
    canvas: object  # (B, size, size, 3) uint8 before the blur
    stream: object  # the CuPy stream the kernels ran on (None on the emulator)
    objects: object = None  # (I, side, side, 3) uint8 rendered objects (multi-object recipes)


class CupyRenderer(Renderer):
    """The GPU renderer. ``render_tensor`` feeds training; ``render`` returns host arrays like the reference."""

    def __init__(self, recipe: Recipe, *, size: int = 256, seed: int = 0, bank=None, device: str = "cuda",
                 force_global_histogram: bool = False, emulate: bool = False):
        """``emulate=True`` runs the same kernels on the CPU (render/emulator.py), for tests without a GPU."""
        import torch

        self.backend = make_backend(device, emulate)  # before the bank, which can take a while
        self.emulate, self.torch_device = emulate, self.backend.torch_device
        super().__init__(recipe, size=size, seed=seed, bank=bank)
        self.side = P.object_size(recipe, size)
        self.slots = P.slots_per_sample(recipe)
        maps = self.bank.maps.reshape(len(self.bank), -1).astype(np.float32)
        self._bank_maps = torch.from_numpy(maps).to(self.torch_device)
        self._bank_num_maps = torch.from_numpy(self.bank.num_maps.astype(np.int32)).to(self.torch_device)
        self._ri = torch.from_numpy(recipe_ints(recipe, size)).to(self.torch_device)
        self._rf = torch.from_numpy(recipe_floats(recipe)).to(self.torch_device)
        hist_bytes = self.side * (self.side + 1) * 4  # chaos.cu: shared rows padded by a word
        self.shared_optin = self.backend.shared_optin()
        self.use_shared = not force_global_histogram and hist_bytes + STATIC_SHARED_BYTES <= self.shared_optin
        self._finisher = Finisher(self.backend)

    def _kernel(self, module: str, name: str):
        return self.backend.kernel(module, name)

    def _on_stream(self, stream):
        return self.backend.launching(stream)

    def render_device(self, indices, epoch: int = 0) -> DeviceBatch:
        """Run the pipeline: the batch's device tensors (canvas (B, H, W, 3) uint8 before blur, plans, points)."""
        import torch

        indices = self.check_keys(indices, epoch)
        if self.recipe.views:
            return self._render_views_device(indices, epoch)
        dev, b, size, side = self.torch_device, len(indices), self.size, self.side
        items = b * self.slots
        stream = self.backend.stream()
        t = DeviceBatch(indices=self.backend.upload(indices), **self._plan_buffers(b, items), stream=stream,
                        points=torch.empty(items, dtype=torch.int32, device=dev),
                        canvas=torch.empty((b, size, size, 3), dtype=torch.uint8, device=dev))
        seed, ep = np.uint32(self.seed), np.uint32(epoch)
        with self._on_stream(stream):
            self._plan_device(t.indices, seed, ep, t)
            if self.recipe.background:
                self._plasma(t, seed, ep)
            else:
                t.canvas.zero_()
            target = t.canvas
            if self.recipe.multi_object:
                target = t.objects = torch.empty((items, side, side, 3), dtype=torch.uint8, device=dev)
            self._draw_items(t, t.indices, seed, ep, target)
            if self.recipe.multi_object:
                self._paste(t)
        return t

    def _render_views_device(self, indices: np.ndarray, epoch: int) -> DeviceBatch:
        """Two-view recipes (params.plan_views): the fractal planned from the sample keys, canvases and looks
        from the view keys; each fractal's chaos game runs once and is coloured into one full-size object per
        view (its own flips and colours), pasted onto the view's own canvas (view-major: V*B canvases)."""
        import torch

        if indices.max() >= P.VIEW_KEY_STRIDE:
            raise ValueError(f"two-view recipes need sample indices < 2**48, got {int(indices.max())}")
        dev, b, size, views = self.torch_device, len(indices), self.size, self.recipe.views
        stream = self.backend.stream()
        keys = self.backend.upload(P.view_keys(indices, views))
        fractal = DeviceBatch(indices=self.backend.upload(indices), **self._plan_buffers(b, b), points=None,
                              canvas=None, stream=stream)
        t = DeviceBatch(indices=keys, **self._plan_buffers(views * b, views * b), stream=stream,
                        points=torch.empty(views * b, dtype=torch.int32, device=dev),
                        canvas=torch.empty((views * b, size, size, 3), dtype=torch.uint8, device=dev))
        seed, ep = np.uint32(self.seed), np.uint32(epoch)
        # flips, sat8, val8, side, top, left (plan.cu oi[6:12]): the last six columns, as a slice (a list would
        # index through a host-made index tensor: a pageable copy that synchronises the render's stream)
        looks = slice(ITEM_INTS - 6, ITEM_INTS)
        with self._on_stream(stream):
            self._plan_device(fractal.indices, seed, ep, fractal)
            self._plan_device(keys, seed, ep, t)  # view canvases and looks
            item_i, item_f = fractal.item_i.repeat(views, 1), fractal.item_f.repeat(views, 1)
            item_i[:, looks] = t.item_i[:, looks]
            item_f[:, ITEM_FLOATS - 1] = t.item_f[:, ITEM_FLOATS - 1]  # the hue shift (IF_HUE, the last float)
            t.item_i, t.item_f, t.label, t.num_objects = item_i, item_f, fractal.label, fractal.num_objects
            if self.recipe.background:
                self._plasma(t, seed, ep)
            else:
                t.canvas.zero_()
            t.objects = torch.empty((views * b, size, size, 3), dtype=torch.uint8, device=dev)
            self._draw_items(t, fractal.indices, seed, ep, t.objects, views=views)
            self._paste(t)
        return t

    def _plan_buffers(self, samples: int, items: int) -> dict:
        import torch

        dev = self.torch_device
        return dict(label=torch.empty(samples, dtype=torch.int64, device=dev),
                    num_objects=torch.empty(samples, dtype=torch.int32, device=dev),
                    sample_f=torch.empty((samples, SAMPLE_FLOATS), dtype=torch.float32, device=dev),
                    item_i=torch.empty((items, ITEM_INTS), dtype=torch.int32, device=dev),
                    item_f=torch.empty((items, ITEM_FLOATS), dtype=torch.float32, device=dev))

    def _plan_device(self, keys, seed: np.uint32, ep: np.uint32, t: DeviceBatch) -> None:
        """plan.cu: the sample and item plans of ``keys`` into t's buffers."""
        b, items = t.label.shape[0], t.item_i.shape[0]
        ri, rf = _ptr(self._ri), _ptr(self._rf)
        self._kernel("plan", "plan_samples")(
            (-(-b // PLAN_BLOCK),), (PLAN_BLOCK,),
            (np.int32(b), _ptr(keys), seed, ep, ri, rf, _ptr(t.label), _ptr(t.num_objects), _ptr(t.sample_f)))
        self._kernel("plan", "plan_items")(
            (-(-items // PLAN_BLOCK),), (PLAN_BLOCK,),
            (np.int32(items), _ptr(keys), seed, ep, ri, rf, _ptr(t.label), _ptr(t.num_objects),
             _ptr(self._bank_maps), _ptr(self._bank_num_maps), _ptr(t.item_i), _ptr(t.item_f)))

    def _draw_items(self, t: DeviceBatch, keys, seed: np.uint32, ep: np.uint32, target, views: int = 1) -> None:
        """chaos.cu: every item's chaos game (keyed by ``keys[item // slots]``), coloured into ``target``; with
        ``views`` > 1 the first 1/views of the items are the fractals, each coloured once per view."""
        import torch

        dev, side, items = self.torch_device, self.side, t.item_i.shape[0] // views
        shared = side * (side + 1) * 4 if self.use_shared else 0
        hist = torch.empty(1 if self.use_shared else items * side * side, dtype=torch.int32, device=dev)
        choices = torch.empty(max(1, items * self.choice_words * self.recipe.chains), dtype=torch.int32, device=dev)
        point_masks = self.recipe.patch == "point"
        render = self._kernel("chaos", "render_items_point_masks" if point_masks else "render_items")
        if shared > 48 * 1024:
            render.max_dynamic_shared_size_bytes = shared
        render((items,), (self.recipe.chains,),
               (_ptr(keys), seed, ep, _ptr(self._ri), _ptr(t.item_i), _ptr(t.item_f), _ptr(hist),
                np.int32(self.use_shared), _ptr(choices), np.int32(self.choice_words), _ptr(target),
                _ptr(t.points), np.int32(views)), shared_mem=shared)

    def _paste(self, t: DeviceBatch) -> None:
        """compose.cu paste_objects: the rendered objects onto the canvases, in slot order."""
        b, size = t.canvas.shape[:2]
        slots = 1 if self.recipe.views else self.slots
        num_objects = t.num_objects if not self.recipe.views else t.num_objects.new_ones(b)
        self._kernel("compose", "paste_objects")(
            (-(-size * size // PIXEL_BLOCK), b), (PIXEL_BLOCK,),
            (np.int32(size), np.int32(self.side), np.int32(slots), _ptr(num_objects), _ptr(t.item_i),
             _ptr(t.objects), _ptr(t.canvas)))

    @property
    def choice_words(self) -> int:
        """Words per chain of the map choices the chaos game's first pass stores for its second (chaos.cu
        Packing: 2 bits per step when the bank has no system of more than 4 maps, else 4); none with
        'point' patches, whose second pass draws again."""
        if self.recipe.patch == "point":
            return 0
        steps = self.recipe.burn_in + -(-self.recipe.num_points // self.recipe.chains)
        bits = 4 if int(self.bank.num_maps.max()) > 4 else 2
        return -(-steps * bits // 32)

    def _plasma_lattice_bytes(self) -> int:
        """Shared memory of the plasma's even lattice: ((n + 1) / 2)^2 floats for an n x n grid."""
        return ((plasma_grid_size(self.size) + 1) // 2) ** 2 * 4

    @property
    def plasma_in_shared_memory(self) -> bool:
        """Whether the plasma's even lattice fits the shared memory of a block."""
        return self._plasma_lattice_bytes() + PLASMA_STATIC_SHARED_BYTES <= self.shared_optin

    def _plasma(self, t: DeviceBatch, seed: np.uint32, epoch: np.uint32) -> None:
        """The coloured plasma background into the canvas: the even lattice in shared memory when it fits."""
        import torch

        b, size, n = len(t.indices), self.size, plasma_grid_size(self.size)
        if self.plasma_in_shared_memory:
            kernel, shared = self._kernel("compose", "plasma_background"), self._plasma_lattice_bytes()
            grids = torch.empty((b, (n - 1) // 2, (n - 1) // 2), dtype=torch.float32, device=self.torch_device)
            if shared > 48 * 1024:
                kernel.max_dynamic_shared_size_bytes = shared
        else:
            kernel, shared = self._kernel("compose", "plasma_background_global"), 0
            grids = torch.empty((b, n, n), dtype=torch.float32, device=self.torch_device)
        kernel((b,), (PLASMA_BLOCK,),
               (_ptr(t.indices), seed, epoch, np.int32(size), np.int32(n), _ptr(t.sample_f), _ptr(grids),
                _ptr(t.canvas)), shared_mem=shared)

    def finish(self, t: DeviceBatch, *, dtype: str = "uint8", channels_last: bool = False,
               mean=IMAGENET_MEAN, std=IMAGENET_STD):
        """Blur and write the output tensor (B, 3, H, W): uint8, or float32 / bfloat16 normalised by mean/std."""
        return self._finisher(t, dtype=dtype, channels_last=channels_last, mean=mean, std=std)

    def device_labels(self, t: DeviceBatch):
        """Labels on the device: (B,) int64 classes, or (B, num_classes) uint8 multi-hot."""
        import torch

        if not self.recipe.multi_label:
            return t.label
        # Scatter without boolean indexing (which would sync the host): inactive slots land in a spare column.
        item_i, classes = t.item_i, self.recipe.num_classes
        sample = torch.arange(item_i.shape[0], device=item_i.device) // self.slots
        column = torch.where(item_i[:, 0] != 0, item_i[:, 2].long(), classes)
        hot = torch.zeros((t.label.shape[0], classes + 1), dtype=torch.uint8, device=item_i.device)
        hot.view(-1)[sample * (classes + 1) + column] = 1
        return hot[:, :classes].contiguous()

    def render_tensor(self, indices, epoch: int = 0, **finish_kwargs):
        """(images, labels) as device tensors for training; see ``finish`` for layout and dtype."""
        t = self.render_device(indices, epoch)
        return self.finish(t, **finish_kwargs), self.device_labels(t)

    def render(self, indices, epoch: int = 0) -> RenderedBatch:
        t = self.render_device(indices, epoch)
        images = self.finish(t, dtype="uint8", channels_last=True)
        extra = {"device_plan": t}
        if self.recipe.views:  # host plan: identical by construction
            indices, samples, extra["view_samples"], items = self.plan_views(indices, epoch)
        else:
            indices, samples, items = self.plan(indices, epoch)
        return RenderedBatch(
            images=images.permute(0, 2, 3, 1).contiguous().cpu().numpy(),
            labels=make_labels(self.recipe, samples, items), recipe=self.recipe, seed=self.seed, epoch=epoch,
            samples=samples, items=items,
            points=t.points.cpu().numpy().astype(np.int64), size=self.size, extra=extra)
