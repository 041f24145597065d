"""Contact-sheet previews: tile a batch of rendered images into one PNG.

Used by ``fractal-pretrain render``. The grid is near-square (``ceil(sqrt(n))`` columns), tiles are
separated by ``gap_px`` pixels of background, and each tile can carry a short caption (drawn with
PIL's default font) in a strip underneath it.

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

GAP_PX = 2  # background between neighbouring tiles
BACKGROUND = (255, 255, 255)  # gaps and caption strips
TEXT_COLOR = (0, 0, 0)
CAPTION_PAD_PX = 2  # space above and below a caption line


def grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns of the near-square grid for ``n`` tiles.

    Args:
        n: number of tiles, >= 1.

    Returns:
        ``(rows, cols)`` with ``cols = ceil(sqrt(n))`` and ``rows = ceil(n / cols)``.
    """
    if n < 1:
        raise ValueError(f"grid needs at least one image, got {n}")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    return rows, cols


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
) -> Image.Image:
    """Tile ``images`` into one RGB image.

    Args:
        images: uint8 array of shape (N, H, W, 3).
        labels: optional caption per image (length N), drawn under each tile.
        gap_px: background pixels between neighbouring tiles (not around the border).

    Returns:
        A PIL RGB image of width ``cols*W + (cols-1)*gap_px`` and height
        ``rows*(H + caption) + (rows-1)*gap_px`` where ``caption`` is 0 without labels.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    n, h, w, _ = images.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    rows, cols = grid_shape(n)
    font = ImageFont.load_default()
    cap_h = _caption_height(font) if labels is not None else 0
    cell_h = h + cap_h
    canvas = Image.new(
        "RGB", (cols * w + (cols - 1) * gap_px, rows * cell_h + (rows - 1) * gap_px), BACKGROUND
    )
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = c * (w + gap_px), r * (cell_h + gap_px)
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
) -> Path:
    """Write :func:`make_grid` of ``images`` as a PNG, creating parent directories.

    Args:
        images: uint8 array of shape (N, H, W, 3).
        path: output file (PNG).
        labels: optional caption per image.
        gap_px: background pixels between tiles.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, labels=labels, gap_px=gap_px).save(path, format="PNG")
    return path
