"""A disk that filled while a run wrote what it keeps (a checkpoint, its outputs): told apart from other failed writes,
so that the line says the disk is full, how much room the write needs and how much there is, instead of an errno."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# How each writer says it: an OSError's errno, safetensors' "I/O error: No space left on device (os error 28)" (Rust's words).
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def disk_full(err: BaseException, folder: Path, needed: int = 0) -> bool:
    """Whether `err`, raised while writing in `folder`, is a full disk (or quota). torch.save says only "file write failed"
    or "iostream error" (no errno): for it, a disk with less room left than the write `needed` is taken for the cause."""
    if getattr(err, "errno", None) in FULL_ERRNOS or any(words in str(err) for words in FULL_WORDS):
        return True
    from finetune.outputs.atomic_files import TORCH_WRITE_ERRORS

    free = free_bytes(folder)
    return isinstance(err, RuntimeError) and any(words in str(err) for words in TORCH_WRITE_ERRORS) and free is not None and free < needed


def free_bytes(folder: Path) -> int | None:
    """The room left on `folder`'s disk (that of the nearest folder above it that exists); None where it cannot be read."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def size_on_disk(path: Path) -> int:
    """The bytes of a file, or of every file under a folder (0 for one that is not there)."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    except OSError:  # removed as it was counted
        return 0


def size_text(count: int) -> str:
    """Bytes as a person reads them: 1.2 GB, 35.0 MB, 900 KB (powers of 1000, as `df -H` and file managers count)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{max(1, round(count / 1e3))} KB"


def room_text(folder: Path) -> str:
    """' (N free)' for `folder`'s disk, or '' where its room cannot be read."""
    free = free_bytes(folder)
    return "" if free is None else f" ({size_text(free)} free)"


def outputs_full_disk_line(err: BaseException, output_dir: Path, checkpoints_dir: Path) -> str | None:
    """What a run's end says where the disk filled under its outputs (its LoRA file, its model folders): the room they need
    (their copies in the newest complete checkpoint, where `checkpoint.save_outputs` keeps them there), and the checkpoint
    `--resume latest` finishes the run from. None for a failed write that is no full disk (permissions)."""
    from finetune.checkpoints.earlier_run import RUN_OUTPUTS
    from finetune.checkpoints.run_files import list_checkpoints

    latest = list_checkpoints(checkpoints_dir)[-1:]
    needed = sum(size_on_disk(latest[0] / name) for name in RUN_OUTPUTS) if latest else 0
    if not disk_full(err, output_dir, needed):
        return None
    need = f", which need about {size_text(needed)} (their copy in {latest[0].name})" if needed else ""
    then = f"--resume latest finishes the run from {latest[0].name}, the newest complete checkpoint" if latest else "run again (no checkpoint was kept)"
    return f"no space left on the disk of {output_dir}{room_text(output_dir)} for the run's outputs{need}: make room, then {then}"
