"""Labelled contact sheets: a batch of images laid out in a grid, each cell captioned with its own line.

Used to compare a guidance sweep at a glance: the sampler's ``labels`` output gives one line per image
("seed 42 · text 7.5 · image 1.5"), and each line is drawn under its image. Plain torch + Pillow, so the
layout can be tested without ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .editing.images import to_unit_float
from .errors import InputError

MAX_COLUMNS = 64
MIN_FONT_SIZE = 8


@dataclass(frozen=True)
class GridLayout:
    """Where each cell goes. A cell is the image plus its caption strip below it."""

    count: int
    columns: int
    rows: int
    cell_width: int
    image_height: int
    caption_height: int
    gap: int

    @property
    def cell_height(self) -> int:
        return self.image_height + self.caption_height

    @property
    def width(self) -> int:
        return self.columns * self.cell_width + (self.columns - 1) * self.gap

    @property
    def height(self) -> int:
        return self.rows * self.cell_height + (self.rows - 1) * self.gap

    def origin(self, index: int) -> tuple[int, int]:
        """Top-left corner (x, y) of cell ``index``, filled row by row."""
        row, column = divmod(index, self.columns)
        return column * (self.cell_width + self.gap), row * (self.cell_height + self.gap)


def grid_shape(count: int, columns: int = 0) -> tuple[int, int]:
    """(columns, rows) for ``count`` cells; ``columns`` 0 picks the squarest grid, wider than tall."""
    if count < 1:
        raise InputError("the grid needs at least one image")
    if columns < 0 or columns > MAX_COLUMNS:
        raise InputError(f"columns is {columns}; use 0 (automatic) or 1..{MAX_COLUMNS}")
    if columns == 0:
        columns = math.ceil(math.sqrt(count))
    columns = min(columns, count)
    return columns, math.ceil(count / columns)


def split_labels(labels: str | None, count: int) -> list[str]:
    """One caption per image from one line per image; no text at all means no captions."""
    if labels is None or not labels.strip():
        return [""] * count
    lines = labels.splitlines()  # a single trailing newline ends the last line, it does not add one
    if len(lines) != count:
        raise InputError(
            f"labels has {len(lines)} line(s) for {count} image(s); the grid needs one line per image — connect "
            "the sampler's labels output that belongs to these images, or leave labels unconnected"
        )
    return [line.strip() for line in lines]


def load_font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (needs FreeType); its fixed small bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, TypeError, OSError):  # Pillow built without FreeType, or older than 10.1
        return ImageFont.load_default()


def auto_font_size(cell_width: int) -> int:
    """Readable at a glance: ~1/24 of the cell width, so a 512 px cell gets 21 px text."""
    return max(MIN_FONT_SIZE, min(48, cell_width // 24))


def wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` px; a word wider than the cell stays whole on its own line (clipped)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if not current or font.getlength(candidate) <= width:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def labelled_grid(
    images: torch.Tensor,
    labels: str | None = None,
    columns: int = 0,
    font_size: int = 0,
    gap: int = 4,
) -> torch.Tensor:
    """Lay out a ``[B, H, W, C]`` batch (floats 0..1) in a grid with each image's caption below it.

    Returns one ``[1, H', W', C]`` image on a white background with black text. ``font_size`` 0 sizes the text
    from the cell width; captions wrap at spaces to fit their cell, and every caption strip gets the height
    of the longest caption so the rows stay aligned. With no labels there are no strips.
    """
    if images.ndim != 4:
        raise InputError(f"images must be a batch [B, H, W, C]; got shape {tuple(images.shape)}")
    if gap < 0:
        raise InputError(f"gap is {gap}; use 0 or more pixels")
    count, height, width, channels = images.shape
    captions = split_labels(labels, count)
    columns, rows = grid_shape(count, columns)

    size = font_size if font_size > 0 else auto_font_size(width)
    font = load_font(size)
    padding = max(2, size // 4)
    wrapped = [wrap(c, font, width - 2 * padding) for c in captions]
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (size, 0)
    line_height = ascent + descent
    most_lines = max(len(w) for w in wrapped)
    caption_height = most_lines * line_height + 2 * padding if most_lines else 0

    layout = GridLayout(count, columns, rows, width, height, caption_height, gap)
    sheet = torch.ones((layout.height, layout.width, channels), dtype=torch.float32)
    pixels = to_unit_float(images.detach().cpu())  # 8-bit tensors too, not clamped to white
    for index in range(count):
        x, y = layout.origin(index)
        sheet[y : y + height, x : x + width] = pixels[index]
        if caption_height:
            ink = _caption_ink(wrapped[index], font, width, caption_height, padding, line_height)
            sheet[y + height : y + layout.cell_height, x : x + width] = 1.0 - ink[..., None]
    return sheet.unsqueeze(0)


def _caption_ink(lines: list[str], font, width: int, height: int, padding: int, line_height: int) -> torch.Tensor:
    """Text coverage 0..1 of one caption strip, lines centred horizontally."""
    strip = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        left = max(padding, (width - font.getlength(line)) / 2)
        draw.text((left, padding + i * line_height), line, font=font, fill=255)
    return torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0)
