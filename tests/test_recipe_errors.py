"""Recipe values that name no file or folder: one line naming the key, before anything runs."""

import pytest

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.recipe_loading import recipe_from_dict


def recipe_with(dotted: str, value) -> dict:
    raw = {"data": {"image_dir": "images"}, "train": {"cache_latents": True}}
    node = raw
    *sections, key = dotted.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value
    return raw


# "" is the current folder to every file call: model.pretrained "" was "base model folder  is not a diffusers
# pipeline"; output_dir "" wrote the run (and --overwrite deleted checkpoints/, samples/, logs/) in the current folder.
@pytest.mark.parametrize("key", ["model.pretrained", "model.single_file_config", "output_dir", "train.cache_dir", "lora.init_from"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_path_is_refused_with_its_key(key, value):
    with pytest.raises(FinetuneError, match=rf"^recipe: key '{key}': is empty: give a file or folder path, or remove the key"):
        recipe_from_dict(recipe_with(key, value))


def test_a_path_still_expands_the_home_folder():
    assert recipe_from_dict(recipe_with("output_dir", "~/runs/x")).output_dir.endswith("/runs/x")


def test_an_empty_base_config_option_is_one_line():
    with pytest.raises(FinetuneError, match=r"^--base-config is empty: give the diffusers folder or hub id whose configs describe the --base file"):
        ModelConfig.from_option("model.safetensors", "")
