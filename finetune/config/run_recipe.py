"""The recipe a run resolved (its overrides applied, every default filled in), kept in its output_dir under a name
of its own: the run's record, and what `finetune train OUTPUT_DIR/recipe_as_run.yaml --resume latest` continues.
A recipe the user keeps in the output_dir (`finetune train runs/cat/recipe.yaml` with `output_dir: runs/cat`)
is theirs: a run wrote `recipe.yaml` there once, over the user's comments and layout."""

from __future__ import annotations

from pathlib import Path

RUN_RECIPE = "recipe_as_run.yaml"
# Where runs before this wrote it: still read as a run's record (a folder's method, base and steps) where the new one is not.
EARLIER_RUN_RECIPE = "recipe.yaml"
RUN_RECIPE_HEADER = (
    "# Written by `finetune train`: the recipe as this run resolved it (overrides applied, defaults filled in).\n"
    "# Each run in this output_dir writes it again: edit a copy.\n"
)


def write_run_recipe(recipe, output_dir: Path) -> Path:
    """Whole or as it was (`atomic_write_text`): each resume writes it again, and a kill mid-write (an OOM killer at
    the start) left it cut short, the record of the run, or the recipe the user resumed with. Beside it, where the
    base is on this machine (`finetune.outputs.base_names`): its outputs name it, as shared files do, without its folders."""
    import yaml

    from finetune.outputs.atomic_files import atomic_write_text
    from finetune.outputs.base_names import record_base_paths

    record_base_paths(output_dir, recipe.model.pretrained, recipe.model.single_file_config)
    return atomic_write_text(output_dir / RUN_RECIPE, RUN_RECIPE_HEADER + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


def run_recipe_file(folder: Path) -> Path:
    """The recipe a run in `folder` recorded: this version's file, else an earlier version's `recipe.yaml` (which may
    be the user's own recipe, kept there: a recipe too, read only for the run's method, base and length)."""
    return folder / RUN_RECIPE if (folder / RUN_RECIPE).is_file() else folder / EARLIER_RUN_RECIPE
