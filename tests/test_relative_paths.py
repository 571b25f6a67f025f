"""Relative paths in a recipe are read from the current folder (as the shipped recipes' datasets/... are, from
the repository's root), not the recipe's: a path not found says where it was looked for, and a data path found both
here and beside the recipe is one line naming both."""

import re
from pathlib import Path

import pytest

from finetune.config import DataConfig, ModelConfig
from data_examples import load_examples
from finetune.errors import FinetuneError
from finetune.methods.lora_init import read_initial_lora
from finetune.models.model_source import resolve_model_folder


def test_a_relative_path_not_found_names_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = rf"\(relative paths are read from the current folder, {tmp_path}\)$"
    with pytest.raises(FinetuneError, match=rf"^data folder images not found: check data.image_dir {here}"):
        load_examples(DataConfig(image_dir="images", resolution=64))
    with pytest.raises(FinetuneError, match=rf"^base model models/sd15/base not found: no such folder or file \(check model.pretrained\) {here}"):
        resolve_model_folder(ModelConfig(pretrained="models/sd15/base"))
    with pytest.raises(FinetuneError, match=rf"^lora.init_from runs/a not found: .* {here}"):
        read_initial_lora("runs/a", use_dora=False)
    # A local folder typed as owner/name is looked up on the hub: that it is no folder here is said too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FinetuneError, match=rf"\(looked in the cache at .*; there is no folder models/sd15 in the current folder, {tmp_path}, either\)$"):
        resolve_model_folder(ModelConfig(pretrained="models/sd15"))


def test_an_absolute_path_not_found_is_said_as_before(tmp_path):
    with pytest.raises(FinetuneError, match=rf"^data folder {tmp_path / 'images'} not found: check data.image_dir$"):
        load_examples(DataConfig(image_dir=str(tmp_path / "images"), resolution=64))


@pytest.mark.parametrize("windows_path", ["D:/sd15", "D:\\sd15", "c:/models/sd15"])
def test_a_windows_drive_path_is_a_folder_not_found_not_a_hub_id(tmp_path, monkeypatch, windows_path):
    """D:/sd15 was spelled as owner/name, so a missing one was looked up on the hub ("not found on the hub"):
    a hub id never holds a colon, and the drive is named as what this system lacks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FinetuneError, match=rf"^base model {re.escape(windows_path)} not found: no such folder or file \(check model.pretrained\) "
                                            rf"\({windows_path[:2]} is a Windows drive, which this system does not have \(it read the path from the "
                                            rf"current folder, {tmp_path}\): give the path as this system names it\)$"):
        resolve_model_folder(ModelConfig(pretrained=windows_path))


def test_a_data_path_that_names_a_folder_here_and_another_beside_the_recipe_is_one_line_naming_both(tmp_path, monkeypatch):
    """A recipe kept beside its data, run from a folder holding an older copy by the same name: the copy here trained,
    unseen. Which was meant cannot be told; one of them alone, or the same folder both ways, is no question."""
    from PIL import Image

    from finetune.config.recipe_loading import load_recipe

    project, here = tmp_path / "project", tmp_path / "here"
    for folder in (project / "star", here / "star", project / "dogs"):
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(folder / "0.png")
    recipe, dreambooth = project / "recipe.yaml", project / "dreambooth.yaml"
    recipe.write_text("data:\n  image_dir: star\n")
    dreambooth.write_text("method: dreambooth\ndreambooth:\n  concepts:\n    - instance_dir: dogs\n      instance_prompt: a sks dog\n  prior_preservation: false\n")
    monkeypatch.chdir(here)
    with pytest.raises(FinetuneError, match=rf"^data.image_dir star names two: {here / 'star'}, which it would read \(relative paths are read from the "
                                            rf"current folder\), and {project / 'star'} beside recipe {recipe}: write the one meant as an absolute path, or run from its folder$"):  # fmt: skip
        load_recipe(recipe)
    assert load_recipe(recipe, [f"data.image_dir={here / 'star'}"]).data.image_dir == str(here / "star")  # absolute: no question
    assert load_recipe(dreambooth).dreambooth.concepts[0].instance_dir == "dogs"  # beside the recipe alone: not found here, as before
    (here / "dogs").mkdir()
    with pytest.raises(FinetuneError, match=r"^dreambooth.concepts.0.instance_dir dogs names two: "):
        load_recipe(dreambooth)
    monkeypatch.chdir(project)  # from the recipe's folder: one folder, however it is reached
    assert load_recipe(recipe).data.image_dir == "star"
    assert load_recipe(tmp_path / "here" / ".." / "project" / "recipe.yaml").data.image_dir == "star"


def test_a_data_path_given_on_the_command_line_is_the_current_folders(tmp_path, monkeypatch):
    """`cd photos && finetune train ~/recipes/lora.yaml data.image_dir=.`: '.' named the recipe's folder too, so every such
    run was refused; a path typed in the shell is read from where it was typed, as the shell completes it."""
    from finetune.config.recipe_loading import load_recipe

    (tmp_path / "recipes").mkdir()
    (tmp_path / "photos" / "star").mkdir(parents=True)
    (tmp_path / "recipes" / "star").mkdir()
    recipe = tmp_path / "recipes" / "lora.yaml"
    recipe.write_text("data:\n  image_dir: elsewhere\n")
    monkeypatch.chdir(tmp_path / "photos")
    assert load_recipe(recipe, ["data.image_dir=."]).data.image_dir == "."
    assert load_recipe(recipe, ["data.image_dir=star"]).data.image_dir == "star"
    recipe.write_text("data:\n  image_dir: star\n")  # written in the file: which was meant cannot be told, as before
    with pytest.raises(FinetuneError, match=r"^data.image_dir star names two: "):
        load_recipe(recipe)


def test_a_runs_recipe_as_run_resumes_from_any_folder_with_the_data_path_its_command_line_gave(tmp_path, monkeypatch):
    """`cd photos && finetune train ~/recipes/lora.yaml data.image_dir=.` records image_dir '.' in output_dir/recipe_as_run.yaml;
    resuming with that file (as README says) was refused from every folder but the output_dir: '.' named the output_dir
    too, 'beside the recipe'. A run's record holds its run's paths, never its output_dir's."""
    from finetune.config.recipe_loading import load_recipe
    from finetune.config.run_recipe import write_run_recipe

    (tmp_path / "recipes").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "recipes" / "lora.yaml").write_text("data:\n  image_dir: elsewhere\n")
    monkeypatch.chdir(tmp_path / "photos")
    recipe = load_recipe(tmp_path / "recipes" / "lora.yaml", ["data.image_dir=.", f"output_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    as_run = write_run_recipe(recipe, tmp_path / "run")
    assert load_recipe(as_run).data.image_dir == "."
    own = tmp_path / "run" / "mine.yaml"  # a recipe of the user's kept there is checked as before ('.' there is the output_dir, never the data)
    own.write_text(as_run.read_text().split("\n", 2)[2].replace("image_dir: .\n", "image_dir: star\n"))
    (tmp_path / "photos" / "star").mkdir()
    (tmp_path / "run" / "star").mkdir()
    with pytest.raises(FinetuneError, match=r"^data.image_dir star names two: "):
        load_recipe(own)


def test_an_earlier_finetunes_record_of_its_run_resumes_from_the_folder_that_run_started_in(tmp_path, monkeypatch):
    """An earlier finetune kept its run's recipe as output_dir/recipe.yaml, without the header that marks a record: one
    whose data.image_dir is '.' (the folder the run started in) was refused as naming two folders from every folder, its own
    start too ('.' named the output_dir, beside it). The output_dir is never the data; from another folder, the refusal
    says where that run started, which its relative output_dir tells."""
    import yaml

    from finetune.config.recipe_loading import load_recipe

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "outputs" / "run").mkdir(parents=True)
    elsewhere.mkdir()
    record = project / "outputs" / "run" / "recipe.yaml"
    record.write_text(yaml.safe_dump({"data": {"image_dir": ".", "resolution": 64}, "output_dir": "outputs/run"}))
    monkeypatch.chdir(project)
    assert load_recipe(record).data.image_dir == "."
    assert load_recipe(Path("outputs/run/recipe.yaml")).data.image_dir == "."
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FinetuneError, match=rf"^data.image_dir . names two: {elsewhere}, which it would read \(relative paths are read from the current "
                                            rf"folder\), and {record.parent} beside recipe {record}, its output_dir \(outputs/run\) seen from {project}: "
                                            rf"run from {project} \(cd {project}\), or write the one meant as an absolute path$"):  # fmt: skip
        load_recipe(record)
    (project / "star").mkdir()  # from its start, a path that names two is refused as in any recipe: not the output_dir's folder to run from
    (record.parent / "star").mkdir()
    record.write_text(yaml.safe_dump({"data": {"image_dir": "star", "resolution": 64}, "output_dir": "outputs/run"}))
    monkeypatch.chdir(project)
    with pytest.raises(FinetuneError, match=rf"^data.image_dir star names two: .* beside recipe {record}: write the one meant as an absolute path$"):
        load_recipe(record)
    record.write_text(yaml.safe_dump({"data": {"image_dir": ".", "resolution": 64}, "output_dir": "outputs/run"}))
    monkeypatch.chdir(elsewhere)
    absolute = yaml.safe_load(record.read_text()) | {"output_dir": str(record.parent)}  # its start cannot be told: '.' is here, as for a record of this version
    record.write_text(yaml.safe_dump(absolute))
    assert load_recipe(record).data.image_dir == "."
