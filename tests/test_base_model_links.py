"""A base model whose file is a link to nothing (a hub cache's blob deleted, a folder moved): one line naming the link and
where it points, before anything loads. It was "is damaged (No such file or directory ...)" for a folder's weights, and
"not found" for a single file, naming neither."""

import os
import shutil

import pytest
from train_command_files import write_recipe

from finetune.cli.main import main
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models.model_source import resolve_model_folder

GONE = os.path.join("..", "..", "blobs", "3f2a")  # as a hub cache's snapshot links to its blobs


def with_link_to_nothing(folder, file: str):
    (folder / file).unlink()
    os.symlink(GONE, folder / file)
    return folder


@pytest.mark.parametrize("file", ["unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json"])
def test_a_folders_file_that_links_to_nothing_is_one_line_naming_the_link_and_its_target(file, tiny_model, tmp_path):
    folder = with_link_to_nothing(shutil.copytree(tiny_model, tmp_path / "base"), file)
    with pytest.raises(FinetuneError) as raised:
        resolve_model_folder(ModelConfig(pretrained=str(folder)))
    assert str(raised.value) == f"base model folder {folder}: {file} is a link to {GONE}, which is not there: put that file back (copy or download the model again)"


def test_training_on_it_stops_with_that_line_before_loading(tiny_model, image_folder, tmp_path, capsys):
    folder = with_link_to_nothing(shutil.copytree(tiny_model, tmp_path / "base"), "vae/diffusion_pytorch_model.safetensors")
    assert main(["train", str(write_recipe(tmp_path, "lora", image_folder, folder))]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: base model folder {folder}: vae/diffusion_pytorch_model.safetensors is a link to {GONE}, which is not there: put that file back "
        "(copy or download the model again)"
    ]


def test_a_single_file_base_that_links_to_nothing_is_one_line_naming_its_target(tmp_path):
    os.symlink(GONE, tmp_path / "model.safetensors")
    with pytest.raises(FinetuneError) as raised:
        resolve_model_folder(ModelConfig(pretrained=str(tmp_path / "model.safetensors")))
    assert str(raised.value) == f"base model file {tmp_path / 'model.safetensors'} is a link to {GONE}, which is not there: put that file back, or check model.pretrained"
