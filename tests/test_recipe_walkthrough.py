"""What a user walking through the shipped recipes and the command line ran into: settings another
section holds for the chosen method, messages that named the wrong key."""

from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.recipe_loading import load_recipe

RECIPES = Path(__file__).parent.parent / "recipes"
STAR = ["dreambooth.concepts.0.instance_dir=datasets/star"]


def test_dreambooth_loraplus_for_a_frozen_text_encoder_names_dreambooths_switch():
    # lora.train_text_encoder, which it named, is refused with method dreambooth.
    with pytest.raises(FinetuneError, match=r"no text encoder trains: remove it \(or set dreambooth.train_text_encoder: true\)$"):
        load_recipe(RECIPES / "dreambooth_lora.yaml", STAR + ["lora.loraplus_lr_ratio=4", "lora.loraplus_text_encoder_lr_ratio=2"])
    load_recipe(RECIPES / "dreambooth_lora.yaml", STAR + ["lora.loraplus_text_encoder_lr_ratio=2", "dreambooth.train_text_encoder=true"])
