"""Relative paths in a recipe are read from the current folder (as the shipped recipes' datasets/... are, from
the repository's root), not the recipe's: a path not found says where it was looked for."""

import re

import pytest

from finetune.config import DataConfig, ModelConfig
from data_examples import load_examples
from finetune.errors import FinetuneError
from finetune.methods.lora import read_initial_lora
from finetune.model_source import resolve_model_folder


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
    with pytest.raises(FinetuneError, match=rf"\(there is no folder models/sd15 in the current folder, {tmp_path}, either\)$"):
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
