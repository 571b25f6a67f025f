"""A run folder of output_dir (checkpoints/, samples/, logs/) that the run cannot write, or cannot make (a file of that name
in its place), is said before the data check and the model: samples/ was found at the first grid (a warning mid-run),
logs/ by TensorBoard's writer once the model had loaded (a traceback), a file named checkpoints at the first save."""

import os

import pytest
from PIL import Image

from finetune.cli.main import main

WRITES = {"checkpoints": "saves its checkpoints", "samples": "writes its sample images", "logs": "writes its TensorBoard logs"}


def _data_the_check_refuses(tmp_path):
    """An image folder whose data check fails: its line would come first were a folder's check made after it."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")


def _read_only(monkeypatch, folder):
    """`folder` as on a read-only mount (root writes any folder whatever its mode)."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if os.path.abspath(path) == str(folder) else access(path, mode, *a, **k))


@pytest.mark.parametrize("name", ["samples", "logs"])
def test_a_samples_or_logs_folder_that_cannot_be_written_is_said_before_the_data_check(name, tmp_path, monkeypatch, capsys):
    _data_the_check_refuses(tmp_path)
    locked = tmp_path / "run" / name
    locked.mkdir(parents=True)
    _read_only(monkeypatch, locked)
    assert main(["train", "recipes/quickstart.yaml", f"data.image_dir={tmp_path}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: output_dir {tmp_path / 'run'}: {locked} cannot be written to (permissions, or a read-only disk), and the run "
                   f"{WRITES[name]} there: fix its permissions (or mount it writable), or choose another output_dir\n"), err


@pytest.mark.parametrize("name", sorted(WRITES))
def test_a_file_in_the_place_of_a_run_folder_is_said_before_the_data_check(name, tmp_path, capsys):
    _data_the_check_refuses(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_text("notes")
    assert main(["train", "recipes/quickstart.yaml", f"data.image_dir={tmp_path}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: output_dir {tmp_path / 'run'}: {tmp_path / 'run' / name} is a file, and the run {WRITES[name]} in a folder of "
                   f"that name: move the file out of {tmp_path / 'run'}, or choose another output_dir\n"), err
    assert (tmp_path / "run" / name).read_text() == "notes"


@pytest.mark.parametrize("name, off", [("samples", "validation.prompts=[]"), ("logs", "logging.tensorboard=false")])
def test_a_folder_the_run_does_not_write_is_not_refused(name, off, tmp_path, monkeypatch, capsys):
    """No grids drawn (no prompts, no loss masks), or no TensorBoard: the run never writes there, and goes on to its data check."""
    _data_the_check_refuses(tmp_path)
    locked = tmp_path / "run" / name
    locked.mkdir(parents=True)
    _read_only(monkeypatch, locked)
    assert main(["train", "recipes/quickstart.yaml", f"data.image_dir={tmp_path}", f"output_dir={tmp_path / 'run'}", off]) == 2
    err = capsys.readouterr().err
    assert str(locked) not in err and "broken.png" in err, err
