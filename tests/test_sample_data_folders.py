"""make-world-data and make-sample-data before and around what they write: a folder that cannot be written is one line
before any image is drawn, and a killed earlier run's partial files do not stay beside the sets."""

import os
from pathlib import Path

import pytest

from finetune.cli.main import main
import finetune.toyworld.sample_data as sample_data


def test_make_world_data_refuses_a_folder_it_cannot_write_before_drawing_an_image(tmp_path, monkeypatch, capsys):
    """It drew the images and failed with a PermissionError traceback at the first write. Root writes any folder: os.access
    says what a user meets (a folder of another user's, a read-only disk)."""
    locked, shared = tmp_path / "locked", tmp_path / "shared"
    locked.mkdir()
    shared.mkdir()
    (tmp_path / "a-file").write_text("")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: Path(path).absolute() not in (locked, shared) and access(path, mode, *a, **k))
    monkeypatch.setattr(sample_data, "write_folder", lambda *a, **k: pytest.fail("images were drawn"))
    for folder in (locked, shared / "world", tmp_path / "a-file" / "world"):
        assert main(["make-world-data", str(folder), "--num-images", "2"]) == 2
    cannot = "cannot be written to (permissions, or a read-only disk): fix its permissions, or give another folder"
    assert capsys.readouterr().err.splitlines() == [
        f"error: make-world-data output {locked} {cannot}",
        f"error: make-world-data output {shared / 'world'}: the folder it goes in, {shared}, {cannot}",
        f"error: {tmp_path / 'a-file' / 'world'} is inside a file ({tmp_path / 'a-file'}): give a new or empty folder to write the images in",
    ]
    assert os.listdir(locked) == [] and os.listdir(shared) == []


def test_make_sample_data_removes_the_copies_a_killed_run_left_beside_the_sets(tmp_path):
    """An earlier make-sample-data killed midway (SIGKILL) left .star.partial (a set being written) or .striped.old (the set it
    replaced, renamed aside); beside a set folder that already existed, no later run removed them."""
    sample_data.make_sample_data(tmp_path)
    for stale in (".star.partial", ".striped.partial", ".striped.old"):
        sample_data.write_folder(tmp_path / stale, 2, 1001, include_held_out="only_style")
    (tmp_path / "notes.txt").write_text("mine")
    sample_data.make_sample_data(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "star", "striped"]
