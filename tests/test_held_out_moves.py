"""validation.loss_images holds out the same images wherever the data live: a data folder moved (another mount
point, another machine) keeps the held-out set, and a resume after the move continues the same curve."""

import json
import shutil

import pytest
from PIL import Image

from finetune.toyworld.datasets import write_folder
import finetune.training.held_out as held_out_module
from finetune.training.trainer import train

COMMON = dict(validation__loss_images=1, validation__every_n_steps=2, checkpoint__every_n_steps=2, train__max_steps=4)


@pytest.fixture
def two_folders(tmp_path):
    """data/a and data/b, three images each (data.folders: a, then b)."""
    root = tmp_path / "data"
    write_folder(root / "a", 3, seed=7, include_held_out="only_style")
    write_folder(root / "b", 3, seed=8, include_held_out="only_style")
    return root


def folders_recipe(make_recipe, root, first: str, output_dir, **settings):
    return make_recipe(output_dir=str(output_dir), data__image_dir=str(root), data__folders=[{"path": first}, {"path": "b"}], **{**COMMON, **settings})


@pytest.fixture
def held_out_names(monkeypatch):
    """The file names each run (or resume) holds out, in the order the runs start."""
    runs = []
    real_init = held_out_module.TrainingSubset.__init__

    def recording_init(self, dataset, kept):
        names = [f"folder {e.folder_index}: {e.source.rsplit('/', 1)[-1]}" for e in dataset.examples]  # where it lives left out
        runs.append(sorted(set(names) - {names[i] for i in kept}))
        real_init(self, dataset, kept)

    monkeypatch.setattr(held_out_module.TrainingSubset, "__init__", recording_init)
    return runs


def test_moving_a_data_folder_keeps_the_held_out_images_and_the_resumed_curve(make_recipe, two_folders, tmp_path, held_out_names, capsys):
    whole = train(folders_recipe(make_recipe, two_folders, "a", tmp_path / "whole"))
    # data/a moves to data/z (after data/b by full path, as on a drive mounted elsewhere): the same images are held out.
    (two_folders / "a").rename(two_folders / "z")
    moved = train(folders_recipe(make_recipe, two_folders, "z", tmp_path / "moved", train__max_steps=1, validation__at_start=True))
    assert held_out_names[0] == held_out_names[1] and len(held_out_names[0]) == 1
    assert moved.validation_losses[0] == whole.validation_losses[0]  # the same image scored with the same draws
    capsys.readouterr()

    resumed = train(folders_recipe(make_recipe, two_folders, "z", tmp_path / "resumed"), resume=str(whole.output_dir / "checkpoints" / "checkpoint-2"))
    assert held_out_names[2] == held_out_names[0]
    assert resumed.validation_losses[-1] == whole.validation_losses[-1]
    out = capsys.readouterr().out
    assert "settings changed since checkpoint-2: data.folders.0.path a -> z\n" in out  # the images themselves are the same

    # The held-out image edited: it is another image, and the resume says so.
    folder, name = held_out_names[0][0].split(": ")
    edited = two_folders / ["z", "b"][int(folder.removeprefix("folder "))] / name
    image = Image.open(edited).convert("RGB")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(edited)
    train(folders_recipe(make_recipe, two_folders, "z", tmp_path / "edited", train__max_steps=3), resume=str(whole.output_dir / "checkpoints" / "checkpoint-2"))
    assert ("warning: 1 image of the 1 checkpoint-2 held out (by their pixels) is no longer in the data (removed or edited): this run holds out "
            "the seed's choice among the images now, so its validation losses do not continue the checkpoint's\n") in capsys.readouterr().out


def run_from_before(make_recipe, two_folders, output_dir, monkeypatch):
    """A run as finetune made them before: held out by the images' full paths, its checkpoints list none of them."""
    import finetune.training.trainer as trainer

    def by_full_paths(items, count, seed, checkpoint=None):
        return held_out_module.HeldOutSplit(*held_out_module.split_by_full_paths([item.source for item in items], count, seed), [], [])

    with monkeypatch.context() as before:
        before.setattr(trainer, "held_out_for_run", by_full_paths)
        old = train(folders_recipe(make_recipe, two_folders, "a", output_dir))
    for checkpoint in (old.output_dir / "checkpoints").iterdir():
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        (checkpoint / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != held_out_module.HELD_OUT_STATE}))
    return old


def test_a_checkpoint_from_before_keeps_the_images_it_held_out_or_says_they_changed(make_recipe, two_folders, tmp_path, held_out_names, monkeypatch, capsys):
    old = run_from_before(make_recipe, two_folders, tmp_path / "old", monkeypatch)
    train(folders_recipe(make_recipe, two_folders, "a", tmp_path / "new", train__max_steps=1))
    assert held_out_names[1] != held_out_names[0]  # this data shows the difference: the choice by content is another
    capsys.readouterr()

    # Resumed where its data still are: the images it held out stay out, the curve continues, and later checkpoints list them.
    resumed = train(folders_recipe(make_recipe, two_folders, "a", tmp_path / "resumed", train__max_steps=6), resume=str(old.output_dir / "checkpoints" / "checkpoint-2"))
    assert held_out_names[2] == held_out_names[0]
    assert dict(resumed.validation_losses)[4] == dict(old.validation_losses)[4]  # (step 2 is drawn again: its checkpoint came first)
    assert "checkpoint-2 held out the images finetune then chose by their full paths: this run holds out those\n" in capsys.readouterr().out

    (two_folders / "a").rename(two_folders / "z")
    train(folders_recipe(make_recipe, two_folders, "z", tmp_path / "moved", train__max_steps=6), resume=str(resumed.output_dir / "checkpoints" / "checkpoint-4"))
    assert held_out_names[3] == held_out_names[0]  # listed by checkpoint-4: kept wherever the data went
    capsys.readouterr()

    # Moved, the old checkpoint's choice cannot be told: the resume says so.
    train(folders_recipe(make_recipe, two_folders, "z", tmp_path / "lost", train__max_steps=3), resume=str(old.output_dir / "checkpoints" / "checkpoint-2"))
    assert held_out_names[4] == held_out_names[1]
    out = capsys.readouterr().out
    assert ("warning: checkpoint-2 held out images chosen by their full paths (as finetune did then), and the data moved or changed since: which ones "
            "cannot be told, so this run holds out its own choice (images it held out may train now, images it trained on are scored): for a "
            "validation loss of unseen images, start a new run\n") in out


def test_check_data_of_a_run_to_resume_shows_the_images_the_resume_holds_out(make_recipe, two_folders, tmp_path, held_out_names, monkeypatch, capsys):
    """output_dir holds checkpoints: the next run resumes (or starts over with --overwrite), and a checkpoint from before
    keeps the images it held out by full paths, which are not the ones a new run would hold out with this data."""
    from finetune.cli.main import main
    import finetune.data_check.command as command

    old = run_from_before(make_recipe, two_folders, tmp_path / "old", monkeypatch)
    shown = []
    monkeypatch.setattr(command, "held_out_sources", lambda *args: shown.append(held_out_module.held_out_sources(*args)) or shown[-1])
    capsys.readouterr()
    assert main(["check-data", str(old.output_dir / "recipe_as_run.yaml")]) == 0
    out = capsys.readouterr().out
    [(folder, name)] = [entry.split(": ") for entry in held_out_names[0]]
    assert shown == [{str(two_folders / ["a", "b"][int(folder.removeprefix("folder "))] / name)}]  # the old run's, which the resume keeps
    assert "with --resume latest, checkpoint-4 held out the images finetune then chose by their full paths: this run holds out those\n" in out
    assert ("held out: 1 image for the validation loss (validation.loss_images) as --resume latest holds them out (checkpoint-4; a new run, "
            "with --overwrite, holds out other images), leaving 5 of the 6 uses per epoch to train\n") in out
    shutil.rmtree(old.output_dir / "checkpoints")  # a new run's: the seed's choice by content, as before
    assert main(["check-data", str(old.output_dir / "recipe_as_run.yaml")]) == 0
    assert shown[-1] != shown[0] and "held out: 1 image for the validation loss (validation.loss_images), leaving" in capsys.readouterr().out
