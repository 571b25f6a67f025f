"""What a trained LoRA records of its data, in sd-scripts' forms: images per epoch, each folder's images and
repeats, and its captions' tag counts, which the webui's LoRA metadata editor and LoRA managers offer as the
LoRA's trigger words; carried through the kohya export and import, and shown in the model card."""

import json

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.formats.lora_export import export_lora
from finetune.formats.kohya_metadata import finetune_metadata_from_kohya
from finetune.training.trainer import train


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
    from finetune.formats.model_card import frequent_tags

    assert frequent_tags(None) is None and frequent_tags("{oops") is None and frequent_tags('{"dir": 3}') is None and frequent_tags("{}") is None
    assert frequent_tags('{"a": {"x|y": 2, "z": 1}, "b": {"z": 2}}') == "z (3), x\\|y (2)"  # over all folders; | kept out of the table


def test_caption_tags_can_be_left_out_of_the_files(make_recipe, tmp_path):
    result = train(make_recipe(output_dir=str(tmp_path / "private"), train__max_steps=1, checkpoint__record_caption_tags=False))
    metadata = metadata_of(result.output_dir / LORA_WEIGHTS_NAME)
    assert "finetune.tag_frequency" not in metadata and metadata["finetune.num_train_images"] == "4"


def test_folders_of_one_name_stay_apart_and_tags_are_capped():
    from finetune.data.sources import Example
    from finetune.outputs.metadata import MAX_TAGS_PER_FOLDER, dataset_metadata

    def image(path, caption, repeats=1):
        return Example(path, caption, lambda: None, repeats=repeats)

    items = [image("/data/a/img/1.png", "sks, dog", 2), image("/data/a/img/1.png", "sks, dog", 2), image("/data/b/img/2.png", "cat")]
    recorded = dataset_metadata(items)
    assert json.loads(recorded["finetune.dataset_dirs"]) == {"a/img": {"n_repeats": 2, "img_count": 1}, "b/img": {"n_repeats": 1, "img_count": 1}}
    assert json.loads(recorded["finetune.tag_frequency"]) == {"a/img": {"sks": 1, "dog": 1}, "b/img": {"cat": 1}}
    many = [image(f"/data/c/{i}.png", f"caption number {i}") for i in range(MAX_TAGS_PER_FOLDER + 50)]
    assert len(json.loads(dataset_metadata(many)["finetune.tag_frequency"])["c"]) == MAX_TAGS_PER_FOLDER
    assert "finetune.tag_frequency" not in dataset_metadata(items, with_tags=False)


def test_tags_are_counted_per_caption_line_where_training_splits_lines():
    """A caption's lines are split only at line ends (LF, CRLF, CR), as training splits them: a U+2028 inside a tag
    is part of that one caption line, which str.splitlines cut into two tags."""
    from finetune.data.sources import Example
    from finetune.outputs.metadata import dataset_metadata

    items = [Example("/data/d/1.png", "sks, red\u2028dog\nsks, cat", lambda: None)]
    assert json.loads(dataset_metadata(items)["finetune.tag_frequency"]) == {"d": {"sks": 1, "red\u2028dog": 1, "cat": 1}}


def test_a_keep_tokens_separator_parts_tags_as_a_comma_does():
    """With data.keep_tokens_separator '|||', 'sks, dog ||| grass' trains the tags sks, dog and grass: its tag counts
    (trigger words in LoRA managers) recorded 'dog ||| grass' as one tag."""
    from finetune.data.sources import Example
    from finetune.outputs.metadata import dataset_metadata

    items = [Example("/data/e/1.png", "sks, dog ||| grass|||sunny", lambda: None)]
    assert json.loads(dataset_metadata(items, tag_separator="|||")["finetune.tag_frequency"]) == {"e": {"sks": 1, "dog": 1, "grass": 1, "sunny": 1}}


def test_images_linked_into_a_data_folder_are_recorded_under_its_name(tmp_path):
    """A data folder of links into a photo library was recorded under the library's folders (2019, 2020), not its own."""
    from finetune.data.sources import Example
    from finetune.outputs.metadata import dataset_metadata

    folder = tmp_path / "data" / "10_sks dog"
    folder.mkdir(parents=True)
    for year in ("2019", "2020"):
        (tmp_path / "library" / year).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "library" / year / f"{year}.png")
        (folder / f"{year}.png").symlink_to(tmp_path / "library" / year / f"{year}.png")
    items = [Example(str(folder / f"{year}.png"), "sks dog", lambda: None, repeats=10) for year in ("2019", "2020")]
    assert json.loads(dataset_metadata(items)["finetune.dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2}}


def test_the_kohya_export_writes_the_data_once_and_an_import_reads_it_back(tmp_path):
    from finetune.formats.kohya import LoRA, LoRALayer, load_lora, save_lora_file
    from finetune.formats.model_card import frequent_tags

    metadata = {"finetune.tag_frequency": json.dumps({"img": {"sks": 3}}), "finetune.num_train_images": "3", "finetune.resolution": "512"}
    layers = {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": LoRALayer(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)}
    path = save_lora_file(LoRA(layers, metadata), tmp_path / "x.safetensors", "kohya")
    written = metadata_of(path)
    assert "finetune.tag_frequency" not in written and written["ss_tag_frequency"] == metadata["finetune.tag_frequency"]
    assert written["ss_resolution"] == "(512, 512)"
    read = load_lora(path).metadata
    assert read["finetune.tag_frequency"] == metadata["finetune.tag_frequency"] and read["finetune.num_train_images"] == "3"
    assert finetune_metadata_from_kohya({"ss_resolution": "(768, 768)"})["finetune.resolution"] == "768"
    assert frequent_tags('{"a": {"t": Infinity}}') is None and frequent_tags('{"a": {"two\\nlines": 2}}') == "two lines (2)"


def test_a_runs_lora_records_its_tags_parted_at_its_keep_tokens_separator(make_recipe):
    """The trainer hands data.keep_tokens_separator to the tag counts (the test above: the counting itself)."""
    from safetensors import safe_open

    from finetune.training.trainer import train

    result = train(make_recipe(train__max_steps=1, data__caption="sks, dog ||| grass", data__shuffle_tags=True, data__keep_tokens_separator="|||"))
    with safe_open(str(result.saved_files[0]), "np") as f:
        counted = json.loads(f.metadata()["finetune.tag_frequency"])
    assert [set(tags) for tags in counted.values()] == [{"sks", "dog", "grass"}], counted
