"""The lines a run says on the console: one `warning: ...` style for every warning, written above any
progress bar (not onto its line), and each said once: by the process whose turn it is (`finetune.distributed.process_env`)."""

from __future__ import annotations

from typing import Literal, TextIO

from tqdm.auto import tqdm

from finetune.distributed.process_env import first_on_its_machine, machine_name, main_process

# Who says a line: the main process, once for the run (every process of a launch meets the same recipe, data
# and files, and another machine's processes may not even see the files the main process wrote); each
# machine's first process, for its machine's own state (its libraries), naming the machine where there are
# several; or this process, for what it alone met (a damaged file it removed).
Speaker = Literal["run", "machine", "this process"]
_warnings_said = 0  # by this process: check-data's result counts those said outside its report (the recipe's, a class folder's)


def say(line: str, file: TextIO | None = None, by: Speaker = "run") -> None:
    """Print `line` to stdout (or `file`) if this process is the one to say it."""
    if _says(by):
        tqdm.write(line, file=file)


def _says(by: Speaker) -> bool:
    return {"run": main_process, "machine": first_on_its_machine, "this process": lambda: True}[by]()


def warn(line: str, file: TextIO | None = None, by: Speaker = "run") -> None:
    """A warning, as every warning of the project reads: `warning: <what>: <what to do>`."""
    global _warnings_said
    where = machine_name() if by == "machine" else None
    _warnings_said += _says(by)
    say(f"warning: {where + ': ' if where else ''}{line}", file, by)


def warnings_said() -> int:
    """How many warnings this process has said with `warn`."""
    return _warnings_said
