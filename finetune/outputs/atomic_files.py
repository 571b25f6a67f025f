"""Files and folders that appear whole: written under a temporary name, flushed to disk, then renamed into
place, so a crash or a power cut leaves the previous version or the new one, never a half-written file."""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from safetensors import SafetensorError

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    import torch


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' own, imported when a file is saved: torch takes seconds to import, and `make-conditions`
    writes its files with this module's helpers without it."""
    from safetensors.torch import save_file as save

    save(tensors, filename, metadata=metadata)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`tensors` and `metadata` as the .safetensors file `path`, whole or as it was (`atomic_write`: a full disk, Ctrl-C or a
    folder where the file goes leaves no half file), with the default permissions; its folder made first."""

    def write(partial: Path) -> None:
        save_file(tensors, str(partial), metadata=metadata)
        with_default_permissions(partial)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def atomic_write(path: Path, write: Callable[[Path], object], durable: bool = True) -> Path:
    """`path` as `write(partial)` writes it, or as it was: written beside it under a temporary name and renamed into
    place, so a stop at any point (Ctrl-C, a full disk) leaves the old file or the new one. A hidden
    `.NAME.partial` is removed on the way out; a kill that allows no way out (SIGKILL, a power cut) leaves it, and
    the next write of `path` writes over it (`remove_leftover_partials` for one that is not written again). `durable`: flushed to disk before the rename (a power cut then
    keeps the old file or the whole new one); an image among thousands skips the flush, as `save_image_atomic` does."""
    partial = partial_path(path)
    with removed_if_unfinished(partial):
        write(partial)
        (flush_to_disk(partial) if durable else partial).replace(path)
    if durable:
        sync_folder(path.parent)
    return path


def partial_path(path: Path) -> Path:
    """Where `atomic_write` writes `path` before renaming it into place: a hidden `.NAME.partial` beside it (a new
    folder's too: `folder_written_whole`, `save_model_folder`)."""
    return path.with_name(f".{path.name}.partial")


def remove_leftover_partials(folder: Path, written_here: Callable[[str], bool]) -> None:
    """Remove the `.NAME.partial` files that `atomic_write` left in `folder` (a SIGKILL or a power cut allows no
    cleanup) for the NAMEs a command writes there (`written_here`); any other file, a user's, is not touched.
    A partial is written over when its file is written again; one of a file that never is again stayed for good."""
    if not folder.is_dir():
        return
    for entry in list(folder.iterdir()):
        name = entry.name[1 : -len(".partial")]
        if entry.name == f".{name}.partial" and name and written_here(name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> Path:
    """`path` holding `text` (UTF-8) whole, or as it was (see `atomic_write`)."""
    return atomic_write(path, lambda partial: partial.write_text(text, encoding="utf-8"))


@contextmanager
def removed_if_unfinished(partial: Path):
    """Around writing a folder or a file under its temporary name, up to its rename into place: a failure (a full disk,
    Ctrl-C) removes what was written, which would otherwise keep its space, hidden, until the next save."""
    try:
        yield partial
    except BaseException:
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise


# A folder with contents is rewritten inside itself: the new files under NEW_INSIDE, the old ones moved under OLD_INSIDE
# just before the new ones take their place (renames in one folder, on one file system, with no write to its parent).
NEW_INSIDE, OLD_INSIDE = ".finetune-new.partial", ".finetune-old.partial"


@contextmanager
def folder_written_whole(final: Path, durable: bool = True):
    """Yields the folder to write `final`'s files in, and puts them in place once the block ends, so that a stop
    leaves no half-filled folder. A new `final` is written as a hidden `.NAME.partial` beside it and renamed into
    place. An existing one is kept (its inode, permissions and owner): `.` (a folder of no name) has no name beside
    it, a shell working in it would be left in a deleted folder, and a mount point (or a folder whose parent cannot
    be written) cannot be renamed, which failed only once everything was written. An empty one is filled in place,
    emptied again where the block stops; one with contents (which the caller's --overwrite allowed to go) gets the
    new files in a hidden folder inside it, swapped for the old contents once whole (`contents_replaced`)."""
    if final.is_dir() and not any(final.iterdir()):
        try:
            yield final
        except BaseException:
            _empty(final)
            raise
        if durable:
            flush_to_disk(final)
        return
    if final.is_dir():
        new = final / NEW_INSIDE
        shutil.rmtree(new, ignore_errors=True)  # a killed write's
        with removed_if_unfinished(new):
            new.mkdir()
            yield new
        contents_replaced(final, new, durable)
        return
    partial = partial_path(final)
    shutil.rmtree(partial, ignore_errors=True)
    with removed_if_unfinished(partial):
        partial.mkdir(parents=True)
        yield partial
    if durable:
        replace_folder(partial, final)
    else:
        partial.rename(final)


def contents_replaced(final: Path, new: Path, durable: bool = True) -> Path:
    """`final`'s contents replaced by those of `new`, a folder inside it, with `final` itself kept. The old entries
    are moved aside into OLD_INSIDE first and removed last: a crash between leaves both whole, hidden in `final`."""
    if durable:
        flush_to_disk(new)
    old = final / OLD_INSIDE
    shutil.rmtree(old, ignore_errors=True)  # a crashed swap's: the run that left it had been allowed to replace them
    old.mkdir()
    for entry in list(final.iterdir()):
        if entry.name not in (NEW_INSIDE, OLD_INSIDE):
            entry.rename(old / entry.name)
    for entry in list(new.iterdir()):
        entry.rename(final / entry.name)
    new.rmdir()
    if durable:
        sync_folder(final)
    shutil.rmtree(old)
    return final


def _empty(folder: Path) -> None:
    for entry in list(folder.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def replace_folder(new: Path, final: Path) -> Path:
    """Put the complete folder `new` in `final`'s place. An existing `final` is renamed aside first and removed
    last, so a crash at any point leaves a whole folder: the old one (in place, or aside as `.NAME.old`) or
    the new one; never neither (as removing first, then renaming, did)."""
    aside = final.with_name(f".{final.name}.old")
    if aside.is_dir() and not final.exists():  # killed between the renames last time: the old folder is the only whole one
        aside.rename(final)
    shutil.rmtree(aside, ignore_errors=True)
    flush_to_disk(new)
    if final.exists():
        final.rename(aside)
    new.rename(final)
    sync_folder(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return final


def flush_to_disk(path: Path) -> Path:
    """Make the data of `path` (a file, or a folder's files) durable before a rename publishes it. File systems
    write data later than names (ext4, XFS): after a power cut the new name could hold empty files while the
    previous checkpoint, rotated out or renamed aside, is gone."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    # Windows flushes a file (FlushFileBuffers) only through a handle that may write it: read-only, os.fsync raised
    # EBADF there, and every checkpoint and output failed to save.
    access = os.O_RDWR if sys.platform == "win32" else os.O_RDONLY
    for file in files:
        descriptor = os.open(file, access)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    for folder in sorted({file.parent for file in files if file != path}):
        sync_folder(folder)
    return path


def sync_folder(folder: Path) -> None:
    """Make `folder`'s entries (a new file, a rename) durable. Best effort: some systems cannot open or
    fsync a folder (Windows, some network mounts), and the data itself is already flushed."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def with_default_permissions(path: Path) -> Path:
    """Give `path` (a file, or every file in a folder) the mode a new file gets here (0644 with the usual
    umask): safetensors writes its files readable by their owner only, which a webui or ComfyUI running
    as another user cannot load."""
    mask = os.umask(0)
    os.umask(mask)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, 0o666 & ~mask)
    return path


# How torch.save says a write failed, without an errno: its zip writer ("[enforce fail at inline_container.cc] unexpected pos",
# "file write failed") and the C++ stream under it, which a full disk ended a real run's checkpoint with (its traceback).
TORCH_WRITE_ERRORS = ("inline_container", "file write failed", "basic_ios::clear: iostream error")


def failed_write(err: Exception) -> bool:
    """A file that could not be written (a full disk, permissions): an OSError, or how torch.save reports one (a
    RuntimeError: `TORCH_WRITE_ERRORS`) and safetensors ("I/O error: No space left on device")."""
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and any(words in str(err) for words in TORCH_WRITE_ERRORS)) or (
        isinstance(err, SafetensorError) and "I/O error" in str(err))


@contextmanager
def outputs_written(output_dir: Path, checkpoints_dir: Path):
    """A full disk (or permissions) while the run's outputs are written at its end is one line, not a traceback."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        if not failed_write(err):
            raise
        from finetune.outputs.full_disk import outputs_full_disk_line

        if line := outputs_full_disk_line(err, output_dir, checkpoints_dir):
            raise FinetuneError(line) from None
        raise FinetuneError(
            f"could not write the outputs in {output_dir} ({type(err).__name__}: {str(err).splitlines()[0][:100]}): make room or fix "
            f"its permissions; the newest complete checkpoint in {checkpoints_dir} holds what trained, as of its step"
        ) from None
