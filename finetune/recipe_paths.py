"""A recipe's relative data paths are read from the current folder, not the recipe's (the shipped recipes name
datasets/... from the repository's root, and `finetune train recipes/X.yaml` runs from there). Where the recipe's
folder holds another folder or file by the same relative path (a recipe kept beside its data, run from a folder with
an older copy), which one was meant cannot be told: training the current folder's would be silent, so it is one line
naming both, before anything is read."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.errors import FinetuneError


def data_paths(recipe) -> list[tuple[str, str]]:
    """(setting, path) of each path that names training data (read, or for class images written too)."""
    paths = [("data.image_dir", recipe.data.image_dir), ("data.dataset", recipe.data.dataset)]
    for index, concept in enumerate(recipe.dreambooth.concepts if recipe.dreambooth else []):
        paths += [(f"dreambooth.concepts.{index}.instance_dir", concept.instance_dir), (f"dreambooth.concepts.{index}.class_dir", concept.class_dir)]
    return [(setting, path) for setting, path in paths if path]


def require_unambiguous_data_paths(recipe, recipe_path: Path) -> None:
    """Stop where a relative data path of `recipe` names something both in the current folder (which would be read)
    and, another, beside the recipe file `recipe_path`."""
    here, beside = Path.cwd(), Path(os.path.abspath(recipe_path)).parent
    if os.path.normcase(here) == os.path.normcase(beside):
        return
    for setting, value in data_paths(recipe):
        if os.path.isabs(os.path.expanduser(value)):
            continue
        read, other = here / value, beside / value
        if read.exists() and other.exists() and not os.path.samefile(read, other):
            raise FinetuneError(f"{setting} {value} names two: {read}, which it would read (relative paths are read from the current folder), "
                                f"and {other} beside recipe {recipe_path}: write the one meant as an absolute path, or run from its folder")  # fmt: skip
