"""Recipe settings that load but do nothing with the others: one `warning:` line each as the recipe loads
(the shipped recipes name them, so they are not errors)."""

from pathlib import Path

import pytest

from finetune.config.recipe_loading import load_recipe
from finetune.errors import FinetuneError

RECIPES = Path(__file__).parent.parent / "recipes"
STAR = [f"dreambooth.concepts.0.instance_dir={RECIPES.parent / 'datasets' / 'star'}"]


def test_class_settings_without_prior_preservation_are_named_in_one_warning(capsys):
    load_recipe(RECIPES / "dreambooth.yaml", STAR + ["dreambooth.prior_preservation=false"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: dreambooth.prior_preservation is false, so ")
    for key in ("dreambooth.prior_loss_weight", "dreambooth.num_class_images", "dreambooth.class_generation", "dreambooth.concepts.0.class_prompt"):
        assert key in lines[0]
    assert "class_dir" not in lines[0]  # null in the shipped recipe: no setting of the user's
    load_recipe(RECIPES / "dreambooth.yaml", STAR)
    assert capsys.readouterr().err == ""


def test_an_instance_prompt_with_captions_is_named_as_unused(capsys):
    load_recipe(RECIPES / "dreambooth.yaml", STAR + ["dreambooth.concepts.0.use_captions=true"])
    assert capsys.readouterr().err == (
        "warning: dreambooth.concepts.0.instance_prompt is unused with use_captions: true (each image's caption is its prompt): "
        "set use_captions: false to train with it\n"
    )


def test_a_subject_no_validation_prompt_names_is_warned_of(capsys):
    """instance_prompt 'a photo of zwx cat' given on the command line, the recipe's validation prompts ('a photo of sks dog
    in a bucket') left as they were: every grid sampled prompts that cannot show the subject, without a word."""
    bucket = ["validation.prompts=[a photo of sks dog in a bucket, a photo of a dog]"]  # listed: the recipe's own (null) follow the instance prompt
    load_recipe(RECIPES / "dreambooth_lora.yaml", STAR + bucket + ["dreambooth.concepts.0.instance_prompt=a photo of zwx cat"])
    assert capsys.readouterr().err == (
        "warning: validation.prompts: none of 'a photo of sks dog in a bucket', 'a photo of a dog' names dreambooth.concepts.0's subject "
        "('zwx cat', the words of its instance_prompt that no class prompt has): the grids cannot show it; add one such as 'a photo of zwx cat', "
        "or set validation.prompts: null to sample the instance and class prompts\n"
    )
    # the class prompt changed with it: the identifier alone; a prompt naming it (with its own options) is enough
    zwx_cat = STAR + ["dreambooth.concepts.0.instance_prompt=a photo of zwx cat", "dreambooth.concepts.0.class_prompt=a photo of a cat"]
    load_recipe(RECIPES / "dreambooth_lora.yaml", zwx_cat + bucket)
    assert "('zwx', the words" in capsys.readouterr().err
    load_recipe(RECIPES / "dreambooth_lora.yaml", zwx_cat + ["validation.prompts=[a zwx cat on a sofa --d 3, a photo of a cat]"])
    assert capsys.readouterr().err == ""


def test_an_empty_recipe_says_so(tmp_path, capsys):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# method: lora\n")
    with pytest.raises(FinetuneError, match=r"empty.yaml is empty \(or only comments\): write its settings"):
        load_recipe(recipe)  # was: set exactly one of data.image_dir ..., as if the file had been read
    load_recipe(recipe, [f"data.image_dir={RECIPES.parent / 'datasets' / 'star'}"])
    assert capsys.readouterr().err == f"warning: recipe {recipe} is empty (or only comments): every setting not given on the command line is its default\n"


def test_bucket_sizes_without_bucketing_and_sampling_settings_without_prompts_are_warned_of(capsys):
    load_recipe(RECIPES / "lora.yaml", ["data.bucketing.max_side=1024", "data.bucketing.step=32"])
    assert capsys.readouterr().err == (
        "warning: data.bucketing.step, data.bucketing.max_side do nothing with bucketing off: set data.bucketing.enabled: true to use them\n"
    )
    load_recipe(RECIPES / "lora.yaml", ["validation.prompts=[]"])  # lora.yaml samples every 250 steps, 2 images a prompt
    assert capsys.readouterr().err == (
        "warning: validation.every_n_steps does nothing without validation.prompts (nothing is sampled): add prompts to sample them\n"
    )
    load_recipe(RECIPES / "lora.yaml", ["validation.prompts=[]", "validation.loss_images=2", "validation.guidance_scale=5"])
    assert capsys.readouterr().err == (  # the held-out loss is scored every 250 steps
        "warning: validation.guidance_scale does nothing without validation.prompts (nothing is sampled): add prompts to sample them\n"
    )


def test_the_shipped_recipes_load_without_warnings(capsys):
    for recipe in sorted(RECIPES.rglob("*.yaml")):  # toyworld/ too
        load_recipe(recipe, STAR if recipe.name.startswith("dreambooth") else [])
    assert capsys.readouterr().err == ""
