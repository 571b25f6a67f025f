"""Sizes and counts that would hang a run or exhaust memory without a word, refused in one line naming the key
where the recipe loads (before any model loads or image is read)."""

import pytest

from finetune.cli.main import main
from finetune.config.recipe_loading import recipe_from_dict
from finetune.errors import FinetuneError

MAX_RESOLUTION = 4096  # finetune.data.image_bounds.MAX_RESOLUTION
RESOLUTION_BOUND = (f"must be at most {MAX_RESOLUTION} (SD1.5 trains at 512, SDXL at 1024; one image's VAE pass alone holds some 2.5 KB "
                    "per pixel): lower it")  # fmt: skip


@pytest.mark.parametrize("resolution", [10**6, 5120])
def test_a_resolution_past_the_bound_is_refused_where_the_recipe_loads(resolution):
    """data.resolution: 1000000 resized each image to 3 TB once the model had loaded; 5120 is 512 with a 0 too many."""
    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict({"data": {"image_dir": "x", "resolution": resolution}})
    assert str(raised.value) == f"recipe: key 'data.resolution': {RESOLUTION_BOUND} (got {resolution})"
    assert recipe_from_dict({"data": {"image_dir": "x", "resolution": MAX_RESOLUTION}}).data.resolution == MAX_RESOLUTION


def test_check_data_refuses_a_resolution_past_the_bound_before_reading_images(tmp_path, capsys):
    assert main(["check-data", "--image-dir", str(tmp_path / "not-there"), "--resolution", str(10**6)]) != 0
    assert capsys.readouterr().err.strip() == f"error: check-data: --resolution: {RESOLUTION_BOUND} (got {10**6})"


def test_class_images_past_five_digit_names_are_refused_where_the_recipe_loads():
    """dreambooth.num_class_images: 10**9 listed and looked for every generated name before the model loaded (12 s and 0.8 GB
    a million); image 100,000 on would be named in 6 digits and read back as a user's own class image."""
    from pathlib import Path

    from finetune.dreambooth.class_image_names import is_generated_name

    raw = {"method": "dreambooth", "dreambooth": {"concepts": [{"instance_dir": "x", "instance_prompt": "sks dog", "class_prompt": "a dog"}]}}
    raw["dreambooth"]["num_class_images"] = 10**9
    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict(raw)
    assert str(raised.value) == ("recipe: key 'dreambooth.num_class_images': must be at most 100,000 per concept (generated class images are "
                                 f"numbered in 5 digits): lower it (got {10**9})")  # fmt: skip
    raw["dreambooth"]["num_class_images"] = 100_000
    assert recipe_from_dict(raw).dreambooth.num_class_images == 100_000
    # The last image the bound allows is read back as generated; the next would not be.
    assert is_generated_name(Path("0123456789-99999.png")) and not is_generated_name(Path("0123456789-100000.png"))


def test_a_class_image_batch_past_the_pixels_of_the_largest_image_is_refused_where_the_recipe_loads():
    """dreambooth.class_generation.batch_size: 1000000 had one call hold every missing image (on a CPU nothing halves it):
    a call makes at most the pixels of its default batch, 4, at the largest data.resolution, 4096 px."""
    concept = {"instance_dir": "x", "instance_prompt": "sks dog", "class_prompt": "a dog"}

    def recipe(batch_size, resolution=512, prior_preservation=True):
        return recipe_from_dict({"method": "dreambooth", "data": {"resolution": resolution}, "dreambooth": {
            "concepts": [concept], "prior_preservation": prior_preservation, "class_generation": {"batch_size": batch_size}}})  # fmt: skip

    largest = 4 * (MAX_RESOLUTION // 512) ** 2  # 256 images of 512 px
    with pytest.raises(FinetuneError) as raised:
        recipe(largest + 1)
    assert str(raised.value) == (f"recipe: dreambooth.class_generation.batch_size ({largest + 1}) makes {largest + 1} class images of 512 px in "
                                 f"one call, more pixels than its default, 4, at the largest data.resolution ({MAX_RESOLUTION} px; each image's "
                                 f"VAE pass alone holds some 2.5 KB per pixel): lower it to {largest} or less")  # fmt: skip
    assert recipe(largest).dreambooth.class_generation.batch_size == largest
    assert recipe(4 * largest, resolution=256).dreambooth.class_generation.batch_size == 4 * largest  # four times the images of a quarter the pixels
    default = recipe_from_dict({"method": "dreambooth", "data": {"resolution": MAX_RESOLUTION}, "dreambooth": {"concepts": [concept]}})
    assert default.dreambooth.class_generation.batch_size == 4  # the default fits every resolution
    with pytest.raises(FinetuneError, match=r"lower it to 4 or less$"):
        recipe(5, resolution=MAX_RESOLUTION)
    assert recipe(10**6, prior_preservation=False).dreambooth.class_generation.batch_size == 10**6  # no class images made: said to do nothing


def test_a_validation_grid_finetune_could_not_open_is_refused_where_the_recipe_loads():
    """validation.images_per_prompt: 1000000 sampled for days, every image held in memory, before drawing a grid past
    the pixels PIL opens in finetune (twice finetune.data.images.TRUSTED_IMAGE_PIXELS)."""
    from finetune.data.images import TRUSTED_IMAGE_PIXELS

    def recipe(images_per_prompt, method="lora", prompts=("a dog",)):
        return recipe_from_dict({"method": method, "data": {"image_dir": "x", "resolution": 512},
                                 "validation": {"prompts": list(prompts), "images_per_prompt": images_per_prompt}})  # fmt: skip

    with pytest.raises(FinetuneError) as raised:
        recipe(10**6)
    assert str(raised.value) == ("recipe: validation.images_per_prompt (1000000) with 1 prompt row at 512 px makes a 512000160x512 validation grid, "
                                 "more than the 600,000,000 pixels finetune opens (PIL refuses larger images as decompression bombs): lower "
                                 "validation.images_per_prompt")  # fmt: skip
    assert 2 * TRUSTED_IMAGE_PIXELS == 600_000_000
    largest = (600_000_000 // 512 - 160) // 512  # 2288 images of 512 px and the label margin in one 512 px row
    assert recipe(largest).validation.images_per_prompt == largest
    with pytest.raises(FinetuneError, match=r"with 2 prompt rows at 512 px .* or list fewer validation.prompts$"):
        recipe(largest, prompts=("a dog", "a cat"))
    with pytest.raises(FinetuneError, match=r"makes a 1172128x512 validation grid"):  # a ControlNet's rows start with their conditioning image
        recipe(largest, method="controlnet")


def test_sample_refuses_a_resolution_past_the_recipes_bound_before_the_model_loads(tmp_path, capsys):
    """sample --resolution 100000 made one image of 10 gigapixels once the model had loaded, until memory ran out."""
    from finetune.cli.arguments import parse_arguments

    with pytest.raises(SystemExit):
        parse_arguments(["sample", "--base", str(tmp_path / "not-there"), "--prompt", "a dog", "--resolution", "5120"])
    assert capsys.readouterr().err.splitlines()[-1] == f"finetune sample: error: argument --resolution: {RESOLUTION_BOUND} (got 5120)"
    assert parse_arguments(["sample", "--prompt", "a dog", "--resolution", str(MAX_RESOLUTION)]).resolution == MAX_RESOLUTION


def test_sample_refuses_a_grid_past_the_recipes_bound_before_the_model_loads(tmp_path, capsys):
    """--num-images 1000000 sampled for days, every image held in memory, before drawing a grid no one could open; with
    --resolution given it is said before the base is even looked for (here: a base that is not there)."""
    base = str(tmp_path / "not-there")
    assert main(["sample", "--base", base, "--prompt", "a", "--prompt", "b", "--num-images", str(10**6), "--resolution", "512"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --num-images (1000000) with 2 prompt rows at 512 px makes a 512000160x1024 grid, more than "
                                               "the 600,000,000 pixels finetune opens (PIL refuses larger images as decompression bombs): lower "
                                               "--num-images or --resolution, or give fewer --prompt")  # fmt: skip
    largest = (600_000_000 // 512 - 160) // 512  # as validation.images_per_prompt's
    assert main(["sample", "--base", base, "--prompt", "a", "--num-images", str(largest), "--resolution", "512"]) == 2
    assert "not found" in capsys.readouterr().err  # past the grid's check: the base's
    assert main(["sample", "--base", base, "--prompt", "a", "--num-images", str(largest), "--resolution", "512", "--controlnet", base,
                 "--condition", base]) == 2  # fmt: skip
    assert "makes a 1172128x512 grid" in capsys.readouterr().err  # the --condition starts the row


def test_sample_and_eval_check_the_grid_at_the_models_own_resolution_before_any_image(tiny_model, tmp_path, capsys):
    """Without --resolution (and in eval, which samples at the model's own) the grid is checked at the model's own
    side, before any image is made: the tiny model samples at 64 px (read from its configs, test_native_resolution)."""
    assert main(["sample", "--base", str(tiny_model), "--prompt", "a", "--num-images", str(10**7), "--out", str(tmp_path / "s")]) == 2
    assert "error: --num-images (10000000) with 1 prompt row at 64 px makes a 640000160x64 grid" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    out = tmp_path / "e" / "eval.json"
    assert main(["eval", "--base", str(tiny_model), "--suite", "adherence", "--images-per-prompt", str(10**6), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("--images-per-prompt (1000000) with 8 prompt rows at 64 px makes a 64000160x512 report grid, "
                                                    "more than the 600,000,000 pixels finetune opens (PIL refuses larger images as decompression "
                                                    "bombs): lower --images-per-prompt")  # fmt: skip
    assert not out.parent.exists()


@pytest.mark.parametrize("key, value", [("max_steps", 1.0e14), ("max_epochs", 10**9), ("gradient_accumulation_steps", 10**6)])
def test_a_run_length_or_accumulation_no_run_ends_is_refused_where_the_recipe_loads(key, value):
    """train.max_steps: 1.0e+14 (YAML's float) or an accumulation of a million micro-batches a step started a run that never
    ended, without a word; the bounds are past any fine-tune."""
    train = {"max_steps": None, key: value} if key == "max_epochs" else {key: value}
    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict({"data": {"image_dir": "x"}, "train": train})
    bound = ("must be at most 10,000 micro-batches a step (each optimizer step trains them all): lower it, or raise train.batch_size"
             if key == "gradient_accumulation_steps" else
             "must be at most 100,000,000 (10 a second is some 4 months; more is a typo, not a fine-tune): lower it")  # fmt: skip
    assert str(raised.value) == f"recipe: key 'train.{key}': {bound} (got {value})"
    largest = 10_000 if key == "gradient_accumulation_steps" else 100_000_000
    assert getattr(recipe_from_dict({"data": {"image_dir": "x"}, "train": {**train, key: largest}}).train, key) == largest


def test_epochs_that_make_more_steps_than_the_bound_are_refused_once_the_data_is_counted():
    """train.max_epochs is within its bound, but its steps of this data are not: one line before any model loads."""
    from finetune.training.run_length import EpochCount, check_epoch_run, planned_steps

    recipe = recipe_from_dict({"data": {"image_dir": "x"}, "train": {"max_steps": None, "max_epochs": 10**6}})
    count = EpochCount(accumulation=1, batches_per_epoch=1000)  # 1000 batches an epoch: 10**9 steps
    with pytest.raises(FinetuneError) as raised:
        check_epoch_run(recipe, planned_steps(recipe.train, count), count, None)
    assert str(raised.value) == ("train.max_epochs (1000000) is 1,000,000,000 steps of this data, more than the 100,000,000 a run may have "
                                 "(train.max_steps' bound): lower it")
    check_epoch_run(recipe, planned_steps(recipe.train, EpochCount(accumulation=10, batches_per_epoch=1000)), count, None)  # 10**8 steps
