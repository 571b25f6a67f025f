"""The lock that keeps two runs out of one output_dir (`.finetune.lock`) goes with the run that held it:
it stayed behind as an empty file in every finished run's folder. Removing it must not let a run that
opened the file just before it went in as well (its lock would be on a file nobody else can find)."""

import pytest

import finetune.run_lock as run_lock
from finetune.errors import FinetuneError
from finetune.run_lock import LOCK_FILE, output_dir_lock


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
