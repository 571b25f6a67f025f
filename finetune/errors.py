"""The one exception type a user sees.

Anything the user can fix (a missing folder, a bad recipe key, a corrupt image) raises `FinetuneError`
with a single line that names the file or key and says what to do. The CLI prints that line and exits
with status 2 instead of showing a traceback.
"""


class FinetuneError(Exception):
    """A problem with the user's input, explained in one line."""

    # Which process says it: None, the first one on each machine (every process of a launch meets the same problem); else
    # True or False, where processes meet it differently (the first one may be the process that did not answer).
    said_here: bool | None = None
    # What the process does once the line is said (or left to another process): keep the launch's store up for the processes
    # yet to read it (`error_exchange.wait_for_error_readers`).
    after_said = None


def one_line(err: FinetuneError) -> str:
    """The error's line; raised in a data-loader worker, torch hands it back with the worker's traceback
    around it, whose last line is ours."""
    text = str(err).strip()
    return text.splitlines()[-1].split("FinetuneError: ", 1)[-1] if "Original Traceback" in text else text


def looked_for_here(path) -> str:
    """For a relative path not found: where it was looked for. Recipe paths are read from the current folder,
    not the recipe's (the shipped recipes name datasets/... from the repository's root), so a recipe run from
    another folder misses its folders, and 'not found' alone does not say why."""
    import os
    import re

    if os.path.isabs(os.path.expanduser(str(path))):
        return ""
    if re.match(r"[A-Za-z]:[\\/]", str(path)):  # absolute on Windows only: here D:/sd15 is a folder "D:" in the current one
        return f" ({str(path)[:2]} is a Windows drive, which this system does not have (it read the path from the current folder, {os.getcwd()}): give the path as this system names it)"
    return f" (relative paths are read from the current folder, {os.getcwd()})"


def nearest_existing(path):
    """`path` if it exists, else the nearest folder above it that does (the root, or `.` for a relative path, at least):
    the part of a path to be made that is there, to say where it stops (`x is a file, not a folder`). As given:
    relative stays relative, so a message names the path as the user wrote it. A FinetuneError where not even its
    start exists (a Windows drive letter this system lacks)."""
    from pathlib import Path

    path = Path(path)
    found = next((part for part in (path, *path.parents) if part.exists()), None)
    if found is None:  # not even its start: on Windows, a drive letter this system lacks (Z:/runs); a StopIteration traceback before
        raise FinetuneError(f"{path}: {path.anchor or path} does not exist here (a drive this system does not have?): give a path on one of its drives")
    return found


def refuse_a_file_in_the_way(folder, holds: str, named: str | None = None) -> None:
    """`folder` is, or can be made, a folder: the nearest part of it that is there is no file (output_dir=notes.txt/run).
    The one line every output path says it in: `<named>: <file> is a file, not a folder: give a folder for <holds>`;
    without `named` where the caller's caller names the path (a recipe's validator: the loader adds its key and value)."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise FinetuneError(f"{f'{named}: ' if named else ''}{existing} is a file, not a folder: give a folder for {holds}")
