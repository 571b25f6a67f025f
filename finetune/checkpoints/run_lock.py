"""One run at a time in an output_dir: a second run started there would remove the first's partial
checkpoint, replace its checkpoints and outputs, and mix their files."""

from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager
from pathlib import Path

from finetune.errors import FinetuneError

LOCK_FILE = ".finetune.lock"


@contextmanager
def output_dir_lock(output_dir: Path):
    """Hold an exclusive lock on `output_dir` while inside (the launcher's first process holds it for all;
    the operating system releases it if the process dies), and remove the lock file when done. Where it
    cannot be taken (no fcntl, as on Windows; a file system without locks; a folder that cannot be made,
    which training then reports), the run goes on without it. A run that fails leaves no folder the lock made and
    nothing filled (`removed_if_left_empty`)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    made: list[Path] = []  # the folders this run's mkdir made (`_locked_file`): none another run made at the same moment
    try:
        handle = _locked_file(output_dir, fcntl, made)
    except OSError:
        yield
        return
    if handle is None:  # a file system without locks (some network mounts): the run goes on without one
        with removed_if_left_empty(made):
            yield
        return
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        with removed_if_left_empty(made):
            try:
                yield
            finally:
                # Removed while still locked: a run that opened the file before this and locks it after finds it
                # gone (see `_locked_file`) and takes a new one, instead of holding a lock nobody else sees.
                with contextlib.suppress(OSError):
                    (output_dir / LOCK_FILE).unlink()
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def make_folder(folder: Path, made: list[Path]) -> None:
    """`folder.mkdir(parents=True, exist_ok=True)`, adding to `made` (innermost first) each folder that its own mkdir
    created. Told by mkdir itself, not by a look before it: a folder another run made as this one looked, and removed as
    it failed, this run makes again, and counts (it stayed behind when this run failed too)."""
    try:
        folder.mkdir()
    except FileNotFoundError:  # a folder above it is missing
        if folder.parent == folder:
            raise
        make_folder(folder.parent, made)
        make_folder(folder, made)
        return
    except OSError:  # there already (made by someone else), or a file: as mkdir(exist_ok=True) tells them apart
        if not folder.is_dir():
            raise
        return
    made[:] = sorted({*made, folder}, key=lambda path: len(path.parts), reverse=True)


@contextmanager
def removed_if_left_empty(made: list[Path]):
    """A run that fails (its checks: a bad image, an earlier run in output_dir; or a stop) removes the folders its lock
    made, where they are still empty: a new output_dir was left behind, lock file gone, after every failed check.
    Only empty ones (rmdir): a file anyone wrote there stays, and so does the folder that holds it. Still locked: a
    run started there meanwhile has its lock file in the folder, which therefore stays."""
    try:
        yield
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): it, and the folders above it, stay
                break
        raise


def _locked_file(output_dir: Path, fcntl, made: list[Path]):
    """The lock file, opened and locked; None where the file system has no locks. `made`: as `make_folder`'s."""
    path = output_dir / LOCK_FILE
    while True:
        make_folder(output_dir, made)  # again: a failed run that held the lock removes a folder it made
        try:
            handle = open(path, "a+")
        except FileNotFoundError:  # removed so between the mkdir and here: made again (else the run went on without a lock)
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise FinetuneError(f"output_dir {output_dir} is in use by another run{f' (process {holder})' if holder else ''}: "
                                "let it finish or stop it, or choose another output_dir") from None
        except OSError:  # no locks here: the empty file opened for one would stay in the run's folder for good
            handle.close()
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        try:  # still the file at that name, not one the run that held it removed as it ended
            if os.path.samestat(os.stat(path), os.fstat(handle.fileno())):
                return handle
        except FileNotFoundError:
            pass
        handle.close()
