"""`finetune train` checks the data before torch and the model stack load: a corrupt image was said some 25 s in, after
diffusers had been imported (train()'s own data check ran after them). The check's result is kept for train(), so every
image is still decoded once a run (finetune/checked_once.py)."""

import json
import shutil
from collections import Counter

import pytest
import yaml
from conftest import SHIPPED_BASE

import finetune.check_data
import finetune.train_command
from finetune.cli import main


def write_recipe(tmp_path, method: str, folder, base=SHIPPED_BASE, **sections):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"method": method, "model": {"pretrained": str(base)}, "data": {"image_dir": str(folder), "resolution": 64},
                                    "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}, **sections}))  # fmt: skip
    return path


@pytest.mark.parametrize("method", ["lora", "controlnet"])
def test_a_corrupt_image_is_said_before_the_training_stack_loads(method, image_folder, pairs_folder, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(pairs_folder if method == "controlnet" else image_folder, tmp_path / "data")
    (folder / "zz_corrupt.png").write_bytes(b"garbage")
    if method == "controlnet":  # a pair of its own: its image is the corrupt file
        shutil.copy(folder / json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["conditioning_file_name"], folder / "zz_cond.png")
        with (folder / "metadata.jsonl").open("a") as rows:
            rows.write(json.dumps({"file_name": "zz_corrupt.png", "conditioning_file_name": "zz_cond.png", "text": "x"}) + "\n")
    else:
        (folder / "zz_corrupt.txt").write_text("x")

    def training_stack(*args):  # torch, diffusers and the model: what the data check must come before
        pytest.fail("the training stack was loaded before the data check said the corrupt image")

    monkeypatch.setattr(finetune.train_command, "_run_training", training_stack)
    assert main(["train", str(write_recipe(tmp_path, method, folder))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zz_corrupt.png cannot be read" in err[0] and err[0].endswith("skip bad images"), err


def test_a_run_decodes_each_image_once_and_a_later_check_decodes_them_afresh(tiny_model, image_folder, tmp_path, monkeypatch):
    """The command's check and train()'s are one: train() takes the command's report. Outside a `finetune train` (a test, a
    notebook training one folder twice, editing it in between) each check reads the images as they are then."""
    inspected = Counter()
    inspect = finetune.check_data.inspect

    def counted_inspect(example, config):
        inspected[example.source] += 1
        return inspect(example, config)

    monkeypatch.setattr(finetune.check_data, "inspect", counted_inspect)
    recipe = write_recipe(tmp_path, "lora", image_folder, tiny_model, train={"batch_size": 2, "max_steps": 1}, logging={"tensorboard": False},
                          checkpoint={"every_n_steps": 0})  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    assert len(inspected) == 4 and set(inspected.values()) == {1}, inspected

    from finetune.config import DataConfig

    finetune.check_data.checked_report(DataConfig(image_dir=str(image_folder), resolution=64))
    assert set(inspected.values()) == {2}, inspected


def test_a_controlnet_folders_record_make_conditions_could_not_write_is_said_before_its_images_are_decoded(pairs_folder, tmp_path, monkeypatch, capsys):
    """ControlNetMethod.check_data says such a conditioning.json "before the images are decoded"; the command's own data check,
    made before train(), decoded them first: a corrupt image was said in its place, and a large folder was read in full."""
    folder = shutil.copytree(pairs_folder, tmp_path / "data")
    (folder / "conditioning.json").write_text(json.dumps({"kind": "canny", "low": 20, "high": 40, "sigma": 1e9}))
    image = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    (folder / image).write_bytes(b"garbage")
    monkeypatch.setattr(finetune.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded"))
    assert main(["train", str(write_recipe(tmp_path, "controlnet", folder))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder / 'conditioning.json'} records conditioning images made in a way make-conditions does not" in err[0], err


def test_a_vae_runs_perceptual_network_not_there_is_said_before_its_images_are_decoded(image_folder, tmp_path, monkeypatch, capsys):
    """VAEMethod.check_data says a vae.perceptual_network not found "before the images are read"; the command's own data check,
    made before train(), read them first: a corrupt image was said in its place, and a large folder was read in full."""
    folder = shutil.copytree(image_folder, tmp_path / "data")
    (folder / "zz_corrupt.png").write_bytes(b"garbage")
    monkeypatch.setattr(finetune.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded"))
    missing = tmp_path / "perceptual.safetensors"
    assert main(["train", str(write_recipe(tmp_path, "vae", folder, vae={"perceptual_weight": 0.1, "perceptual_network": str(missing)}))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"vae.perceptual_network {missing} not found" in err[0], err
