"""The lock that keeps two runs out of one output_dir (`.finetune.lock`) goes with the run that held it:
it stayed behind as an empty file in every finished run's folder. Removing it must not let a run that
opened the file just before it went in as well (its lock would be on a file nobody else can find)."""

import pytest

from finetune.checkpoints.run_lock import LOCK_FILE, output_dir_lock
import finetune.checkpoints.run_lock as run_lock
from finetune.errors import FinetuneError


def test_the_lock_file_goes_when_the_run_ends(tmp_path):
    with output_dir_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RuntimeError), output_dir_lock(tmp_path):  # a run that fails
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_opened_the_lock_file_as_the_last_run_removed_it_takes_a_new_one(tmp_path, monkeypatch):
    with output_dir_lock(tmp_path):
        opened_before = open(tmp_path / LOCK_FILE, "a+")  # by a second run, as the first one ends
    real_open = open
    calls = []

    def opening(path, mode):  # the second run's first open is that one, the file since removed
        calls.append(path)
        return opened_before if len(calls) == 1 else real_open(path, mode)

    monkeypatch.setattr(run_lock, "open", opening, raising=False)
    with output_dir_lock(tmp_path):
        assert len(calls) == 2 and (tmp_path / LOCK_FILE).is_file()
        monkeypatch.undo()
        with pytest.raises(FinetuneError, match="is in use by another run"):  # a third run finds the file locked
            with output_dir_lock(tmp_path):
                pass


def test_a_run_that_fails_leaves_no_folder_its_lock_made_and_keeps_what_was_there(tmp_path):
    """A run that failed its checks (the lock is taken first) left its new output_dir behind, empty: each failed try made
    another. Now the folders the lock made go where they are still empty; a folder that was there, or one a file was
    written in, stays with the file."""
    new = tmp_path / "outputs" / "run"
    with pytest.raises(FinetuneError), output_dir_lock(new):
        assert (new / LOCK_FILE).is_file()
        raise FinetuneError("image a.png cannot be read")
    assert list(tmp_path.iterdir()) == []  # outputs/ too, which making the run's folder made
    with pytest.raises(KeyboardInterrupt), output_dir_lock(new):  # a stop during the checks
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(FinetuneError), output_dir_lock(new):
        (new / "logs").mkdir()
        (new / "logs" / "notes.txt").write_text("the user's")
        raise FinetuneError("out of memory")
    assert (new / "logs" / "notes.txt").read_text() == "the user's" and not (new / LOCK_FILE).exists()

    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(FinetuneError), output_dir_lock(existing):
        raise FinetuneError("a bad image")
    assert existing.is_dir()  # not the lock's to remove
    with output_dir_lock(tmp_path / "finished"):  # a run that ends well keeps its folder, whatever is in it
        pass
    assert (tmp_path / "finished").is_dir()


def test_finetune_train_that_fails_its_data_check_leaves_no_new_output_dir(tiny_model, tmp_path, capsys):
    """The run lock is taken before the data check: `finetune train` with a new output_dir and data that cannot train
    left that folder behind."""
    import yaml

    from conftest import build_recipe
    from finetune.cli.main import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        (photos / name).write_bytes(b"not a PNG")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(build_recipe(tiny_model, photos, tmp_path / "outputs" / "run").model_dump(mode="json")))
    assert main(["train", str(recipe)]) == 2
    assert "a.png" in capsys.readouterr().err  # failed in the data check, after the lock
    assert not (tmp_path / "outputs").exists()


def test_a_run_whose_folder_a_failed_run_removes_before_it_opens_the_lock_file_makes_it_again(tmp_path, monkeypatch):
    """A failed run removes the empty output_dir its lock made (7432d37). A second run that made the folder (its mkdir found
    it there) and opened the lock file just after that removal met FileNotFoundError, which output_dir_lock takes for a
    folder that cannot be made: the second run went on without a lock."""
    output_dir = tmp_path / "run"
    real_open, calls = open, []

    def opening(path, mode):  # the failed run's removal comes between the second run's mkdir and its open
        calls.append(path)
        if len(calls) == 1:
            output_dir.rmdir()
        return real_open(path, mode)

    monkeypatch.setattr(run_lock, "open", opening, raising=False)
    with output_dir_lock(output_dir):
        assert len(calls) == 2 and (output_dir / LOCK_FILE).is_file()  # made again, and locked
        monkeypatch.undo()
        with pytest.raises(FinetuneError, match="is in use by another run"):
            with output_dir_lock(output_dir):
                pass


def test_a_failed_run_removes_its_folder_that_another_failed_run_made_and_removed_as_it_started(tmp_path, monkeypatch):
    """Two runs started in one split second: the first made the output_dir, so the second found it there and counted it as
    none of its own; the first failed and removed it, the second made it again and, failing too, left it behind."""
    output_dir = tmp_path / "new" / "run"
    output_dir.mkdir(parents=True)  # made by the first run
    real_open, calls = open, []

    def opening(path, mode):  # the first run fails as the second opens the lock file, and removes the empty folders it made
        calls.append(path)
        if len(calls) == 1:
            output_dir.rmdir()
            output_dir.parent.rmdir()
        return real_open(path, mode)

    monkeypatch.setattr(run_lock, "open", opening, raising=False)
    with pytest.raises(RuntimeError), output_dir_lock(output_dir):  # the second run: a bad image
        assert len(calls) == 2 and (output_dir / LOCK_FILE).is_file()  # made again, and locked
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
