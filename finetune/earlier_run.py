"""The earlier run in a run's output_dir: kept unless the user asks for it to go (--overwrite), never mixed with
a new run's checkpoints, and never the resume of another run's checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from finetune.checkpoint import CHECKPOINT_PATTERN, checkpoint_step, list_checkpoints, read_state
from finetune.errors import FinetuneError

# What a run leaves in its output_dir besides its outputs: `overwrite` clears these (DreamBooth's generated
# class images stay: they are named by their prompt and settings, so a new run reuses only matching ones).
RUN_FOLDERS = ("checkpoints", "samples", "logs")


def guard_earlier_run(output_dir: Path, resume_from: Path | None, overwrite: bool) -> None:
    """A fresh run must not mix with an earlier run's checkpoints: its rotation would delete theirs (or
    replace a checkpoint of the same step), and `--resume latest` would later pick theirs. Cheap: it
    runs before anything is loaded, as does the check that output_dir can be written at all."""
    existing = next(folder for folder in (output_dir, *output_dir.parents) if folder.exists())  # the root, at least
    if not existing.is_dir():
        raise FinetuneError(f"output_dir {output_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneError(f"output_dir {output_dir}: {existing} cannot be written to (permissions, or a read-only disk): choose another output_dir")
    earlier = list_checkpoints(output_dir / "checkpoints")
    if resume_from is not None and earlier and not _of_this_run(resume_from, output_dir):  # rotation would delete them unasked
        raise FinetuneError(f"--resume {resume_from}: output_dir {output_dir} holds checkpoints of another run ({earlier[-1].name}), which this run's "
                            f"would replace and rotate away: set output_dir to a new folder, or move them out of {output_dir / 'checkpoints'} to keep them")  # fmt: skip
    if resume_from is not None:
        # Resumed from an older step, the run would retrain the steps of the later ones: they are another
        # history, which rotation would keep over the new one's and `--resume latest` would pick.
        step = checkpoint_step(resume_from)
        # By the folders' names: an earlier checkpoint's damaged state must not stop a resume from another.
        later = [p.name for p in earlier if int(CHECKPOINT_PATTERN.match(p.name).group(1)) > step]
        if later:
            raise FinetuneError(
                f"--resume {resume_from.name}: {output_dir / 'checkpoints'} also holds later checkpoints of the steps it would train again "
                f"({', '.join(later)}): move them out of that folder to keep them (or delete them), then resume"
            )
        return
    if not earlier or overwrite:
        return
    raise FinetuneError(
        f"output_dir {output_dir} holds an earlier run ({earlier[-1].name}): continue it with --resume latest, "
        f"replace it with --overwrite (deletes its checkpoints, samples and logs), or set output_dir to a new folder"
    )


def _of_this_run(checkpoint: Path, output_dir: Path) -> bool:
    """Whether `checkpoint` is one of `output_dir`'s run: in its checkpoints/, or copied out of it (its recipe's output_dir)."""
    if checkpoint.resolve().parent == (output_dir / "checkpoints").resolve():
        return True
    began = (read_state(checkpoint).get("recipe") or {}).get("output_dir")
    return began is not None and Path(began).expanduser().resolve() == output_dir.resolve()


def clear_earlier_run(output_dir: Path) -> None:
    for name in RUN_FOLDERS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
