"""What Windows lacks or does otherwise, reproduced on Linux: flushing a file through a read-only handle, hard links
on an exFAT or FAT32 drive, a drive letter the system lacks, the `resource` module (Unix only) and text files in a
code page, each on the code path that meets it."""

import errno
import fcntl
import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

import finetune.outputs.atomic_files as atomic_files
from finetune.sampling.sample_files import write_numbered


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


def test_samples_are_copied_into_place_where_the_drive_has_no_hard_links(tmp_path, monkeypatch):
    """os.link on an exFAT or FAT32 drive on Windows: [WinError 1] Incorrect function, which Python gives errno EINVAL;
    `finetune sample` stopped with it rather than writing its files the other way."""

    def exfat_link(source, target):
        raise OSError(errno.EINVAL, "Incorrect function")

    monkeypatch.setattr(os, "link", exfat_link)
    images = [("prompt0_seed0.png", Image.new("RGB", (4, 4), (10, 10, 10))), ("grid.png", Image.new("RGB", (4, 4), (20, 20, 20)))]
    written = write_numbered(tmp_path, images)
    assert [p.name for p in written] == ["00000-prompt0_seed0.png", "00000-grid.png"]
    assert [np.asarray(Image.open(p))[0, 0, 0] for p in written] == [10, 20]
    assert not list(tmp_path.glob(".*"))


def test_the_bench_measures_a_variant_without_the_resource_module(monkeypatch):
    """`finetune bench` runs each variant in `python -m finetune.bench --worker`, whose module imported `resource` at
    its top: on Windows every variant failed with "No module named 'resource'". Its peak memory is the process's peak
    working set there."""
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource: ImportError, as on Windows
    monkeypatch.delitem(sys.modules, "finetune.bench.measure", raising=False)
    measure = importlib.import_module("finetune.bench.measure")
    monkeypatch.setattr(measure, "Path", lambda path: SimpleNamespace(read_text=lambda: (_ for _ in ()).throw(FileNotFoundError(path))))
    import psutil

    monkeypatch.setattr(psutil, "Process", lambda: SimpleNamespace(memory_info=lambda: SimpleNamespace(peak_wset=300 * 2**20)))
    assert measure.peak_rss_mb() == 300.0


def test_the_tiny_models_tokenizer_is_written_in_utf8_where_the_locale_is_a_code_page(tmp_path, monkeypatch):
    """Text files written without an encoding are in the locale's: on Windows a code page (cp1252), which has no
    'Ā' of the byte-level vocabulary, so `finetune make-tiny-model` (and `finetune bench`'s models) raised
    UnicodeEncodeError there. pathlib asks io.text_encoding for the encoding it was not given: here cp1252."""
    import io

    from finetune.models.tokenizer import COMMON_WORDS, make_clip_tokenizer

    monkeypatch.setattr(io, "text_encoding", lambda encoding, stacklevel=2: encoding or "cp1252")
    tokenizer = make_clip_tokenizer(COMMON_WORDS, tmp_path)
    assert tokenizer.decode(tokenizer("a red circle")["input_ids"], skip_special_tokens=True) == "a red circle"


def test_a_path_on_a_drive_this_system_lacks_is_said_in_one_line(tmp_path, monkeypatch):
    """Z:/runs/lora on a Windows system without a Z: drive: no part of it exists, not even Z:/, and the search for its
    nearest existing folder (output folders, --out, train.cache_dir) ended in a StopIteration traceback. Reproduced with
    a root that reads as missing, as Z:/ does there."""
    import pytest

    from finetune.checkpoints.earlier_run import guard_earlier_run
    from finetune.cli.main import check_output_folder
    from finetune.config.recipe_loading import recipe_from_dict
    from finetune.errors import FinetuneError

    monkeypatch.setattr(Path, "exists", lambda self: not (str(self) == "/" or str(self).startswith("/nodrive")))
    with pytest.raises(FinetuneError, match=r"^/nodrive/runs/lora: / does not exist here \(a drive this system does not have\?\)"):
        check_output_folder(Path("/nodrive/runs/lora"), "--out", "the images")
    with pytest.raises(FinetuneError, match="^/nodrive/runs/lora: / does not exist here"):
        guard_earlier_run(Path("/nodrive/runs/lora"), None, overwrite=False)
    with pytest.raises(FinetuneError, match=r"key 'train.cache_dir': /nodrive/cache: / does not exist here"):
        recipe_from_dict({"model": {"pretrained": str(tmp_path)}, "train": {"max_steps": 1, "cache_dir": "/nodrive/cache"}})
