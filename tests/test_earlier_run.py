"""--overwrite clears the earlier run in output_dir, or says what stayed: a file it could not remove was left silently
(shutil.rmtree ignored the error), and its checkpoints then mixed with the new run's (`--resume latest` picked a stale one)."""

import errno
import os
import re

import pytest

from finetune.checkpoints.run_files import list_checkpoints, read_state
from finetune.errors import FinetuneError
from finetune.training.trainer import train
import finetune.training.trainer as trainer_module


def test_a_file_of_the_earlier_run_that_cannot_be_removed_stops_the_run_before_it_trains(make_recipe, monkeypatch):
    earlier = train(make_recipe(train__max_steps=2, checkpoint__every_n_steps=1))
    unlink = os.unlink

    def unlink_but_busy_files(path, *args, **kwargs):  # files a network disk holds open (NFS' .nfsXXXX): root meets them too
        if os.path.basename(path) == "trainer_state.json":
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink_but_busy_files)
    with pytest.raises(FinetuneError) as stopped:
        train(make_recipe(train__max_steps=2, optimizer__lr=5e-4), overwrite=True, on_step=lambda step: pytest.fail("training started"))
    assert re.fullmatch(rf"--overwrite: could not remove {earlier.output_dir / 'checkpoints' / 'checkpoint-1' / 'trainer_state.json'} of the earlier run \(Device or resource busy\): remove "
                        r"it yourself \(or free the file: another program may hold it open\), then run again; "
                        r"left there, its checkpoints would mix with this run's", str(stopped.value)), str(stopped.value)
    assert [p.name for p in list_checkpoints(earlier.output_dir / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]  # the earlier run's, stale


def test_a_folder_of_the_earlier_run_that_cannot_be_written_is_said_before_the_model_loads(make_recipe, monkeypatch):
    earlier = train(make_recipe(train__max_steps=2, checkpoint__every_n_steps=2))
    locked = list_checkpoints(earlier.output_dir / "checkpoints")[-1]
    access = os.access
    # As a folder of another user's (or on a read-only disk); root writes any folder whatever its mode.
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if os.path.abspath(path) == str(locked) else access(path, mode, *a, **k))
    monkeypatch.setattr(trainer_module, "load_base_model", lambda *a, **k: pytest.fail("the base model loaded"))
    with pytest.raises(FinetuneError, match=rf"^--overwrite: {re.escape(str(locked))} cannot be written to \(permissions, or a read-only disk\), so the "
                                            rf"earlier run's files in it cannot be removed: fix its permissions or remove them from {re.escape(str(locked.parent))} yourself"):
        train(make_recipe(train__max_steps=2, optimizer__lr=5e-4), overwrite=True)
    assert list_checkpoints(earlier.output_dir / "checkpoints") == [locked]


def test_overwrite_clears_what_a_linked_run_folder_points_to_and_keeps_the_link(make_recipe, tmp_path):
    # A user who put checkpoints on another disk: rmtree refused the link ("Cannot call rmtree on a symbolic link").
    other_disk = tmp_path / "other-disk" / "checkpoints"
    other_disk.mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(other_disk, target_is_directory=True)
    earlier = train(make_recipe(train__max_steps=2, checkpoint__every_n_steps=1))
    assert [p.name for p in list_checkpoints(other_disk)] == ["checkpoint-1", "checkpoint-2"]
    train(make_recipe(train__max_steps=1, checkpoint__every_n_steps=1, optimizer__lr=5e-4), overwrite=True)
    assert (earlier.output_dir / "checkpoints").is_symlink()
    assert [p.name for p in other_disk.iterdir()] == ["checkpoint-1"]  # the new run's, where the link sends it
    assert read_state(other_disk / "checkpoint-1")["recipe"]["optimizer.lr"] == 5e-4


@pytest.mark.parametrize("name", ["checkpoints", "samples", "logs"])
def test_a_run_folder_that_links_to_nothing_is_said_before_the_model_loads(make_recipe, tmp_path, monkeypatch, name):
    # Checkpoints put on another disk that is not mounted now: the first save failed with a FileExistsError traceback.
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / name
    link.symlink_to(tmp_path / "unmounted" / name, target_is_directory=True)
    monkeypatch.setattr(trainer_module, "load_base_model", lambda *a, **k: pytest.fail("the base model loaded"))
    with pytest.raises(FinetuneError) as stopped:
        train(make_recipe(train__max_steps=1, checkpoint__every_n_steps=1))
    assert str(stopped.value) == (f"output_dir {tmp_path / 'run'}: {link} is a link to {tmp_path / 'unmounted' / name}, which does not exist "
                                  f"(a disk not mounted?): mount or make that folder, or remove the link")
    assert link.is_symlink()


def test_a_checkpoints_folder_that_cannot_be_written_is_said_before_the_data_check(tmp_path, monkeypatch, capsys):
    """output_dir writable, its checkpoints/ not (a read-only mount, another user's): the run loaded the model and trained to
    its first save, which failed ("could not write checkpoint ... Read-only file system")."""
    from PIL import Image

    from finetune.cli.main import main

    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")  # the data check refuses it: its line would come first
    locked = tmp_path / "run" / "checkpoints"
    locked.mkdir(parents=True)
    access = os.access  # as for a read-only mount (root writes any folder whatever its mode)
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if os.path.abspath(path) == str(locked) else access(path, mode, *a, **k))
    assert main(["train", "recipes/quickstart.yaml", f"data.image_dir={tmp_path}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output_dir {tmp_path / 'run'}: {locked} cannot be written to (permissions, or a read-only disk), and the run saves "
                          f"its checkpoints there: fix its permissions (or mount it writable), or choose another output_dir\n"), err
