"""A checkpoint a kill left under another name, between the two renames that replace it (atomic_files.replace_folder): the
old folder aside as `.checkpoint-N.old`, the new one still `.partial-checkpoint-N`, no `checkpoint-N`. --resume latest took an
older checkpoint, and its first save deleted the `.partial-` folder. Every process of a run now picks the newest whole folder
where it lies (nothing moves before the processes join), and once they have loaded it the main process puts it back."""

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.checkpoints.earlier_run import put_back_interrupted_checkpoints
import finetune.checkpoints.earlier_run as earlier_run
from finetune.checkpoints.run_files import STATE_FILE
from finetune.cli.main import main
from finetune.config.recipe_loading import load_recipe
from finetune.errors import FinetuneError
import finetune.training.trainer as trainer
from ranks import run_ranks


def killed_between_the_renames(checkpoints: Path, new_complete: bool) -> None:
    """The folders a kill between replace_folder's renames leaves of checkpoint-4 (an older checkpoint-2 beside them)."""
    for name, version in (("checkpoint-2", "step 2"), (".checkpoint-4.old", "old"), (".partial-checkpoint-4", "new")):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "trainable_0.safetensors").write_text(version)
        if name != ".partial-checkpoint-4" or new_complete:  # trainer_state.json is written last: a partial without it is unfinished
            (checkpoints / name / STATE_FILE).write_text('{"step": %s}' % name.split("-")[-1].removesuffix(".old"))


def contents(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): path.read_text() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("new_complete", [True, False])
def test_every_process_picks_the_newest_whole_folder_whichever_lists_the_checkpoints_first(tmp_path, monkeypatch, new_complete):
    """Process 1 lists the checkpoints before process 0 has started (`finetune train`, and train() for its other callers).
    Before, process 0 alone put checkpoint-4 back as it started: process 1, listing before, took checkpoint-2, and the run
    stopped with "the processes would start at different steps" (or, listing after, checkpoint-4)."""
    picked = []

    def stop_at_the_guard(output_dir, resume_from, overwrite):
        picked.append(resume_from)
        raise FinetuneError("stopped before training")

    monkeypatch.setattr(earlier_run, "guard_earlier_run", stop_at_the_guard)  # `finetune train` imports it as it runs
    monkeypatch.setattr(trainer, "resumed_method", lambda recipe, resume_from: stop_at_the_guard(None, resume_from, False))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the quickstart recipe's data and base, without training
    for caller in ("finetune train", "train()"):
        checkpoints = tmp_path / caller / "checkpoints"
        killed_between_the_renames(checkpoints, new_complete)
        before = contents(checkpoints)
        for rank in ("1", "0"):
            monkeypatch.setenv("RANK", rank)
            if caller == "finetune train":
                assert main(["train", "recipes/quickstart.yaml", f"output_dir={checkpoints.parent}", "--resume", "latest"]) == 2
            else:
                with pytest.raises(FinetuneError, match="stopped before training"):
                    trainer.train(load_recipe("recipes/quickstart.yaml", [f"output_dir={checkpoints.parent}"]), resume="latest")
        whole = checkpoints / (".partial-checkpoint-4" if new_complete else ".checkpoint-4.old")
        assert picked == [whole, whole], caller
        assert contents(checkpoints) == before, caller
        picked.clear()


def test_a_resume_names_a_checkpoint_a_kill_left_by_its_own_name_and_a_fresh_run_counts_it(tmp_path):
    from finetune.checkpoints.earlier_run import guard_earlier_run
    from finetune.checkpoints.run_files import resolve_resume

    checkpoints = tmp_path / "checkpoints"
    killed_between_the_renames(checkpoints, new_complete=True)
    assert resolve_resume(str(checkpoints / "checkpoint-4"), checkpoints) == checkpoints / ".partial-checkpoint-4"
    with pytest.raises(FinetuneError, match=r"also holds later checkpoints of the steps it would train again \(\.partial-checkpoint-4\)"):
        guard_earlier_run(tmp_path, checkpoints / "checkpoint-2", overwrite=False)
    with pytest.raises(FinetuneError, match=r"holds an earlier run \(\.partial-checkpoint-4\): continue it with --resume latest"):
        guard_earlier_run(tmp_path, None, overwrite=False)


def put_back_on_each(checkpoints: Path, resumed: Path, folder: Path):
    """What each process of a run does once it has read `resumed`: what it then finds as checkpoint-4 and its lines, in
    `folder`/said-RANK.json."""

    def put_back(accelerator):
        if os.environ["RANK"] == "1":  # the slower to load: it reads its last file as the main process waits to put the folder back
            time.sleep(0.5)
            (resumed / "trainable_0.safetensors").read_text()
        with contextlib.redirect_stdout(io.StringIO()) as said:
            put_back_interrupted_checkpoints(accelerator, checkpoints)
        found = (checkpoints / "checkpoint-4" / "trainable_0.safetensors").read_text()  # as this process finds it then
        (folder / f"said-{os.environ['RANK']}.json").write_text(json.dumps([found, said.getvalue()]))

    return put_back


@pytest.mark.parametrize("new_complete", [True, False])
def test_once_the_processes_have_loaded_it_the_main_one_puts_it_back_and_every_process_resumes_it_there(tmp_path, new_complete):
    checkpoints = tmp_path / "checkpoints"
    killed_between_the_renames(checkpoints, new_complete)
    whole = checkpoints / (".partial-checkpoint-4" if new_complete else ".checkpoint-4.old")
    assert run_ranks(put_back_on_each(checkpoints, whole, tmp_path), tmp_path) == ["done", "done"]
    said = [json.loads((tmp_path / f"said-{rank}.json").read_text()) for rank in (0, 1)]
    assert [found for found, _ in said] == ["new" if new_complete else "old"] * 2
    lines = {
        True: f"put back {checkpoints / 'checkpoint-4'}: a kill while it was saved left it as .partial-checkpoint-4 (the folder it replaced, .checkpoint-4.old, is removed)\n",
        False: f"put back {checkpoints / 'checkpoint-4'}: a kill while it was replaced left it as .checkpoint-4.old (its replacement, unfinished, is removed)\n",
    }  # fmt: skip
    assert [lines for _, lines in said] == [lines[new_complete], ""]  # said once, by the main process
    # The old folder of a step put back new is removed, and so is an unfinished partial (it was the next save's to remove, unsaid).
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_a_put_back_that_fails_on_the_main_process_stops_every_process_with_its_line(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    killed_between_the_renames(checkpoints, new_complete=True)

    def refused(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", refused)  # (in the forked processes; only the main one renames)
    said = run_ranks(put_back_on_each(checkpoints, checkpoints / ".partial-checkpoint-4", tmp_path), tmp_path)
    assert said[0] == said[1] == (f"FinetuneError: could not put back {checkpoints / 'checkpoint-4'} from the folders a killed save left (Permission "
                                  f"denied): fix the permissions of {checkpoints}, or rename .partial-checkpoint-4 there to checkpoint-4 yourself"), said  # fmt: skip


def test_the_old_folder_a_kill_left_after_both_renames_is_removed(tmp_path):
    """Killed after the renames but before the old folder was deleted: nothing replaces that name again to remove it."""
    for name in ("checkpoint-4", ".checkpoint-4.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text('{"step": 4}')
    put_back_interrupted_checkpoints(SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]


@pytest.mark.parametrize("replacing", [True, False])
def test_a_run_resumes_from_a_checkpoint_a_kill_left_unrenamed_and_keeps_it(make_recipe, capsys, replacing):
    """Loaded from where the kill left it, then put back before the first save (which deleted a `.partial-` folder)."""
    recipe = make_recipe(train__max_steps=2, checkpoint__every_n_steps=1, checkpoint__keep_last=2)
    checkpoints = trainer.train(recipe).output_dir / "checkpoints"
    (checkpoints / "checkpoint-2").rename(checkpoints / ".partial-checkpoint-2")  # killed before (or between) the renames of its save
    if replacing:
        (checkpoints / "checkpoint-1").rename(checkpoints / ".checkpoint-2.old")  # (a whole folder aside: what it replaced)
    capsys.readouterr()
    result = trainer.train(make_recipe(train__max_steps=3, checkpoint__every_n_steps=1, checkpoint__keep_last=2), resume="latest")
    said = capsys.readouterr().out
    assert f"put back {checkpoints / 'checkpoint-2'}: a kill " in said and "left it as .partial-checkpoint-2" in said
    assert f"resumed from {checkpoints / '.partial-checkpoint-2'} at step 2" in said and result.final_step == 3
    assert said.index("resumed from") < said.index("put back")  # once the run has read it
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # kept by the next save's rotation


def test_a_complete_checkpoint_a_kill_left_before_its_rename_is_resumed_and_put_back(tmp_path):
    """The first save of step 4, killed after it had written the folder and before renaming it: its next save deleted the
    `.partial-` folder. Complete, it holds trainer_state.json, which a save writes last, once the other files are on the disk."""
    from finetune.checkpoints.run_files import resolve_resume

    checkpoints = tmp_path / "checkpoints"
    killed_between_the_renames(checkpoints, new_complete=True)
    shutil.rmtree(checkpoints / ".checkpoint-4.old")  # step 4 saved for the first time: nothing set aside
    for name, state in ((".partial-checkpoint-5", None), (".partial-checkpoint-6", '{"step": 6, "reci')):  # unfinished; cut short by a kill
        (checkpoints / name).mkdir()
        if state is not None:
            (checkpoints / name / STATE_FILE).write_text(state)
    assert resolve_resume("latest", checkpoints) == checkpoints / ".partial-checkpoint-4"
    with contextlib.redirect_stdout(io.StringIO()) as said:
        put_back_interrupted_checkpoints(SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None), checkpoints)
    resumed = checkpoints / "checkpoint-4"
    assert (resumed / "trainable_0.safetensors").read_text() == "new"
    unfinished = [f"removed {checkpoints / f'.partial-checkpoint-{step}'}: the save of checkpoint-{step}, cut short by a kill or a crash "
                  f"(no {STATE_FILE}: unfinished), which no resume can take\n" for step in (5, 6)]
    assert said.getvalue() == "".join([f"put back {resumed}: a kill after it was saved, before it was renamed into place, left it as .partial-checkpoint-4\n", *unfinished])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_an_old_folder_left_alone_is_put_back_without_a_word_of_a_replacement(tmp_path):
    """The `.partial-` folder of its replacement gone (deleted by a save of an older finetune), only the old one is left."""
    checkpoints = tmp_path / "checkpoints"
    killed_between_the_renames(checkpoints, new_complete=False)
    shutil.rmtree(checkpoints / ".partial-checkpoint-4")
    with contextlib.redirect_stdout(io.StringIO()) as said:
        put_back_interrupted_checkpoints(SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None), checkpoints)
    assert said.getvalue() == f"put back {checkpoints / 'checkpoint-4'}: a kill while it was replaced left it as .checkpoint-4.old\n"


def test_check_data_shows_the_held_out_images_of_the_checkpoint_resume_latest_takes(tmp_path):
    from finetune.training.held_out import HELD_OUT_STATE, held_out_for_check

    items = [SimpleNamespace(digest=f"pixels {i}", source=f"{i}.png") for i in range(6)]
    (tmp_path / "checkpoints" / ".partial-checkpoint-4").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".partial-checkpoint-4" / STATE_FILE).write_text(json.dumps({"step": 4, HELD_OUT_STATE: ["pixels 0", "pixels 5"]}))
    split, note = held_out_for_check(items, 2, 3, tmp_path)
    assert split.scored == [0, 5] and note.startswith(" as --resume latest holds them out (.partial-checkpoint-4; a new run"), (split, note)


def test_a_finished_runs_saves_are_finished_once_every_process_has_read_its_checkpoint_and_named_alike(tmp_path):
    """`finish_a_finished_runs_saves` ran on every process with no barrier ("nothing left to train", in the joined run): the
    main process put the checkpoint back (and rotated) while another still read it where it lay, which then failed on the
    folder gone; and a process that listed the folder after the rename named the `.partial-` folder in its error line, which
    then differed from the main one's and was said too. Now the main process waits for the others, and each names it alike."""
    from finetune.checkpoints.earlier_run import finish_a_finished_runs_saves
    from finetune.checkpoints.run_files import read_state

    checkpoints = tmp_path / "run" / "checkpoints"
    for name in ("checkpoint-2", ".partial-checkpoint-4"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / STATE_FILE).write_text(json.dumps({"step": int(name[-1]), "recipe": {"checkpoint.keep_last": 1}}))
    partial = checkpoints / ".partial-checkpoint-4"

    def name_it(accelerator):
        if os.environ["RANK"] == "1":  # the slower process: it reads the checkpoint (its data order) as the main one finishes
            time.sleep(0.5)
            read_state(partial)
        with contextlib.redirect_stdout(io.StringIO()):
            (tmp_path / f"named-{os.environ['RANK']}.txt").write_text(str(finish_a_finished_runs_saves(partial, tmp_path / "run")))

    assert run_ranks(name_it, tmp_path) == ["done", "done"]
    assert [(tmp_path / f"named-{rank}.txt").read_text() for rank in (0, 1)] == [str(checkpoints / "checkpoint-4")] * 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]  # put back once, and rotated (keep_last 1)


def test_two_processes_resuming_a_finished_run_say_nothing_is_left_once_joined_with_its_saves_finished(make_recipe, tmp_path, monkeypatch):
    """`--resume latest` of a finished run whose last checkpoint a kill left before its rename, in a launch of 2 processes: the
    main process put it back as it checked ("nothing left to train"), before the processes joined, while the other, slower
    (its data check), had picked `.partial-checkpoint-4` and then read it: "checkpoint .partial-checkpoint-4 is damaged ... move it
    out". With several processes that check now waits until they have joined, and its saves are finished there."""
    recipe = make_recipe(checkpoint__every_n_steps=2, checkpoint__keep_last=1)
    trainer.train(recipe)  # (4 steps)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "checkpoint-4").rename(checkpoints / ".partial-checkpoint-4")  # killed before its rename
    shutil.copytree(checkpoints / ".partial-checkpoint-4", checkpoints / "checkpoint-2")  # and before its rotation
    (checkpoints / "checkpoint-2" / STATE_FILE).write_text(json.dumps({**json.loads((checkpoints / "checkpoint-2" / STATE_FILE).read_text()), "step": 2}))
    real_check = trainer.check_base_and_data

    def slower_on_rank_1(*args):
        if os.environ["RANK"] == "1":
            time.sleep(1)  # its data check takes longer
        return real_check(*args)

    monkeypatch.setattr(trainer, "check_base_and_data", slower_on_rank_1)
    def launched(accelerator):  # the processes not yet joined as train() starts, as `accelerate launch` starts them
        from accelerate.state import PartialState

        torch.distributed.destroy_process_group()
        PartialState._reset_state()
        trainer.train(recipe, resume="latest")

    said = run_ranks(launched, tmp_path, timeout=120)
    assert said == [f"FinetuneError: {checkpoints / 'checkpoint-4'} is at step 4 and train.max_steps is 4: nothing left to train; "
                    f"raise train.max_steps to continue (e.g. train.max_steps=6)"] * 2, said  # fmt: skip
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]  # put back, and checkpoint-2 rotated out (keep_last 1)


KILLED_WHILE_SAVING = r"""
import os, signal, sys
import finetune.checkpoints.checkpoint as ckpt
real = ckpt.save_file

def half_then_killed(tensors, path, *args, **kwargs):  # SIGKILL with checkpoint-4's first file half written
    if ".partial-checkpoint-4" in path:
        with open(path, "wb") as file:
            file.write(b"\0" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, *args, **kwargs)

ckpt.save_file = half_then_killed
from finetune.cli.main import main
sys.exit(main(["train", sys.argv[1]]))
"""


def test_a_run_killed_while_it_saves_resumes_from_the_last_whole_checkpoint_and_says_the_unfinished_one_is_removed(make_recipe, tmp_path, capsys):
    """--resume latest took checkpoint-2 and said only that: the kill's `.partial-checkpoint-4` went at the next save, unsaid."""
    import subprocess
    import sys

    import yaml

    run = tmp_path / "run"
    recipe = make_recipe(output_dir=str(run), train__max_steps=6, checkpoint__every_n_steps=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(tmp_path / "recipe.yaml")], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".partial-checkpoint-4", "checkpoint-2"]
    trainer.train(make_recipe(output_dir=str(run), train__max_steps=3, checkpoint__every_n_steps=2), resume="latest")
    said = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-2'} at step 2\n" in said
    assert (f"removed {run / 'checkpoints' / '.partial-checkpoint-4'}: the save of checkpoint-4, cut short by a kill or a crash "
            f"(no {STATE_FILE}: unfinished), which no resume can take\n") in said
