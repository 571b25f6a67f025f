"""Pictures out of sampling: tensors as images, labelled grids (and their first cell), PNGs written whole."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from finetune.data.image_bounds import GRID_LABEL_WIDTH
from finetune.outputs.atomic_files import atomic_write
from finetune.sampling.grid_labels import draw_label, label_font

if TYPE_CHECKING:
    import torch


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """CHW in [-1, 1] (the VAE's range) -> a PIL image."""
    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def first_cell(grid: Image.Image, cell: int) -> Image.Image | None:
    """The top-left image of a labelled grid of `cell` x `cell` images (None when it holds none)."""
    if grid.width < GRID_LABEL_WIDTH + cell or grid.height < cell:
        return None
    return grid.crop((GRID_LABEL_WIDTH, 0, GRID_LABEL_WIDTH + cell, cell))


def make_grid(rows: list[list[Image.Image]], row_labels: list[str] | None = None, label_width: int = 0) -> Image.Image:
    """Paste images into a grid, one row per list; optional text labels in a left margin of `label_width` px, each wrapped
    (and ellipsized) within its row's part of it, in a font growing with the row (finetune/sampling/grid_labels.py)."""
    cell_w, cell_h = rows[0][0].size
    columns = max(len(row) for row in rows)
    margin = label_width if row_labels else 0
    grid = Image.new("RGB", (margin + columns * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    font = label_font(cell_h, margin) if row_labels else None
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (margin + c * cell_w, r * cell_h))
        if row_labels:
            draw_label(draw, row_labels[r], 0, r * cell_h, margin, cell_h, font)
    return grid


def save_image_atomic(image: Image.Image, path: Path) -> Path:
    """`image` as a PNG at `path`, whole or as it was (`atomic_write`), its folder made first; not flushed to disk before
    the rename (`durable=False`): one image among the thousands a run or class-image generation may write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda partial: image.save(partial, format="PNG"), durable=False)
