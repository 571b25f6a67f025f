"""What a trained LoRA records of its data, in sd-scripts' forms: images per epoch, each folder's images and
repeats, and its captions' tag counts, which the webui's LoRA metadata editor and LoRA managers offer as the
LoRA's trigger words; carried through the kohya export and import, and shown in the model card."""

import json

import numpy as np
from PIL import Image
from safetensors import safe_open

from finetune.kohya import export_lora, finetune_metadata_from_kohya
from finetune.methods.lora import LORA_WEIGHTS_NAME
from finetune.trainer import train


def metadata_of(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_lora_records_its_folders_and_caption_tags_as_sd_scripts_does(make_recipe, tmp_path):
    data = tmp_path / "data"
    captions = {"10_sks/a": "sks, dog, grass", "10_sks/b": "sks,dog , sks", "reg/c": "a photo of a dog"}
    for i, (name, caption) in enumerate(captions.items()):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(caption)
    folders = [{"path": "10_sks", "repeats": 2}, {"path": "reg"}]
    result = train(make_recipe(output_dir=str(tmp_path / "run"), data__image_dir=str(data), data__folders=folders, train__max_steps=1))

    metadata = metadata_of(result.output_dir / LORA_WEIGHTS_NAME)
    assert metadata["finetune.num_train_images"] == "5"  # uses per epoch: 2 images x 2 repeats, and 1
    assert json.loads(metadata["finetune.dataset_dirs"]) == {"10_sks": {"n_repeats": 2, "img_count": 2}, "reg": {"n_repeats": 1, "img_count": 1}}
    # Each tag once per image (a repeat, or a tag written twice, counts once); a caption without commas is one tag.
    tags = {"10_sks": {"sks": 2, "dog": 2, "grass": 1}, "reg": {"a photo of a dog": 1}}
    assert json.loads(metadata["finetune.tag_frequency"]) == tags

    kohya_file, card, _ = export_lora(result.output_dir, tmp_path / "webui", "kohya")
    exported = metadata_of(kohya_file)
    assert json.loads(exported["ss_tag_frequency"]) == tags and exported["ss_num_train_images"] == "5"
    assert json.loads(exported["ss_dataset_dirs"])["10_sks"] == {"n_repeats": 2, "img_count": 2} and exported["ss_resolution"] == "(64, 64)"
    assert "| most frequent caption tags | sks (2), dog (2), grass (1), a photo of a dog (1) |" in card.read_text()
    # An sd-scripts LoRA's tags come along on import (and so into our cards and exports).
    assert finetune_metadata_from_kohya({"ss_tag_frequency": exported["ss_tag_frequency"]})["finetune.tag_frequency"] == exported["ss_tag_frequency"]


def test_the_cards_tag_row_survives_other_trainers_metadata():
    from finetune.model_card import frequent_tags

    assert frequent_tags(None) is None and frequent_tags("{oops") is None and frequent_tags('{"dir": 3}') is None and frequent_tags("{}") is None
    assert frequent_tags('{"a": {"x|y": 2, "z": 1}, "b": {"z": 2}}') == "z (3), x\\|y (2)"  # over all folders; | kept out of the table


def test_caption_tags_can_be_left_out_of_the_files(make_recipe, tmp_path):
    result = train(make_recipe(output_dir=str(tmp_path / "private"), train__max_steps=1, checkpoint__record_caption_tags=False))
    metadata = metadata_of(result.output_dir / LORA_WEIGHTS_NAME)
    assert "finetune.tag_frequency" not in metadata and metadata["finetune.num_train_images"] == "4"
