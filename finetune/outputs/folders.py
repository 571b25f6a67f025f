"""Whether a pipeline may be written to a folder, checked before anything loads: apart from
`finetune.outputs.pipeline_io` (torch, diffusers) so that `finetune make-tiny-model` refuses a folder at once."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.checkpoints.run_files import PIPELINE_DIR
from finetune.errors import FinetuneError, nearest_existing


def check_replaceable(folder: Path, overwrite: bool, what: str) -> None:
    """Writing a pipeline replaces its folder's contents (merge, export-base; the folder itself is kept): never a
    file, nor a folder with contents the user did not ask to replace."""
    check_folder_to_write(folder, what, "give a folder for the pipeline")
    here = Path.cwd().resolve()
    # `.` had no parents to look in (a traceback). One with contents (or a folder above it) is never emptied, even with
    # --overwrite: it is where the user works (a project, a home folder). An empty one is filled in place (folder_written_whole).
    if folder.resolve() in (here, *here.parents) and any(folder.iterdir()):
        raise FinetuneError(f"{what} {folder} is the current folder or one above it, which writing the pipeline would replace: give a new folder, e.g. {Path(folder) / 'merged'}")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FinetuneError(f"{what} {folder} is not empty: pick a new folder, or pass --overwrite to replace what is in it")


def check_folder_to_write(folder: Path, what: str, instead: str, subject: str | None = None) -> None:
    """A folder a command is to write: not a file, nor inside one, and writable (`check_writable`, which names it `what`).
    Each line begins with `subject` (default: `what` and the folder) and ends with `instead`, what to give in its place:
    the commands word it for what they write there."""
    subject = f"{what} {folder}" if subject is None else subject
    if folder.exists() and not folder.is_dir():
        raise FinetuneError(f"{subject} is a file: {instead}")
    inside = nearest_existing(folder.absolute().parent)
    if not inside.is_dir():
        raise FinetuneError(f"{subject} is inside a file ({inside}): {instead}")
    check_writable(folder, what)


def check_writable(folder: Path, what: str) -> None:
    """Whether atomic_files.folder_written_whole can write `folder` (not a file, nor inside one: the caller said so): an existing
    folder itself (its contents read to be replaced), a new one in the folder it goes in. Unwritable, it failed with a traceback
    at the first write, after the model had loaded (export-base, merge) or the images were drawn (make-world-data)."""
    inside = nearest_existing(Path(folder).absolute().parent)
    if not (os.access(folder, os.R_OK | os.W_OK | os.X_OK) if folder.is_dir() else os.access(inside, os.W_OK | os.X_OK)):
        where = folder if folder.is_dir() else f"{folder}: the folder it goes in, {inside},"
        raise FinetuneError(f"{what} {where} cannot be written to (permissions, or a read-only disk): fix its permissions, or give another folder")


def check_not_what_it_reads(folder: Path, sources: dict[str, str | Path | None], what: str) -> None:
    """A pipeline written replaces its folder's contents, so never a model it is made from (by the option or argument naming
    it; None where not given), a folder around it (a run's, with its checkpoints and samples) or one inside it
    (`merge --base mine mine/unet --overwrite` broke the base). A hub id is no path here."""
    out = Path(folder).resolve()
    for name, source in sources.items():
        path = Path(source).expanduser().resolve() if source else None
        if path is None or not path.exists():
            continue
        where = "is" if out == path else "holds" if out in path.parents else "is inside" if path in out.parents else None
        if where:
            raise FinetuneError(f"{what} {folder} {where} the model it reads ({name} {source}), which writing it would replace: pick another folder")


def check_merge_output(output_dir: Path, lora: Path, overwrite: bool) -> None:
    """The merged pipeline replaces the whole folder: never the one holding the LoRA (`lora`: its file, or the folder
    given as --lora), nor one the user keeps other things in, unasked. Checked by the command before torch loads."""
    resolved = Path(lora).resolve()
    if Path(output_dir).resolve() in ((resolved, *resolved.parents) if resolved.is_dir() else resolved.parents):
        raise FinetuneError(f"merge output {output_dir} holds the LoRA being merged ({lora}): pick another folder")
    check_replaceable(output_dir, overwrite, "merge output")


def check_export_checkpoint_output(folder: Path, output: Path, overwrite: bool) -> None:
    """export-checkpoint's output: a .safetensors file name, outside the pipeline `folder` it reads, not a folder nor
    inside a file, and not an existing file unless `overwrite`. Checked by the command before torch loads."""
    if output.suffix.lower() == ".safetensors" and output.suffix != ".safetensors":  # diffusers would read it as a pickle
        raise FinetuneError(f"export-checkpoint output {output} ends in {output.suffix}: give it as {output.with_suffix('.safetensors').name} "
                            "(diffusers knows a single-file model by its suffix, in lowercase)")  # fmt: skip
    if output.suffix != ".safetensors":
        raise FinetuneError(f"export-checkpoint output {output} is not a .safetensors file name: give one, e.g. outputs/webui/mymodel.safetensors")
    if output.resolve().is_relative_to(folder.resolve()):
        raise FinetuneError(f"export-checkpoint would write {output} inside the pipeline it reads ({folder}): give an output outside it")
    if output.is_dir() or any(parent.is_file() for parent in output.parents):
        raise FinetuneError(f"export-checkpoint output {output} is a folder, or inside a file: give a .safetensors file path")
    if output.exists() and not overwrite:
        raise FinetuneError(f"export-checkpoint would replace {output}: give another output, or pass --overwrite")


def export_base_source(source: Path, destination: Path, overwrite: bool) -> Path:
    """export-base's source pipeline folder (a full run's folder: its pipeline/), once it and the destination are checked."""
    check_not_what_it_reads(destination, {"source": source}, "export-base destination")  # a run's folder holds its pipeline/
    if (source / PIPELINE_DIR / "model_index.json").is_file():  # a full run's folder (outputs/base/unet3), as export-checkpoint takes
        source = source / PIPELINE_DIR
    if not (source / "model_index.json").is_file():
        raise FinetuneError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
    check_replaceable(destination, overwrite, "export-base destination")
    return source
