"""validation.prompts_file: validation prompts kept in a text file, one a line, as sd-scripts' --sample_prompts file keeps
them (each may end in its per-prompt options, finetune/sampling/prompt_options.py); blank lines and lines starting with # are
skipped. Read where the recipe loads, so a missing, unreadable or empty file is said before the data check."""

from __future__ import annotations

from pathlib import Path

from finetune.sampling.prompt_options import PromptSettings, with_options

KEY = "validation.prompts_file"


def read_prompts_file(path: str) -> list[str]:
    """The prompts of file `path`, in order; a ValueError of one line naming the file and what to do."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{KEY} {path} is a folder: give a text file of prompts, one a line")
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a BOM that Notepad writes is no part of the first prompt
    except FileNotFoundError:
        raise ValueError(f"{KEY} {path} not found (relative paths are read from the current folder): give a text file of prompts, one a line") from None
    except UnicodeDecodeError:
        raise ValueError(f"{KEY} {path} is not UTF-8 text: save it as UTF-8, one prompt a line") from None
    except OSError as err:
        raise ValueError(f"{KEY} {path} cannot be read ({err.strerror or err}): check its permissions") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            with_options(line, PromptSettings("", None, 0, 1.0, 1))  # an unknown option or a bad value, as validation.prompts are checked
        except ValueError as err:
            raise ValueError(f"{KEY} {path} line {number}: {err}") from None
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{KEY} {path} holds no prompts (blank lines and # comments are skipped): write one prompt a line, or remove the key")
    return prompts
