"""Renderers: keys (seed, epoch, sample indices) in, labelled fractal images out.

``ReferenceRenderer`` runs the NumPy reference (``reference.py``) anywhere (``device: cpu-reference``);
``FastCpuRenderer`` (``fast_cpu.py``, ``device: cpu``) the same pipeline as compiled C++ on every core;
``CupyRenderer`` (``cupy_renderer.py``) as CUDA kernels. All three share planning, labels and
metadata from this module, so they differ only in where the pixels are made.
"""

from __future__ import annotations

from fractal_pretrain.config import ConfigError, check_range
from fractal_pretrain.ifs.bank import SystemBank
from fractal_pretrain.recipes import Recipe
from fractal_pretrain.render import reference
from fractal_pretrain.render.base import (  # noqa: F401 - re-exported: the names callers import from here
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_SIZE,
    MAX_THREADS,
    MIN_SIZE,
    OUTPUT_DTYPES,
    RenderedBatch,
    Renderer,
    check_output,
    images_to_tensor,
    make_labels,
    torch_labels,
)
from fractal_pretrain.render.params import object_size


class ReferenceRenderer(Renderer):
    """The NumPy reference: exact semantics, any machine."""

    def render(self, indices, epoch: int = 0) -> RenderedBatch:
        extra = {}
        if self.recipe.views:  # every view is one object pasted onto its own canvas (reference.compose)
            _, samples, canvases, items = self.plan_views(indices, epoch)
            extra["view_samples"] = canvases
        else:
            _, samples, items = self.plan(indices, epoch)
            canvases = samples
        side = object_size(self.recipe, self.size)
        rgb, density, points = reference.render_items(self.recipe, self.seed, epoch, items, side)
        images = reference.compose(self.recipe, self.seed, epoch, canvases, items, rgb, density, self.size)
        return RenderedBatch(
            images=images, labels=make_labels(self.recipe, samples, items),
            recipe=self.recipe, seed=self.seed, epoch=epoch, samples=samples, items=items, points=points,
            size=self.size, extra=extra)


def make_renderer(recipe: Recipe, *, size: int = 256, seed: int = 0, device: str = "cpu",
                  bank: SystemBank | None = None, num_threads: int | None = None) -> Renderer:
    """A renderer for the recipe on 'cpu' (compiled C++, every core or ``num_threads``; the NumPy reference
    with a one-line note on stderr where it cannot be built), 'cpu-reference' (the NumPy reference) or
    'cuda' / 'cuda:N' (CuPy kernels). All of them draw the same images for the same keys. Mandelbulb
    recipes: 'cpu' is their ray-marching kernel compiled for the host (mandelbulb/cpu.py)."""
    if num_threads is not None:
        check_range("num_threads", num_threads, 0, MAX_THREADS, integer=True)
    from fractal_pretrain.recipes import recipe_family

    if recipe_family(recipe) == "mandelbulb":  # the ray marcher: no system bank
        from fractal_pretrain.mandelbulb.renderer import make_mandelbulb_renderer

        return make_mandelbulb_renderer(recipe, size=size, seed=seed, device=device, num_threads=num_threads)
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
