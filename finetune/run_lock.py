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
    which training then reports), the run goes on without it."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = _locked_file(output_dir, fcntl)
    except OSError:
        yield
        return
    if handle is None:  # a file system without locks (some network mounts): the run goes on without one
        yield
        return
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        # Removed while still locked: a run that opened the file before this and locks it after finds it
        # gone (see `_locked_file`) and takes a new one, instead of holding a lock nobody else sees.
        with contextlib.suppress(OSError):
            (output_dir / LOCK_FILE).unlink()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _locked_file(output_dir: Path, fcntl):
    """The lock file, opened and locked; None where the file system has no locks."""
    path = output_dir / LOCK_FILE
    while True:
        handle = open(path, "a+")
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
