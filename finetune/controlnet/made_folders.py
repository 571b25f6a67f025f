"""What `finetune make-conditions` says of the training folders it wrote: subfolders as the data.folders entries that train
them, then the command that trains a ControlNet on what it wrote (it ended at 'wrote ...', leaving the creator to find the
recipe and the key that read the folder)."""

from __future__ import annotations

import shlex
from pathlib import Path

CONTROLNET_RECIPE = "recipes/controlnet.yaml"  # the recipe README's ControlNet section trains a make-conditions folder with


def made_folder_lines(output_dir: str, made: list[tuple[Path, int, int]]) -> list[str]:
    """The lines after make-conditions' 'wrote' lines: for the folders `made` ((folder, images, uncaptioned) each) under
    `output_dir` as the creator gave it, the data.folders note where it wrote subfolders, and the train command last."""
    from finetune.data.folder_repeats import implausible_repeats_notes
    from finetune.data.sources import folders_entries

    lines, train = [], ["finetune", "train", CONTROLNET_RECIPE, f"data.image_dir={output_dir}"]
    subfolders = [(folder.name, count) for folder, count, _ in made if folder.parent == Path(output_dir)]
    if subfolders:  # each has its own metadata.jsonl: training reads them as data.folders entries
        # The suggestion reads each N_name folder's repeats from its name, as check-data's does: `2024_trip` is said as likely a year.
        own = [(".", count) for folder, count, _ in made if folder == Path(output_dir)]
        entries = folders_entries([name for name, _ in own + subfolders])
        notes = "".join(f"; {note}" for note in implausible_repeats_notes(own + subfolders))
        lines.append(f"note: train the subfolders as data.folders entries, in the recipe's data section: {entries}{notes}")
        train.append(f"data.{entries.replace(': ', '=', 1)}")  # `folders: [...]` as an override, `data.folders=[...]`
    return [*lines, f"next: {shlex.join(train)}"]
