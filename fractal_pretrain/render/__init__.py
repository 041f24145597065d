"""Fractal rendering: the NumPy reference and the CuPy kernels behind one API."""

from fractal_pretrain.render.renderer import RenderedBatch, Renderer, make_renderer

__all__ = ["RenderedBatch", "Renderer", "make_renderer"]
