"""The size of the validation grid a recipe draws (samples/step-N.png), checked where the recipe loads: every image of a
validation is held in memory to draw it, and an image past PIL's decompression-bomb bound cannot be opened again."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.config.recipe import Recipe

GRID_LABEL_WIDTH = 160  # the left margin of labelled grids (sample grids, validation grids, eval grids)
# The largest image finetune opens: PIL refuses past twice its MAX_IMAGE_PIXELS, which finetune/images.py raises to its
# TRUSTED_IMAGE_PIXELS (300M; PIL's own default refuses past 179M). Not read from there: importing it sets PIL's bound,
# which the demo lowers for uploads. validation.images_per_prompt: 1000000 sampled for days, holding every image in
# memory (3 TB at 1024 px) before drawing a grid that could not be opened, without a word.
MAX_GRID_PIXELS = 600_000_000


def validation_grid_problem(recipe: Recipe) -> str | None:
    """Why the recipe's validation grid would be too large to draw and open again, or None."""
    validation, resolution = recipe.validation, recipe.data.resolution
    if not validation.prompts:
        return None
    controlnet = recipe.method == "controlnet"
    rows = max(len(validation.prompts), len(recipe.controlnet.validation_conditions) if controlnet else 0)
    columns = validation.images_per_prompt + (1 if controlnet else 0)  # a ControlNet's rows start with their conditioning image
    width, height = GRID_LABEL_WIDTH + columns * resolution, rows * resolution
    if width * height <= MAX_GRID_PIXELS:
        return None
    return (f"validation.images_per_prompt ({validation.images_per_prompt}) with {rows} prompt row{'s' if rows > 1 else ''} at {resolution} px makes "
            f"a {width}x{height} validation grid, more than the {MAX_GRID_PIXELS:,} pixels finetune opens (PIL refuses larger images as "
            "decompression bombs): lower validation.images_per_prompt" + (" or list fewer validation.prompts" if rows > 1 else ""))  # fmt: skip
