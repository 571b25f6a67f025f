"""An output folder with contents that `--overwrite` lets go (make-tiny-model, export-base, merge) keeps being the
same folder: its contents are replaced in place. Replaced by a folder renamed into its place, a mount point could not
be renamed (the failure came once everything was written), nor a folder whose parent the user cannot write, and the
folder lost its permissions and inode."""

import errno
import os
from pathlib import Path

import pytest

from finetune.cli.main import main
from finetune.outputs.atomic_files import folder_written_whole


def old_run(folder: Path) -> None:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "old.safetensors").write_text("old")
    (folder / "notes.txt").write_text("old")
    (folder / ".hidden").write_text("old")


def test_a_folder_with_contents_is_rewritten_in_place(tmp_path):
    final = tmp_path / "out"
    old_run(final)
    final.chmod(0o750)
    inode = final.stat().st_ino
    with folder_written_whole(final) as written:
        assert written.parent == final  # inside it: the same file system, and no write to its parent
        (written / "unet").mkdir()
        (written / "unet" / "new.safetensors").write_text("new")
        (written / "model_index.json").write_text("{}")
    assert final.stat().st_ino == inode and final.stat().st_mode & 0o777 == 0o750
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == ["model_index.json", "unet", "unet/new.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_stop_while_writing_leaves_the_old_contents_as_they_were(tmp_path):
    final = tmp_path / "out"
    old_run(final)
    with pytest.raises(KeyboardInterrupt), folder_written_whole(final, durable=False) as written:
        (written / "model_index.json").write_text("{}")
        raise KeyboardInterrupt
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == [".hidden", "notes.txt", "unet", "unet/old.safetensors"]


def test_a_folder_that_cannot_be_renamed_is_rewritten(tmp_path, monkeypatch):
    """As a mount point: renaming it fails (EBUSY), which root, who writes any parent, meets too."""
    final = tmp_path / "mounted"
    old_run(final)
    rename = Path.rename

    def rename_but_the_mount_point(self, target):
        if Path(self).absolute() == final.absolute():
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_but_the_mount_point)
    with folder_written_whole(final) as written:
        (written / "model_index.json").write_text("{}")
    assert sorted(os.listdir(final)) == ["model_index.json"]


def test_make_tiny_model_overwrites_a_folder_whose_parent_cannot_be_written(tmp_path):
    """Root (with CAP_DAC_OVERRIDE, as CI runs) writes a folder of mode 0o555 all the same, and this test skipped there:
    the parent's modification time, which any entry made, renamed or removed in it moves, says it was not written."""
    parent = tmp_path / "shared"
    final = parent / "model"
    old_run(final)
    inode = final.stat().st_ino
    parent.chmod(0o555)
    untouched = parent.stat().st_mtime_ns
    try:
        assert main(["make-tiny-model", str(final), "--overwrite"]) == 0
    finally:
        parent.chmod(0o755)
    assert parent.stat().st_mtime_ns == untouched
    assert final.stat().st_ino == inode and (final / "unet" / "config.json").is_file()
    assert not (final / "notes.txt").exists() and not (final / "unet" / "old.safetensors").exists()
    assert sorted(os.listdir(parent)) == ["model"]


def test_make_tiny_model_overwrite_keeps_the_folder_and_drops_the_old_files(tmp_path):
    final = tmp_path / "model"
    old_run(final)
    inode = final.stat().st_ino
    assert main(["make-tiny-model", str(final)]) == 2  # contents, and no --overwrite: refused, nothing touched
    assert (final / "notes.txt").read_text() == "old"
    assert main(["make-tiny-model", str(final), "--overwrite"]) == 0
    assert final.stat().st_ino == inode and (final / "unet" / "config.json").is_file()
    assert not (final / "notes.txt").exists() and not (final / ".hidden").exists() and not (final / "unet" / "old.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_an_output_folder_that_cannot_be_written_is_one_line_before_anything_loads(tmp_path, monkeypatch, capsys):
    """--overwrite of a folder the user cannot write (or a new one in such a folder) failed with a traceback at the first
    write, once the model had loaded (export-base, merge) or been made. Root writes any folder: os.access says what a user meets."""
    import finetune.models.tiny_model
    import finetune.outputs.pipeline_io

    final, shared, source = tmp_path / "model", tmp_path / "shared", tmp_path / "source"
    old_run(final)
    shared.mkdir()
    source.mkdir()
    (source / "model_index.json").write_text("{}")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: Path(path).absolute() not in (final, shared) and access(path, mode, *a, **k))
    monkeypatch.setattr(finetune.models.tiny_model, "make_tiny_model", lambda *a, **k: pytest.fail("the model was made"))
    monkeypatch.setattr(finetune.outputs.pipeline_io.StableDiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["make-tiny-model", str(final), "--overwrite"]) == 2
    assert main(["export-base", str(source), str(final), "--overwrite"]) == 2
    assert main(["merge", "--base", str(source), "--lora", str(source), str(shared / "merged")]) == 2
    cannot = "cannot be written to (permissions, or a read-only disk): fix its permissions, or give another folder"
    assert capsys.readouterr().err.splitlines() == [
        f"error: make-tiny-model output {final} {cannot}",
        f"error: export-base destination {final} {cannot}",
        f"error: merge output {shared / 'merged'}: the folder it goes in, {shared}, {cannot}",
    ]
    assert (final / "notes.txt").read_text() == "old" and os.listdir(shared) == []
