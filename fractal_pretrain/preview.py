"""Contact-sheet previews: tile a batch of images into one PNG.

Used by ``fractal-pretrain render`` (rendered images) and ``fractal-pretrain preview`` (a training batch,
``train/preview.py``). The grid is near-square (``ceil(sqrt(n))`` columns, rounded up to a multiple of
``group`` so that groups such as view pairs share a row) or has ``cols`` columns (one adapt sample per row),
tiles are separated by ``gap_px`` pixels of background, and each tile can carry a short caption (drawn with
PIL's default font) in a strip underneath it. :func:`to_pixels` turns a normalised model input back into
the uint8 pixels shown.

Example:
    >>> from fractal_pretrain.preview import save_grid
    >>> save_grid(batch.images, "preview.png", labels=[str(i) for i in range(len(batch.images))])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fractal_pretrain.atomic import atomic_write

GAP_PX = 2  # background between neighbouring tiles
GROUP_GAP_PX = 10  # background between neighbouring groups of tiles (e.g. view pairs)
BACKGROUND = (255, 255, 255)  # gaps and caption strips
TEXT_COLOR = (0, 0, 0)
CAPTION_PAD_PX = 2  # space above and below a caption line


def grid_shape(n: int, group: int = 1, cols: int | None = None) -> tuple[int, int]:
    """Rows and columns of the near-square grid for ``n`` tiles.

    Args:
        n: number of tiles, >= 1.
        group: columns are a multiple of this (tiles ``[k*group, (k+1)*group)`` stay on one row).
        cols: the number of columns instead of the near-square choice (a multiple of ``group``; e.g.
            ``cols=group``: one group per row).

    Returns:
        ``(rows, cols)`` with ``cols = ceil(sqrt(n))`` (or ``cols``) rounded up to a multiple of ``group``
        and ``rows = ceil(n / cols)``.
    """
    if n < 1:
        raise ValueError(f"grid needs at least one image, got {n}")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if cols is not None and cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    cols = -(-(cols or math.ceil(math.sqrt(n))) // group) * group
    rows = math.ceil(n / cols)
    return rows, cols


def tile_origins(n: int, height: int, width: int, *, labels: bool, gap_px: int = GAP_PX,
                 group: int = 1, cols: int | None = None) -> list[tuple[int, int]]:
    """Top-left ``(x, y)`` of each of ``n`` tiles of ``height`` x ``width`` in :func:`make_grid`'s sheet."""
    _, cols = grid_shape(n, group, cols)
    cell_h = height + (_caption_height(ImageFont.load_default()) if labels else 0)
    between_groups = GROUP_GAP_PX - gap_px if group > 1 else 0  # groups stand apart from each other
    return [(c * (width + gap_px) + (c // group) * between_groups, r * (cell_h + gap_px))
            for r, c in (divmod(i, cols) for i in range(n))]


def to_pixels(images, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised model input ``(x / 255 - mean) / std`` back to displayable pixels.

    Args:
        images: tensor (N, 3, H, W) of any float dtype, memory format and device.
        mean, std: the normalisation (``data.mean`` / ``data.std``).

    Returns:
        uint8 array (N, H, W, 3): ``round((x * std + mean) * 255)`` clipped to [0, 255] (an erased patch or a
        mixed pixel may fall outside the image range; a plain rendered image comes back to its exact bytes).
    """
    import torch

    x = images.detach().to("cpu", torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = ((x * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())


def zoom(images: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel of (N, H, W, C) ``images`` as a ``factor`` x ``factor`` block (nearest neighbour: no new values)."""
    if factor == 1:
        return images
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def _caption_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Ag|0")
    return int(bottom) + 2 * CAPTION_PAD_PX


def _fit_text(text: str, font, max_width: int) -> str:
    """Shorten ``text`` with a trailing '~' until it fits in ``max_width`` pixels."""
    if font.getlength(text) <= max_width:
        return text
    while text and font.getlength(text + "~") > max_width:
        text = text[:-1]
    return text + "~" if text else ""


def make_grid(
    images: np.ndarray,
    *,
    labels: Sequence[str] | None = None,
    gap_px: int = GAP_PX,
    group: int = 1,
    cols: int | None = None,
) -> Image.Image:
    """Tile ``images`` into one RGB image.

    Args:
        images: uint8 array of shape (N, H, W, 3).
        labels: optional caption per image (length N), drawn under each tile.
        gap_px: background pixels between neighbouring tiles (not around the border).
        group: columns are a multiple of this (see :func:`grid_shape`).
        cols: columns instead of the near-square choice (see :func:`grid_shape`).

    Returns:
        A PIL RGB image of width ``cols*W + (cols-1)*gap_px`` (plus ``GROUP_GAP_PX - gap_px`` between groups)
        and height ``rows*(H + caption) + (rows-1)*gap_px`` where ``caption`` is 0 without labels.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    n, h, w, _ = images.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    rows, cols = grid_shape(n, group, cols)
    font = ImageFont.load_default()
    cap_h = _caption_height(font) if labels is not None else 0
    cell_h = h + cap_h
    origins = tile_origins(n, h, w, labels=labels is not None, gap_px=gap_px, group=group, cols=cols)
    width = cols * w + (cols - 1) * gap_px + ((cols - 1) // group) * (GROUP_GAP_PX - gap_px if group > 1 else 0)
    canvas = Image.new("RGB", (width, rows * cell_h + (rows - 1) * gap_px), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (x, y) in enumerate(origins):
        canvas.paste(Image.fromarray(images[i], "RGB"), (x, y))
        if labels is not None:
            text = _fit_text(str(labels[i]), font, w)
            draw.text((x, y + h + CAPTION_PAD_PX), text, fill=TEXT_COLOR, font=font)
    return canvas


def save_grid(
    images: np.ndarray,
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    gap_px: int = GAP_PX,
    group: int = 1,
    cols: int | None = None,
) -> Path:
    """Write :func:`make_grid` of ``images`` as a PNG, creating parent directories; atomically, so a reader
    never sees a half-written file. The bytes depend only on the pixels and captions.

    Args:
        images: uint8 array of shape (N, H, W, 3).
        path: output file (PNG).
        labels: optional caption per image.
        gap_px: background pixels between tiles.
        group: columns are a multiple of this (see :func:`grid_shape`).
        cols: columns instead of the near-square choice (see :func:`grid_shape`).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet = make_grid(images, labels=labels, gap_px=gap_px, group=group, cols=cols)
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))
    return path
