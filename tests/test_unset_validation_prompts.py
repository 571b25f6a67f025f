"""validation.prompts: null (finetune/sampling/unset_prompts.py): the grids sample prompts of the training data, not a
recipe's examples that show nothing of it; said in one line at the run's start. Explicit prompts sample as before."""

from pathlib import Path

import pytest
from PIL import Image

import finetune.methods.base
from finetune.config.recipe_loading import load_recipe
from finetune.errors import FinetuneError
from finetune.sampling.unset_prompts import CAPTION_PROMPTS
from finetune.training.trainer import train

RECIPES = Path(__file__).parent.parent / "recipes"


def sampled_prompts(monkeypatch) -> list[str]:
    """The prompts the run's validation grids draw (each drawn as one blank image)."""
    drawn = []

    def generate(pipeline, settings, *args, **kwargs):
        drawn.extend(prompt.prompt for prompt in settings)
        return [[Image.new("RGB", (64, 64))] for _ in settings]

    monkeypatch.setattr(finetune.methods.base, "generate_with_settings", generate)
    return drawn


def test_unset_prompts_sample_the_first_distinct_captions_and_say_so(make_recipe, image_folder, monkeypatch, capsys):
    drawn = sampled_prompts(monkeypatch)
    train(make_recipe(validation__prompts=None, validation__at_start=False, train__max_steps=1))
    captions = []
    for path in sorted(image_folder.glob("*.txt")):  # the folder's captions in the order the data check lists its images
        if (text := path.read_text().strip()) not in captions:
            captions.append(text)
    expected = captions[:CAPTION_PROMPTS]
    assert len(expected) == CAPTION_PROMPTS and drawn == expected  # the final grid's rows
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation prompts:")]
    assert len(lines) == 1 and lines[0].startswith(f"validation prompts: {CAPTION_PROMPTS} captions of the training set (validation.prompts unset): ")
    assert all(f"'{text[:40]}" in lines[0] for text in expected)  # each named (a long one shortened)


def test_listed_prompts_sample_as_they_were(make_recipe, monkeypatch, capsys):
    drawn = sampled_prompts(monkeypatch)
    train(make_recipe(validation__prompts=["a star --d 3"], validation__at_start=False, train__max_steps=1))
    assert drawn == ["a star"]
    assert "validation prompts:" not in capsys.readouterr().out


def test_the_shipped_lora_recipe_leaves_them_unset_without_a_warning(capsys):
    """Its sampling settings sample (the captions): not 'nothing without validation.prompts'."""
    recipe = load_recipe(RECIPES / "lora.yaml", ["data.image_dir=somewhere"])
    assert recipe.validation.prompts is None and recipe.samples_unset_prompts
    assert capsys.readouterr().err == ""


def test_unset_prompts_are_bounded_in_the_grid_and_checked_with_the_sections_sampler(make_recipe):
    with pytest.raises(FinetuneError, match="validation.images_per_prompt"):
        make_recipe(validation__prompts=None, validation__images_per_prompt=100_000)
    with pytest.raises(FinetuneError, match="validation.num_inference_steps with validation.sampler"):
        make_recipe(validation__prompts=None, validation__sampler="dpmpp_2m", validation__num_inference_steps=999)


def test_a_controlnet_is_told_to_list_its_prompts(make_recipe, pairs_folder):
    with pytest.raises(FinetuneError, match="validation.prompts: null .* method controlnet pairs each prompt with a conditioning image"):
        make_recipe(method="controlnet", data__image_dir=str(pairs_folder), data__caption_dropout=0.0, validation__prompts=None)
