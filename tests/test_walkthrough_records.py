"""Optimizer defaults, what a checkpoint records of its training data, the cache's key, and counts in messages."""

import pytest
import torch

from finetune.config import OptimizerConfig
from finetune.optim.optimizers import apply_recipe_settings, build_lr_scheduler, build_optimizer

# Each library's own defaults (bitsandbytes' Lion8bit and the Lion paper: 0.9, 0.99).
LIBRARY_BETAS = {"adamw": (0.9, 0.999), "adamw8bit": (0.9, 0.999), "paged_adamw8bit": (0.9, 0.999), "lion8bit": (0.9, 0.99), "prodigy": (0.9, 0.999)}


@pytest.mark.parametrize("name", sorted(LIBRARY_BETAS))
def test_a_recipe_without_betas_gets_the_optimizers_own(name):
    """Every optimizer was given AdamW's betas, so Lion decayed its momentum with 0.999 instead of its own 0.99."""
    weight = torch.nn.Parameter(torch.randn(64, 64))
    config = OptimizerConfig(name=name, lr=1.0 if name == "prodigy" else 1e-4)
    optimizer = build_optimizer(config, [weight])
    assert tuple(optimizer.param_groups[0]["betas"]) == LIBRARY_BETAS[name]
    # A resume applies the recipe's betas over the checkpoint's: the same ones.
    optimizer.param_groups[0]["betas"] = (0.5, 0.5)
    apply_recipe_settings(optimizer, build_lr_scheduler(config, optimizer, 10), [config.lr], config)
    assert tuple(optimizer.param_groups[0]["betas"]) == LIBRARY_BETAS[name]


def test_betas_a_recipe_names_are_used_and_the_saved_recipe_says_which_trained():
    weight = torch.nn.Parameter(torch.randn(8))
    named = build_optimizer(OptimizerConfig(name="lion8bit", betas=(0.95, 0.98)), [weight])
    assert tuple(named.param_groups[0]["betas"]) == (0.95, 0.98)
    assert OptimizerConfig(name="lion8bit").model_dump(mode="json")["betas"] == [0.9, 0.99]
    assert OptimizerConfig().model_dump(mode="json")["betas"] == [0.9, 0.999]


def _resume_lines(recipe_at, capsys, change) -> tuple[str, str]:
    """The console of a resume with nothing changed, and of one after `change()`."""
    from finetune.training.trainer import train

    train(recipe_at(2))
    capsys.readouterr()
    train(recipe_at(3), resume="latest")
    unchanged = capsys.readouterr().out
    change()
    train(recipe_at(4), resume="latest")
    return unchanged, capsys.readouterr().out


def _repaint(path) -> None:
    """The same size, other pixels."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    Image.new("RGB", image.size, (10, 200, 30)).save(path)


def test_a_resume_says_when_the_controlnet_conditioning_images_changed(make_recipe, pairs_folder, tmp_path, capsys):
    """The record of the trained data kept the images and captions only: a conditioning image redrawn (another
    detector, other thresholds) changed what the ControlNet learns, and the resume said nothing."""
    import shutil

    folder = shutil.copytree(pairs_folder, tmp_path / "pairs")
    conditioning = sorted((folder / "conditioning").iterdir())[0]

    def recipe_at(steps):
        return make_recipe(method="controlnet", data__image_dir=str(folder), train__max_steps=steps, train__batch_size=1)

    unchanged, changed = _resume_lines(recipe_at, capsys, lambda: _repaint(conditioning))
    assert "warning: settings changed" not in unchanged
    assert "warning: settings changed since checkpoint-3: conditioning images 4 -> 4 (other images)" in changed


def test_a_resume_says_when_the_dreambooth_class_images_changed(make_recipe, image_folder, tmp_path, capsys):
    """Nor did it keep DreamBooth's class images: one replaced in the class folder changed the prior, unsaid."""
    from PIL import Image

    class_dir = tmp_path / "classes"
    class_dir.mkdir()
    for index, colour in enumerate(("blue", "red")):
        Image.new("RGB", (64, 64), colour).save(class_dir / f"own-{index}.png")
    concept = {"instance_dir": str(image_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(class_dir)}

    def recipe_at(steps):
        return make_recipe(method="dreambooth", data__image_dir=None, dreambooth={"concepts": [concept], "num_class_images": 2},
                           train__batch_size=1, train__max_steps=steps)  # fmt: skip

    unchanged, changed = _resume_lines(recipe_at, capsys, lambda: _repaint(class_dir / "own-1.png"))
    assert "warning: settings changed" not in unchanged
    assert "warning: settings changed since checkpoint-3: class images 2 -> 2 (other images or prompts)" in changed



def test_a_resume_says_when_the_loss_masks_changed(make_recipe, tmp_path, capsys):
    """Nor its loss masks (data.loss_mask): a mask redrawn to train another part of an image, unsaid."""
    from PIL import Image
    from test_loss_mask import masked_folder

    folder = masked_folder(tmp_path / "data")

    def recipe_at(steps):
        return make_recipe(data__image_dir=str(folder), data__loss_mask={"source": "files"}, train__max_steps=steps)

    flipped = lambda: Image.open(folder / "masks" / "0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "masks" / "0.png")
    unchanged, changed = _resume_lines(recipe_at, capsys, flipped)
    assert "warning: settings changed" not in unchanged
    assert "warning: settings changed since checkpoint-3: loss masks 4 -> 4 (other masks)" in changed

def test_a_checkpoint_that_kept_no_record_of_a_kind_of_data_is_no_change():
    """Checkpoints made before conditioning and class images were recorded: nothing to compare them with."""
    from finetune.checkpoints.resume_changes import changed_data, data_record

    older = data_record([])
    assert changed_data(older, data_record([], {"class images": [["abc", "a dog"]]})) == []
    assert changed_data(data_record([], {"class images": []}), data_record([], {"class images": [["abc", "a dog"]]})) == ["class images 0 -> 1"]


def test_another_tokenizer_with_the_same_text_encoder_makes_another_text_cache(make_recipe, tiny_model, tmp_path, monkeypatch):
    """The disk cache's text folder was named by the text encoder's weights only: a base whose tokenizer pads with
    "!" (as SD2's does) instead of the end token was served the other tokenizer's embeddings."""
    import json
    import shutil

    import finetune.methods.base as base_module
    from finetune.training.trainer import train

    model = shutil.copytree(tiny_model, tmp_path / "model")
    settings = dict(train__max_steps=1, train__cache_text_embeddings=True, train__cache_dir=str(tmp_path / "cache"))
    train(make_recipe(output_dir=str(tmp_path / "a"), model__pretrained=str(model), **settings))
    config_file = model / "tokenizer" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "pad_token": "!"}))
    encoded = []
    original = base_module.encode_prompts
    monkeypatch.setattr(base_module, "encode_prompts", lambda *args, **kwargs: encoded.append(1) or original(*args, **kwargs))
    train(make_recipe(output_dir=str(tmp_path / "b"), model__pretrained=str(model), **settings))
    assert encoded and len(list((tmp_path / "cache").glob("text-*"))) == 2


def test_the_tokenizers_part_of_the_fingerprint_does_not_follow_its_last_call(tiny_model):
    """transformers keeps the last call's padding and truncation in the tokenizer: not the tokenizer's own."""
    from transformers import CLIPTokenizer

    from finetune.data.cache import model_fingerprint
    from finetune.models.encoders import tokenize

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    encoder = torch.nn.Linear(2, 2)
    before = model_fingerprint(encoder, tokenizer)
    tokenize(tokenizer, ["a red circle"])
    assert model_fingerprint(encoder, tokenizer) == before != model_fingerprint(encoder)


def test_a_count_of_one_takes_the_singular():
    from finetune.counts import counted
    from finetune.training.run_length import epochs_text

    assert [counted(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert counted(1, "entry", "entries") == "1 entry" and counted(3, "entry", "entries") == "3 entries"
    assert [epochs_text(e) for e in (1.0, 1.5, 0.5, 2000.0)] == ["1 epoch", "1.5 epochs", "0.5 epochs", "2000 epochs"]


def test_the_run_length_says_one_image_and_the_last_checkpoint_is_announced_as_the_others(make_recipe, capsys):
    """'length: 4 steps of 1 images = 1 epochs of 4 images'; and a checkpoint saved during the run said
    'saved ...checkpoint-2 (step 2, 0.5 epochs)' while the one the run ends with was saved without a word."""
    from pathlib import Path

    from finetune.training.trainer import train

    recipe = make_recipe(train__batch_size=1, train__max_steps=4, checkpoint__every_n_steps=2)
    train(recipe)
    lines = capsys.readouterr().out.splitlines()
    assert "length: 4 steps of 1 image = 1 epoch of 4 images" in lines
    checkpoints = Path(recipe.output_dir) / "checkpoints"
    assert [line for line in lines if line.startswith("saved") and "checkpoint-" in line] == [
        f"saved {checkpoints / 'checkpoint-2'} (step 2, 0.5 epochs)", f"saved {checkpoints / 'checkpoint-4'} (step 4, 1 epoch)"]


def test_too_small_a_dataset_is_counted_in_the_singular():
    from finetune.data.batches import EpochBatchSampler
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=r"^the dataset has 1 image, fewer than one global batch \(2 x 1 process\): "):
        EpochBatchSampler(1, 2, 1, 0, 0)


def test_one_training_image_short_of_a_batch_is_counted_in_the_singular(make_recipe):
    from finetune.data.buckets import too_few_to_batch

    assert too_few_to_batch(1, make_recipe(train__batch_size=2)).startswith("1 training image (repeats counted) is fewer than one batch (train.batch_size 2)")
