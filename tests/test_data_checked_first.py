"""`finetune train` checks the data before torch and the model stack load: a corrupt image was said some 25 s in, after
diffusers had been imported (train()'s own data check ran after them). The check's result is kept for train(), so every
image is still decoded once a run (finetune/data_check/checked_once.py)."""

import json
import shutil
from collections import Counter

import pytest
from train_command_files import corrupt_copy, write_recipe

from finetune.cli.main import main
import finetune.cli.train_command
import finetune.data_check.check


@pytest.mark.parametrize("method", ["lora", "controlnet"])
def test_a_corrupt_image_is_said_before_the_training_stack_loads(method, image_folder, pairs_folder, tmp_path, monkeypatch, capsys):
    folder = corrupt_copy(pairs_folder if method == "controlnet" else image_folder, tmp_path, method)

    def training_stack(*args):  # torch, diffusers and the model: what the data check must come before
        pytest.fail("the training stack was loaded before the data check said the corrupt image")

    monkeypatch.setattr(finetune.cli.train_command, "_run_training", training_stack)
    assert main(["train", str(write_recipe(tmp_path, method, folder))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zz_corrupt.png cannot be read" in err[0] and err[0].endswith("skip bad images"), err


@pytest.fixture
def inspected(monkeypatch) -> Counter:
    """How many times each image has been inspected (decoded and checked) since the test began."""
    counts, inspect = Counter(), finetune.data_check.check.inspect

    def counted_inspect(example, config, record=None):
        counts[example.source] += 1
        return inspect(example, config, record)

    monkeypatch.setattr(finetune.data_check.check, "inspect", counted_inspect)
    return counts


def test_a_run_decodes_each_image_once_and_a_later_check_decodes_them_afresh(tiny_model, image_folder, tmp_path, inspected):
    """The command's check and train()'s are one: train() takes the command's report. Outside a `finetune train` (a test, a
    notebook training one folder twice, editing it in between) each check reads the images as they are then."""
    recipe = write_recipe(tmp_path, "lora", image_folder, tiny_model, train={"batch_size": 2, "max_steps": 1}, logging={"tensorboard": False},
                          checkpoint={"every_n_steps": 0})  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    assert len(inspected) == 4 and set(inspected.values()) == {1}, inspected

    from finetune.config import DataConfig

    finetune.data_check.check.checked_report(DataConfig(image_dir=str(image_folder), resolution=64))
    assert set(inspected.values()) == {2}, inspected


def test_a_controlnet_folders_record_make_conditions_could_not_write_is_said_before_its_images_are_decoded(pairs_folder, tmp_path, monkeypatch, capsys):
    """ControlNetMethod.check_data says such a conditioning.json "before the images are decoded"; the command's own data check,
    made before train(), decoded them first: a corrupt image was said in its place, and a large folder was read in full."""
    folder = shutil.copytree(pairs_folder, tmp_path / "data")
    (folder / "conditioning.json").write_text(json.dumps({"kind": "canny", "low": 20, "high": 40, "sigma": 1e9}))
    image = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    (folder / image).write_bytes(b"garbage")
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded"))
    assert main(["train", str(write_recipe(tmp_path, "controlnet", folder))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder / 'conditioning.json'} records conditioning images made in a way make-conditions does not" in err[0], err


def test_a_vae_runs_perceptual_network_not_there_is_said_before_its_images_are_decoded(image_folder, tmp_path, monkeypatch, capsys):
    """VAEMethod.check_data says a vae.perceptual_network not found "before the images are read"; the command's own data check,
    made before train(), read them first: a corrupt image was said in its place, and a large folder was read in full."""
    folder = corrupt_copy(image_folder, tmp_path)
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded"))
    missing = tmp_path / "perceptual.safetensors"
    assert main(["train", str(write_recipe(tmp_path, "vae", folder, vae={"perceptual_weight": 0.1, "perceptual_network": str(missing)}))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"vae.perceptual_network {missing} not found" in err[0], err


def dreambooth_sections(instance_folder, class_folder, count):
    concept = {"instance_dir": str(instance_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(class_folder)}
    return {"dreambooth": {"concepts": [concept], "num_class_images": count}}


def test_a_corrupt_class_image_of_the_users_is_said_before_the_training_stack_loads(image_folder, tmp_path, monkeypatch, capsys):
    """A DreamBooth run's own class images (the user's class_dir) were checked by train() alone, after torch and diffusers
    had loaded (some 25 s): the command's data check now checks them too."""
    classes = shutil.copytree(image_folder, tmp_path / "classes")
    (classes / "zz_corrupt.png").write_bytes(b"garbage")

    def training_stack(*args):
        pytest.fail("the training stack was loaded before the data check said the corrupt class image")

    monkeypatch.setattr(finetune.cli.train_command, "_run_training", training_stack)
    recipe = write_recipe(tmp_path, "dreambooth", None, **dreambooth_sections(image_folder, classes, 5))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{classes / 'zz_corrupt.png'} cannot be read" in err[0], err


def test_a_dreambooth_run_decodes_each_of_its_own_class_images_once(tiny_model, image_folder, tmp_path, inspected):
    classes = shutil.copytree(image_folder, tmp_path / "classes")
    recipe = write_recipe(tmp_path, "dreambooth", None, tiny_model, train={"batch_size": 1, "max_steps": 1}, logging={"tensorboard": False},
                          checkpoint={"every_n_steps": 0}, **dreambooth_sections(image_folder, classes, 4))  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    own = {source: count for source, count in inspected.items() if source.startswith(str(classes))}
    assert len(own) == 4 and set(own.values()) == {1}, inspected


def test_concepts_sharing_a_class_folder_each_report_its_own_class_images_once(make_recipe, image_folder, tmp_path):
    """Two concepts of one class folder and prompt check the same images under one key: each takes a copy of the kept
    report, labelled as its own (the kept one, labelled by both, was listed twice with both labels)."""
    from finetune.data_check.checked_once import checks_kept
    from finetune.data_check.train_inputs import check_data_first
    from finetune.methods.dreambooth import DreamBoothMethod

    classes = shutil.copytree(image_folder, tmp_path / "classes")
    concepts = [{"instance_dir": str(image_folder), "instance_prompt": f"a {name} shape", "class_prompt": "a shape", "class_dir": str(classes)}
                for name in ("sks", "xyz")]  # fmt: skip
    recipe = make_recipe(method="dreambooth", data__image_dir=None, dreambooth={"concepts": concepts, "num_class_images": 4})
    with checks_kept():
        check_data_first(recipe)
        method = DreamBoothMethod(recipe)
        method.check_data()
    labels = [report.label for report in method.data_reports if report.label.startswith("class images")]
    assert labels == [f"class images {classes} (your own; 0 generated earlier, 0 to generate)"] * 2, labels


@pytest.mark.parametrize(("method", "settings", "processes", "said"), [
    ("lora", {"train": {"batch_size": 8}}, 1, "4 training images (repeats counted) are fewer than one batch (train.batch_size 8): "),
    ("controlnet", {"train": {"batch_size": 3}}, 2, "4 training images (repeats counted) are fewer than one batch (train.batch_size 3 x 2 processes): "),
    ("lora", {"train": {"batch_size": 3}, "validation": {"loss_images": 2}}, 1,
     "2 training images (repeats counted) (4 before validation.loss_images held some out) are fewer than one batch (train.batch_size 3): "),
])  # fmt: skip
def test_too_few_images_for_a_batch_are_said_before_the_training_stack_loads(method, settings, processes, said, image_folder, pairs_folder, tmp_path,
                                                                            monkeypatch, capsys):  # fmt: skip
    """train.batch_size over the images left to train (by the launch's processes, less those held out) was said by train()
    once torch, accelerate and diffusers had loaded (about 10 s of CPU): the command says it after its data check."""
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))  # on one machine
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded before the refusal"))
    monkeypatch.setattr("finetune.distributed.launch_options.check_launch_first", lambda: None)  # a launch of `processes` this test does not start
    folder = pairs_folder if method == "controlnet" else image_folder
    assert main(["train", str(write_recipe(tmp_path, method, folder, **settings))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {said}"), err
