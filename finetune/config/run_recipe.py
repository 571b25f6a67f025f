"""The recipe a run resolved (its overrides applied, every default filled in), kept in its output_dir under a name
of its own: the run's record, and what `finetune train OUTPUT_DIR/recipe_as_run.yaml --resume latest` continues.
A recipe the user keeps in the output_dir (`finetune train runs/cat/recipe.yaml` with `output_dir: runs/cat`)
is theirs: a run wrote `recipe.yaml` there once, over the user's comments and layout."""

from __future__ import annotations

import os
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


def read_where_the_run_is(raw: dict, record: Path) -> None:
    """A run's record (`raw`, read from `record`) as of where its folder is now. It names the paths its run was given,
    absolute where they were given so; a run folder copied to another machine, or moved with its project (a parent
    renamed), kept naming the old places: a resume stopped on its data "not found", and a copy resumed beside its
    original wrote into the original's folder. Now its output_dir is the folder holding the record; an absolute path
    inside the run's old folder is inside this one; one not there that lies under the folder the run moved out of
    (/home/alice/proj/data, the run moved from /home/alice/proj/runs/a to /home/bob/proj/runs/a) is read under the one it
    moved into, where that holds it. Each path read elsewhere is said in one line. Relative paths stay the current
    folder's, as in any recipe (`finetune train outputs/lora/recipe_as_run.yaml` is run from the folder the run was)."""
    from finetune.console import say

    recorded, here = raw.get("output_dir"), Path(os.path.abspath(record.parent))
    if not isinstance(recorded, str) or _same_folder(Path.cwd() / os.path.expanduser(recorded), here):
        return
    old = Path(os.path.abspath(os.path.expanduser(recorded))) if os.path.isabs(os.path.expanduser(recorded)) else None
    common = _common_tail(old, here) if old is not None else 0
    roots = (Path(*old.parts[:-common]), Path(*here.parts[:-common])) if common else None

    def moved(value: str) -> str | None:
        path = Path(os.path.expanduser(value))
        if old is None or not path.is_absolute():
            return None
        path = Path(os.path.abspath(path))
        if path.is_relative_to(old):  # it moved with the run folder, there or not
            return str(here / path.relative_to(old))
        if roots is None or path.exists() or not path.is_relative_to(roots[0]):
            return None
        candidate = roots[1] / path.relative_to(roots[0])
        return str(candidate) if candidate.exists() else None

    read_elsewhere, not_here = [], []

    def rewrite(node, key: str):
        if isinstance(node, dict):
            return {name: rewrite(value, f"{key}.{name}" if key else str(name)) for name, value in node.items()}
        if isinstance(node, list):
            return [rewrite(value, f"{key}.{index}") for index, value in enumerate(node)]
        if isinstance(node, str) and (now := moved(node)) is not None and now != node:
            read_elsewhere.append(f"{key} {now}")
            return now
        if isinstance(node, str) and os.path.isabs(os.path.expanduser(node)) and not os.path.exists(os.path.expanduser(node)):
            not_here.append(f"{key} {node}")
        return node

    raw.update(rewrite({key: value for key, value in raw.items() if key != "output_dir"}, ""))
    raw["output_dir"] = str(here)
    line = f"run folder moved: {record.name} names it {recorded}; output_dir is {here}"
    if old is None:  # relative: the record's folder seen from where its run started, not from here
        from finetune.config.recipe_paths import run_start

        start = run_start(here, recorded)
        line = (f"run folder {here}: {record.name} names it {recorded}, from the folder its run started in; output_dir is this folder, and the "
                "record's relative paths are read from the current folder" + (f" (the run's own from {start}: cd {start})" if start else ""))  # fmt: skip
    line += f", {', '.join(read_elsewhere)} (where the run moved)" if read_elsewhere else ""
    if not_here:  # (not all are read: a resume reads no lora.init_from) the line that stops on one names its key; this says how to give it
        line += f"; not here: {', '.join(not_here)}: give where each is now after the recipe, as {not_here[0].split()[0]}=PATH"
    say(line)


def _same_folder(path: Path, folder: Path) -> bool:
    return path.exists() and os.path.samefile(path, folder)


def _common_tail(old: Path, new: Path) -> int:
    """How many trailing parts two folders share by name, short of the whole (/home/alice/proj/runs/a and /mnt/proj/runs/a:
    3, proj/runs/a)."""
    count = 0
    while count < min(len(old.parts), len(new.parts)) - 1 and old.parts[-1 - count] == new.parts[-1 - count]:
        count += 1
    return count
