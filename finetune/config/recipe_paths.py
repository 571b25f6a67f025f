"""A recipe's relative data paths are read from the current folder, not the recipe's (the shipped recipes name
datasets/... from the repository's root, and `finetune train recipes/X.yaml` runs from there). Where the recipe's
folder holds another folder or file by the same relative path (a recipe kept beside its data, run from a folder with
an older copy), which one was meant cannot be told: training the current folder's would be silent, so it is one line
naming both, before anything is read. A path given on the command line (`data.image_dir=.`) is the shell's, typed
from the current folder: no question there; nor where the recipe's folder is its output_dir (a run's record, kept there
by an earlier finetune as recipe.yaml, or a recipe kept with its run): the output_dir is never the data."""

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


def require_unambiguous_data_paths(recipe, recipe_path: Path, set_on_command_line: tuple[str, ...] = ()) -> None:
    """Stop where a relative data path of `recipe` names something both in the current folder (which would be read)
    and, another, beside the recipe file `recipe_path`. `set_on_command_line`: the overrides' keys, whose paths are
    not the file's (`data.image_dir=.` from the data's folder named the recipe's folder too: refused, always)."""
    here, beside = Path.cwd(), Path(os.path.abspath(recipe_path)).parent
    if os.path.normcase(here) == os.path.normcase(beside):
        return
    output_dir = here / os.path.expanduser(recipe.output_dir)
    for setting, value in data_paths(recipe):
        if os.path.isabs(os.path.expanduser(value)) or any(setting == key or setting.startswith(key + ".") for key in set_on_command_line):
            continue
        read, other = here / value, beside / value
        if read.exists() and other.exists() and not os.path.samefile(read, other) and not _same(other, output_dir):
            remedy = ": write the one meant as an absolute path, or run from its folder"
            if (start := run_start(beside, recipe.output_dir)) is not None:  # its folder is its output_dir from `start`: run from there
                remedy = (f", its output_dir ({recipe.output_dir}) seen from {start}: run from {start} (cd {start}), or write the one meant as an absolute path"
                          if start != here else ": write the one meant as an absolute path")  # fmt: skip
            raise FinetuneError(f"{setting} {value} names two: {read}, which it would read (relative paths are read from the current folder), "
                                f"and {other} beside recipe {recipe_path}{remedy}")  # fmt: skip


def _same(path: Path, other: Path) -> bool:
    return other.exists() and os.path.samefile(path, other)


def run_start(folder: Path, output_dir: str) -> Path | None:
    """The folder a run whose relative `output_dir` is `folder` was started in (`folder` less `output_dir`'s parts: the
    recipe kept in its output_dir, as an earlier finetune kept its record of the run), or None where that cannot be told."""
    parts = Path(os.path.normpath(output_dir)).parts
    if os.path.isabs(os.path.expanduser(output_dir)) or ".." in parts or parts == (".",) or folder.parts[-len(parts):] != parts:
        return None
    return Path(*folder.parts[: -len(parts)])
