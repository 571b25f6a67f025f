"""The lines a run says on the console: one `warning: ...` style for every warning, written above any
progress bar (not onto its line), by the process whose turn it is to say them (see `finetune.process_env`)."""

from __future__ import annotations

from typing import TextIO

from tqdm.auto import tqdm

from finetune.process_env import first_on_its_machine


def say(line: str, file: TextIO | None = None) -> None:
    """Print `line` (to stdout, or `file`) from the first process of each machine: every process of a
    launch meets the same recipe, data and files, so the others would repeat it."""
    if first_on_its_machine():
        tqdm.write(line, file=file)


def warn(line: str, file: TextIO | None = None) -> None:
    """A warning, as every warning of the project reads: `warning: <what> : <what to do>`."""
    say(f"warning: {line}", file)
