"""The repeats an sd-scripts `N_name` folder's name gives (`10_sks dog`: each image 10 times an epoch), read as
sd-scripts reads them, and a note where that N is more likely part of the name than a count: `2024_trip` is a year,
not 2024 repeats, yet either tool would train that folder 2024 times an epoch."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

KOHYA_FOLDER = re.compile(r"(\d+)_(.*)")
# A folder whose uses outweigh all the others' together by this much leaves them next to untrained: more likely
# a number in its name than a balance anyone chose.
DOMINANT_RATIO = 100
YEARS = range(1900, 2101)


def name_repeats(name: str) -> int | None:
    """The N of a folder named `N_name` (its last part), as sd-scripts reads it; None for any other name."""
    match = KOHYA_FOLDER.match(PurePosixPath(name).name)
    return int(match[1]) if match else None


def implausible_repeats_notes(folders: list[tuple[str, int | None]]) -> list[str]:
    """A note for each of `folders` ((path, its image count, or None where not known)) whose `N_name` repeats look
    like part of its name: a year, or uses (images x N) over DOMINANT_RATIO times all the other folders' together.
    Each names the rename that trains it once an epoch (`1_2024_trip`)."""
    uses = [(name_repeats(path) or 1) * count if count is not None else None for path, count in folders]
    notes = []
    for index, (path, count) in enumerate(folders):
        repeats = name_repeats(path)
        if repeats is None or repeats <= 1:
            continue
        others = [use for other, use in enumerate(uses) if other != index and use is not None]
        dominant = count is not None and others and sum(others) > 0 and repeats * count > DOMINANT_RATIO * sum(others)
        if repeats in YEARS or dominant:
            share = f", {100 * repeats * count / (repeats * count + sum(others)):.1f}% of the epoch" if dominant else ""
            renamed = (PurePosixPath(path).parent / f"1_{PurePosixPath(path).name}").as_posix()
            notes.append(f"'{path}' reads as {repeats} repeats (sd-scripts' N_name: each of its images {repeats} times an epoch{share}): "
                         f"if {repeats} is part of its name, give it repeats 1 there (and for sd-scripts rename the folder '{renamed}')")  # fmt: skip
    return notes
