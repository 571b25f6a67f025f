"""An empty output folder a user made (or `.` in a new one) is filled in place, not replaced by a folder renamed into its
place: `.` was refused or a traceback, and a shell working in a replaced folder was left in a deleted one (a mount point
could not be renamed at all)."""

import os
from pathlib import Path

import pytest

from finetune.cli.main import main
from finetune.outputs.atomic_files import folder_written_whole


def test_make_tiny_model_and_export_base_fill_an_empty_folder_in_place(tmp_path, monkeypatch, tiny_model):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["make-tiny-model", "."]) == 0  # was 'the current folder or one above it, which writing the pipeline would replace'
    assert (here / "model_index.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    for command in (["make-tiny-model"], ["export-base", str(tiny_model)]):
        empty = tmp_path / f"empty-{command[0]}"
        empty.mkdir()
        inode = empty.stat().st_ino
        assert main([*command, str(empty)]) == 0
        assert empty.stat().st_ino == inode and (empty / "unet" / "config.json").is_file()
    assert main(["make-tiny-model", ".", "--overwrite"]) == 2  # a folder with contents, the shell in it, is still never replaced


def test_an_empty_folder_stopped_while_filled_is_left_empty_and_in_place(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    with pytest.raises(KeyboardInterrupt), folder_written_whole(empty) as written:
        (written / "unet").mkdir()
        (written / "model_index.json").write_text("{}")
        raise KeyboardInterrupt
    assert empty.stat().st_ino == inode and list(empty.iterdir()) == []
    with pytest.raises(KeyboardInterrupt), folder_written_whole(tmp_path / "new") as written:  # a new folder: written beside it
        assert written == tmp_path / ".new.partial"
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["empty"]
    with folder_written_whole(tmp_path / "new") as written:
        (written / "a").write_text("a")
    assert (tmp_path / "new" / "a").read_text() == "a" and sorted(os.listdir(tmp_path)) == ["empty", "new"]
    assert isinstance(written, Path)
