"""What Windows lacks or does otherwise, reproduced on Linux: flushing a file through a read-only handle, hard links
on an exFAT or FAT32 drive, and the `resource` module (Unix only), each on the code path that meets it."""

import errno
import fcntl
import os
import sys
from pathlib import Path

import finetune.atomic_files as atomic_files


def test_files_are_flushed_through_a_handle_that_may_write_them_on_windows(tmp_path, monkeypatch):
    """Windows' os.fsync (FlushFileBuffers) refuses a read-only handle with EBADF: every checkpoint, output and sample
    was flushed through one, so none could be saved there."""
    flushed = []

    def windows_fsync(descriptor: int) -> None:
        if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        flushed.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")).name)

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "fsync", windows_fsync)
    atomic_files.atomic_write(tmp_path / "state.json", lambda partial: partial.write_text("{}"))
    new = tmp_path / ".checkpoint-2.partial"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"weights")
    atomic_files.replace_folder(new, tmp_path / "checkpoint-2")
    monkeypatch.undo()
    assert (tmp_path / "state.json").read_text() == "{}" and (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes() == b"weights"
    assert flushed == [".state.json.partial", "model.safetensors"]  # flushed before being renamed into place
