"""The size of the validation grid a recipe draws (samples/step-N.png), checked where the recipe loads: every image of a
validation is held in memory to draw it, and an image past PIL's decompression-bomb bound cannot be opened again
(the bound: finetune/image_bounds.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.image_bounds import grid_problem

if TYPE_CHECKING:
    from finetune.config.recipe import Recipe


def validation_grid_problem(recipe: Recipe) -> str | None:
    """Why the recipe's validation grid would be too large to draw and open again, or None."""
    validation, resolution = recipe.validation, recipe.data.resolution
    if not validation.all_prompts:
        return None
    controlnet = recipe.method == "controlnet"
    rows = max(len(validation.all_prompts), len(recipe.controlnet.validation_conditions) if controlnet else 0)
    fix = "lower validation.images_per_prompt" + (" or list fewer validation.prompts" if rows > 1 else "")
    return grid_problem("validation grid", "validation.images_per_prompt", validation.images_per_prompt, rows, resolution, 1 if controlnet else 0, fix)
