"""Kill points of a run's saves, each found by a soak that killed tiny runs at random file operations (SIGKILL, Ctrl-C,
two Ctrl-Cs) and resumed them with --resume latest: here each is put at its point by a monkeypatch, not a timer."""

import json
from pathlib import Path

import pytest

import finetune.checkpoints.checkpoint as checkpoint
import finetune.checkpoints.resume_checks as resume_checks
from finetune.checkpoints.run_files import STATE_FILE, resolve_resume
from finetune.errors import FinetuneError
import finetune.training.trainer as trainer


def test_a_finished_runs_last_checkpoint_a_stop_left_before_its_rename_is_put_back_and_named(make_recipe, monkeypatch, capsys):
    """The last checkpoint is saved after the outputs: a second Ctrl-C (or a kill) while it was renamed into place left it whole
    as `.partial-checkpoint-3`. A resume puts such a folder back once it has loaded it, but this run had nothing left to train:
    `--resume latest` named the hidden folder, which then stayed for good (a whole checkpoint's size)."""
    replace_folder = checkpoint.replace_folder

    def stopped_at_the_last(new, final):
        if final.name == "checkpoint-3":
            raise KeyboardInterrupt  # the second Ctrl-C: trainer_state.json is written, the folder not renamed
        return replace_folder(new, final)

    monkeypatch.setattr(checkpoint, "replace_folder", stopped_at_the_last)
    recipe = make_recipe(train__max_steps=3, checkpoint__every_n_steps=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(recipe)
    monkeypatch.undo()
    checkpoints = Path(recipe.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".partial-checkpoint-3", "checkpoint-2"]
    capsys.readouterr()

    with pytest.raises(FinetuneError) as refused:
        trainer.train(make_recipe(train__max_steps=3, checkpoint__every_n_steps=2), resume="latest")
    assert str(refused.value).startswith(f"{checkpoints / 'checkpoint-3'} is at step 3 and train.max_steps is 3: nothing left to train")
    assert f"put back {checkpoints / 'checkpoint-3'}: a kill after it was saved" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((checkpoints / "checkpoint-3" / STATE_FILE).read_text())["step"] == 3


@pytest.mark.parametrize("rank,output_dir", [("1", "run"), ("0", "another-run")], ids=["another-process", "a-checkpoint-of-another-folder"])
def test_only_the_main_process_puts_back_the_checkpoint_of_its_own_run(tmp_path, monkeypatch, rank, output_dir):
    """Every process checks the checkpoint it would resume: the others name it as the main one does, and move nothing. Nor
    does the main one in a folder of checkpoints that is not its run's (`--resume` of one copied out of another run)."""
    checkpoints = tmp_path / "run" / "checkpoints"
    for name, step in (("checkpoint-2", 2), (".partial-checkpoint-3", 3)):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / STATE_FILE).write_text(json.dumps({"step": step}))
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(FinetuneError, match=f"^{checkpoints / 'checkpoint-3'} is at step 3"):
        resume_checks.check_resumable(resolve_resume("latest", checkpoints), 3, {"output_dir": str(tmp_path / output_dir)})
    assert sorted(p.name for p in checkpoints.iterdir()) == [".partial-checkpoint-3", "checkpoint-2"]


def test_a_finished_runs_rotation_a_kill_cut_short_is_finished_by_the_resume_that_finds_nothing_left(tmp_path, monkeypatch):
    """The last save renames the checkpoint it rotates out `.removed-checkpoint-2`, then deletes it: a kill (or a second Ctrl-C)
    midway left it, which the next save deletes; a finished run has no next save, and it stayed for good."""
    checkpoints = tmp_path / "checkpoints"
    for name, step in (("checkpoint-3", 3), (".removed-checkpoint-2", 2)):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / STATE_FILE).write_text(json.dumps({"step": step}))
    (checkpoints / ".removed-checkpoint-2" / "optimizer.bin").write_bytes(b"half deleted")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(FinetuneError, match=f"^{checkpoints / 'checkpoint-3'} is at step 3 and train.max_steps is 3: nothing left"):
        resume_checks.check_resumable(resolve_resume("latest", checkpoints), 3, {"output_dir": str(tmp_path)})
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-3"]


def test_a_finished_runs_rotation_a_kill_came_before_is_done_as_its_run_said(make_recipe, monkeypatch, capsys):
    """Killed (here: a second Ctrl-C) after the last checkpoint's rename, before its rotation: checkpoint.keep_last 2 kept 3
    checkpoints for good. The resume that finds nothing left rotates them as the run's recipe said, not as its own says (a
    keep_last of 1 there deletes no more)."""
    def stopped(old):  # first called by the last save (checkpoint-3), once that is in place
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "remove_checkpoint", stopped)
    recipe = make_recipe(train__max_steps=3, checkpoint__every_n_steps=1, checkpoint__keep_last=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(recipe)
    monkeypatch.undo()
    checkpoints = Path(recipe.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    capsys.readouterr()

    with pytest.raises(FinetuneError, match="nothing left to train"):
        trainer.train(make_recipe(train__max_steps=3, checkpoint__every_n_steps=1, checkpoint__keep_last=1), resume="latest")
    assert f"removed {checkpoints / 'checkpoint-1'}: the run's last save, cut short by a kill, had not yet rotated it out" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_an_older_checkpoint_with_nothing_left_under_a_lower_max_steps_rotates_nothing(tmp_path, monkeypatch):
    """Not the run's last checkpoint: the run goes on from a later one, which a rotation here would delete."""
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / STATE_FILE).write_text(json.dumps({"step": step, "recipe": {"checkpoint.keep_last": 1}}))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(FinetuneError, match="is at step 2 and train.max_steps is 2: nothing left"):
        resume_checks.check_resumable(checkpoints / "checkpoint-2", 2, {"output_dir": str(tmp_path)})
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_finished_epoch_runs_last_checkpoint_a_stop_left_before_its_rename_is_put_back_and_named(make_recipe, monkeypatch, capsys):
    """As for train.max_steps, for a run whose length is train.max_epochs (its 'nothing left to train' is said once the data
    is read, `run_length.check_epoch_run`): it named the hidden `.partial-checkpoint-4`, which then stayed for good."""
    replace_folder = checkpoint.replace_folder

    def stopped_at_the_last(new, final):
        if final.name == "checkpoint-4":
            raise KeyboardInterrupt  # the second Ctrl-C: trainer_state.json is written, the folder not renamed
        return replace_folder(new, final)

    def epoch_recipe():  # 4 images in batches of 2: 2 steps an epoch, 4 in all
        return make_recipe(train__max_steps=None, train__max_epochs=2, checkpoint__every_n_steps=2)

    monkeypatch.setattr(checkpoint, "replace_folder", stopped_at_the_last)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(epoch_recipe())
    monkeypatch.undo()
    checkpoints = Path(epoch_recipe().output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".partial-checkpoint-4", "checkpoint-2"]
    capsys.readouterr()

    with pytest.raises(FinetuneError) as refused:
        trainer.train(epoch_recipe(), resume="latest")
    assert str(refused.value).startswith(f"{checkpoints / 'checkpoint-4'} is at step 4 and train.max_epochs 2 ends at step 4: nothing left to train")
    assert f"put back {checkpoints / 'checkpoint-4'}: a kill after it was saved" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
