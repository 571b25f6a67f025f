"""A finished run folder copied to another machine, or moved with its project (a parent renamed). Its record
(recipe_as_run.yaml) names the paths its run was given, absolute where they were given so: a resume of the moved folder
stopped on its data "not found", and a copy resumed beside its original trained on in the original's folder. sample,
merge and eval of a moved run whose base did not move said the base was recorded "by its name only", of a run whose
base_paths.json names where it was."""

import shutil

import pytest
import yaml

from finetune.cli.main import main
from finetune.config.recipe_loading import load_recipe
from finetune.config.run_recipe import RUN_RECIPE, write_run_recipe
from finetune.errors import FinetuneError
from finetune.outputs.base_names import BASE_PATHS_FILE, read_base_paths
from finetune.sampling.adapter_records import recorded_base

from conftest import build_recipe
from test_moved_base import lora_recording


def recorded_run(project, **more):
    """A run's record in project/runs/a, as `finetune train` writes it, of a run given absolute paths."""
    for folder in ("models/sd15", "data/star", "runs/a"):
        (project / folder).mkdir(parents=True, exist_ok=True)
    recipe = project / "lora.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(project / "runs" / "a"), "model": {"pretrained": str(project / "models" / "sd15")},
                                      "data": {"image_dir": str(project / "data" / "star")}, **more}))  # fmt: skip
    return write_run_recipe(load_recipe(recipe), project / "runs" / "a")


def test_a_run_moved_with_its_project_reads_its_paths_where_they_moved(tmp_path, capsys):
    (tmp_path / "alice" / "proj" / "runs" / "a").mkdir(parents=True)
    (tmp_path / "alice" / "proj" / "runs" / "a" / "prompts.txt").write_text("a star\n")  # inside the run folder: moves with it
    recorded_run(tmp_path / "alice" / "proj", validation={"prompts_file": str(tmp_path / "alice" / "proj" / "runs" / "a" / "prompts.txt")})
    (tmp_path / "alice").rename(tmp_path / "bob")
    project = tmp_path / "bob" / "proj"
    capsys.readouterr()
    recipe = load_recipe(project / "runs" / "a" / RUN_RECIPE)
    assert recipe.output_dir == str(project / "runs" / "a")
    assert (recipe.model.pretrained, recipe.data.image_dir) == (str(project / "models" / "sd15"), str(project / "data" / "star"))
    assert recipe.validation.prompts_file == str(project / "runs" / "a" / "prompts.txt")
    assert capsys.readouterr().out == (
        f"run folder moved: {RUN_RECIPE} names it {tmp_path / 'alice' / 'proj' / 'runs' / 'a'}; output_dir is {project / 'runs' / 'a'}, "
        f"model.pretrained {project / 'models' / 'sd15'}, data.image_dir {project / 'data' / 'star'}, validation.prompts_file "
        f"{project / 'runs' / 'a' / 'prompts.txt'} (where the run moved)\n")  # fmt: skip
    # An override is the user's: read as given.
    assert load_recipe(project / "runs" / "a" / RUN_RECIPE, [f"data.image_dir={tmp_path}"]).data.image_dir == str(tmp_path)


def test_a_copy_of_a_run_resumed_beside_its_original_is_the_copys_run(tmp_path, capsys):
    record = recorded_run(tmp_path)
    shutil.copytree(record.parent, tmp_path / "runs" / "a-copy")
    capsys.readouterr()
    recipe = load_recipe(tmp_path / "runs" / "a-copy" / RUN_RECIPE)
    assert recipe.output_dir == str(tmp_path / "runs" / "a-copy")  # was the original's: the copy's resume trained on in runs/a
    assert recipe.data.image_dir == str(tmp_path / "data" / "star")  # there: read where it is
    assert load_recipe(record).output_dir == str(tmp_path / "runs" / "a")
    assert capsys.readouterr().out == f"run folder moved: {RUN_RECIPE} names it {tmp_path / 'runs' / 'a'}; output_dir is {tmp_path / 'runs' / 'a-copy'}\n"


def test_a_run_copied_without_its_data_and_base_says_which_keys_to_give(tmp_path, capsys):
    record = recorded_run(tmp_path / "alice")
    shutil.copytree(record.parent, tmp_path / "bob" / "a")
    shutil.rmtree(tmp_path / "alice")  # another machine
    capsys.readouterr()
    recipe = load_recipe(tmp_path / "bob" / "a" / RUN_RECIPE)
    assert recipe.data.image_dir == str(tmp_path / "alice" / "data" / "star")  # as recorded: the data check says it is not there, naming its key
    assert capsys.readouterr().out == (
        f"run folder moved: {RUN_RECIPE} names it {tmp_path / 'alice' / 'runs' / 'a'}; output_dir is {tmp_path / 'bob' / 'a'}; not here: "
        f"model.pretrained {tmp_path / 'alice' / 'models' / 'sd15'}, data.image_dir {tmp_path / 'alice' / 'data' / 'star'}: give where each is "
        "now after the recipe, as model.pretrained=PATH\n")  # fmt: skip


def test_a_run_resumed_where_it_ran_reads_its_record_as_written(tmp_path, monkeypatch, capsys):
    record = recorded_run(tmp_path)
    capsys.readouterr()
    recipe = load_recipe(record)
    assert (recipe.output_dir, recipe.data.image_dir) == (str(tmp_path / "runs" / "a"), str(tmp_path / "data" / "star"))
    relative = tmp_path / "rel"  # a run given relative paths, resumed from the folder it started in
    (relative / "outputs" / "b").mkdir(parents=True)
    monkeypatch.chdir(relative)
    (relative / "lora.yaml").write_text("output_dir: outputs/b\ndata:\n  image_dir: star\n")
    assert load_recipe(write_run_recipe(load_recipe(relative / "lora.yaml"), relative / "outputs" / "b")).output_dir == "outputs/b"
    assert capsys.readouterr().out == ""


def test_a_run_of_relative_paths_resumed_from_another_folder_is_its_folders_run(tmp_path, monkeypatch, capsys):
    """Its output_dir named a folder of that name under the current one (a new run there, or another run's folder); its
    relative data paths are the current folder's, as in any recipe: said, with the folder they meant."""
    project = tmp_path / "proj"
    (project / "outputs" / "b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(project)
    (project / "lora.yaml").write_text(f"output_dir: outputs/b\nmodel:\n  pretrained: {tmp_path / 'gone'}\ndata:\n  image_dir: star\n")
    record = write_run_recipe(load_recipe(project / "lora.yaml"), project / "outputs" / "b")
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    recipe = load_recipe(record)
    assert (recipe.output_dir, recipe.data.image_dir) == (str(record.parent), "star")
    assert capsys.readouterr().out == (f"run folder {record.parent}: {RUN_RECIPE} names it outputs/b, from the folder its run started in; output_dir "
                                       f"is this folder, and the record's relative paths are read from the current folder (the run's own from "
                                       f"{project}: cd {project}); not here: model.pretrained {tmp_path / 'gone'}: give where each is now after "
                                       "the recipe, as model.pretrained=PATH\n")  # fmt: skip


def test_a_moved_run_resumes_and_samples_from_its_new_place(tiny_model, image_folder, tmp_path, monkeypatch):
    """The whole way: trained, its project folder renamed, resumed with `finetune train RUN/recipe_as_run.yaml --resume latest`."""
    project = tmp_path / "alice" / "proj"
    shutil.copytree(tiny_model, project / "models" / "tiny")
    shutil.copytree(image_folder, project / "data" / "striped")
    from finetune.training.trainer import train

    train(build_recipe(project / "models" / "tiny", project / "data" / "striped", project / "runs" / "a", train__max_steps=1, checkpoint__every_n_steps=1))
    (tmp_path / "alice").rename(tmp_path / "bob")
    run = tmp_path / "bob" / "proj" / "runs" / "a"
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(run / RUN_RECIPE), "--resume", "latest", "train.max_steps=2"]) == 0
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "alice").exists()
    assert read_base_paths(run) == {"tiny": str(tmp_path / "bob" / "proj" / "models" / "tiny")}  # where sample finds it from now on


def test_a_moved_runs_base_not_there_is_said_with_where_the_run_had_it(tmp_path):
    lora = lora_recording(tmp_path / "bob" / "a" / "pytorch_lora_weights.safetensors", "sd15")
    (tmp_path / "bob" / "a" / BASE_PATHS_FILE).write_text('{"sd15": "/home/alice/models/sd15"}')
    with pytest.raises(FinetuneError, match=rf"^pass --base MODEL: {lora} was trained on /home/alice/models/sd15 \(its run's {BASE_PATHS_FILE}\), "
                                            r"which is not there from here, nor a folder of its name \(sd15\) above it: give where that base is now$"):  # fmt: skip
        recorded_base(lora, None)
