"""A resumed LoRA keeps the alpha its checkpoint trained with, where the recipe leaves `lora.alpha` unset.

An unset alpha was 16 at every rank until it followed the rank (a scale of 1): a checkpoint of a run from before, at a
rank other than 16, trained at 16/rank, and a recipe that still leaves alpha unset would continue it at another
scale. The checkpoint keeps its run's settings (flat, `lora.alpha` filled in), read here before the method is built:
an unset alpha becomes the checkpoint's, said in one line. An alpha the recipe sets is the user's choice and is used
(the resume's warning names the change, `finetune.checkpoints.resume_changes.changed_settings`).
"""

from __future__ import annotations

from pathlib import Path

from finetune.checkpoints.run_files import read_state
from finetune.config import Recipe
from finetune.console import warn


def keep_checkpoint_alpha(recipe: Recipe, checkpoint: Path) -> None:
    """Set the recipe's unset lora.alpha to the one `checkpoint` trained with, where they differ, and say so."""
    saved = read_state(checkpoint).get("recipe")  # None: a checkpoint from before the recipe was kept
    if not recipe.trains_lora or not recipe.lora.alpha_unset or saved is None or saved.get("lora.alpha") is None:
        return
    if saved.get("lora.rank") != recipe.lora.rank:  # another rank is refused (`resume_checks.check_resumable`)
        return
    alpha, trained = recipe.lora.alpha, float(saved["lora.alpha"])
    if trained != alpha:
        recipe.lora.alpha = trained
        warn(f"lora.alpha is unset: {trained:g} as {checkpoint.name} trained, where a new run takes {alpha:g}{'' if recipe.lora.use_rslora else ' (the rank)'}: "
             "set lora.alpha to train the rest at another scale")  # fmt: skip
