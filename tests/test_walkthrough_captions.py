"""From a walkthrough of how images and captions become batches, as a user of sd-scripts or SimpleTuner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from data_examples import load_examples
from finetune.config.recipe_loading import load_recipe
from finetune.errors import FinetuneError
from finetune.training.trainer import train
from conftest import SHIPPED_BASE  # a base check-data finds offline (the default hub id is in no cache)


def _unknown_key_message(tmp_path, override: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text("data: {image_dir: x}\n")
    with pytest.raises(FinetuneError) as raised:
        load_recipe(path, [override])
    return str(raised.value)


def test_other_trainers_data_settings_point_to_ours_not_to_a_lookalike(tmp_path):
    # The closest spelling was suggested, which for these names is another setting: flip_aug was
    # 'did you mean data.shuffle_tags', caption_prefix 'data.caption' (which replaces every caption).
    cases = {
        "data.flip_aug=true": "data.random_flip",
        "data.random_crop=true": "data.crop: random",
        "data.caption_dropout_rate=0.1": "data.caption_dropout",
        "data.caption_prefix=sks": 'data.folders: [{path: ., template: "sks, {caption}"}]',
        "data.num_repeats=10": "data.folders: [{path: ., repeats: 10}]",
        "data.bucket_no_upscale=true": "data.bucketing.no_upscale",
        "data.min_bucket_reso=256": "data.bucketing.min_side",
        "data.bucket_reso_steps=64": "data.bucketing.step",
        "resolution=512": "data.resolution",
        "data.max_token_length=150": "model.max_token_length",
        "data.crop_style=random": "data.crop: center or random",  # SimpleTuner's
        "data.caption_strategy=textfile": "a .txt or .caption file beside each image, a metadata.jsonl, or data.caption",
        "data.prepend_instance_prompt=true": 'data.folders: [{path: ., template: "sks, {caption}"}]',
    }
    for override, ours in cases.items():
        key = override.split("=")[0]
        assert _unknown_key_message(tmp_path, override) == f"override '{override}': unknown key '{key}' (here it is '{ours}')"


def test_sd_scripts_caption_extension_is_told_that_both_sidecar_kinds_are_read(tmp_path):
    # It was told "here it is 'a .txt beside each image'", as if a folder of sd-scripts' .caption files had to be
    # renamed, though they are read as they are (tests/test_captions.py reads them).
    message = _unknown_key_message(tmp_path, "data.caption_extension=.caption")
    assert message == ("override 'data.caption_extension=.caption': unknown key 'data.caption_extension' (none is needed here: "
                       "a .txt or .caption file beside each image is read as its caption, the .txt where both are)")


def test_an_empty_caption_file_in_a_template_folder_is_said_with_the_prompt_it_trains_as(tmp_path):
    # The check looked at the caption after the template ("painting style, "), so a caption file left
    # empty in a folder with a template trained as the template alone without a word.
    from odd_images import captioned

    from finetune.config import DataConfig
    from finetune.data.sources import read_examples
    from finetune.data_check.check import WARNING, inspect_examples

    captioned(tmp_path / "style", "a.png", caption="a red circle")
    captioned(tmp_path / "style", "b.png", caption="\n")
    captioned(tmp_path / "plain", "c.png", caption="")
    folders = [{"path": "style", "template": "painting style, {caption}"}, {"path": "plain"}, {"path": "style", "template": "fixed prompt"}]
    config = DataConfig(image_dir=str(tmp_path), resolution=64, folders=folders)
    warnings = [f.message for f in inspect_examples(read_examples(config), config, "data").of_level(WARNING)]
    assert warnings == [
        f"image {tmp_path / 'style' / 'b.png'} has an empty caption: it trains as its folder's template alone ('painting style, '); "
        "write one in its .txt or metadata row if that is not meant",
        f"image {tmp_path / 'plain' / 'c.png'} has an empty caption: it trains as the empty prompt; write one in its .txt or metadata row if that is not meant",
    ]  # (the third entry's template is the prompt of every image: its captions are not read)


def test_long_captions_with_shuffled_tags_are_said_to_train_less_often_not_never(make_recipe, image_folder, tmp_path, capsys):
    # sd-scripts users shuffle long tag lists so that every tag gets a turn before the cut; the warning
    # said "the words past the cut do not train" whatever the shuffle, in training and in check-data.
    import shutil

    from finetune.cli.main import main
    from finetune.training.trainer import train

    folder = tmp_path / "data"
    shutil.copytree(image_folder, folder)
    (folder / "metadata.jsonl").unlink()  # the .txt sidecars caption the images
    sorted(folder.glob("*.txt"))[0].write_text("a red circle, " * 30)  # about 120 tokens
    shuffled = make_recipe(data__image_dir=str(folder), data__shuffle_tags=True, train__max_steps=1)
    (tmp_path / "shuffled.yaml").write_text(yaml.safe_dump(shuffled.model_dump(mode="json")))
    said = "with data.shuffle_tags other tags fall past the cut at each use: they train less often, not never"
    for run in (lambda: main(["check-data", str(tmp_path / "shuffled.yaml")]), lambda: train(shuffled)):
        run()
        warnings = [line for line in capsys.readouterr().out.splitlines() if "longer than model.max_token_length" in line]
        assert len(warnings) == 1 and said in warnings[0] and "do not train" not in warnings[0]
    main(["check-data", str(tmp_path / "shuffled.yaml"), "data.shuffle_tags=false"])  # in order, the same words are always cut
    assert "the words past the cut do not train" in capsys.readouterr().out


def test_bucketing_that_makes_the_square_its_only_bucket_is_refused_on_load():
    # At resolution 64 with the default step of 64 (the toy base's size), or with min_side at the
    # resolution, the square was the only bucket: bucketing was on and every image was cropped square.
    from finetune.config import DataConfig
    from finetune.data.buckets import make_buckets

    cases = {
        (64, (("step", 64),)): "(sides 64-128 in steps of 64), so every image would be cropped as without bucketing: "
                               "lower data.bucketing.step to a multiple of 8 that divides 64, at most 32",
        (64, (("step", 64), ("no_upscale", True))): "lower data.bucketing.step to a multiple of 8 that divides 64, at most 32",
        (512, (("min_side", 512),)): "(sides 512-1024 in steps of 64), so every image would be cropped as without bucketing: lower data.bucketing.min_side",
        (512, (("min_side", 512), ("max_side", 512))): "lower data.bucketing.min_side or raise data.bucketing.max_side",
    }  # fmt: skip
    for (resolution, settings), message in cases.items():
        with pytest.raises(ValueError, match=rf"data.bucketing at data.resolution {resolution} has one bucket, the {resolution}x{resolution} square .*{re.escape(message)}"):
            DataConfig(image_dir="x", resolution=resolution, bucketing={"enabled": True, **dict(settings)})
    assert len(make_buckets(DataConfig(image_dir="x", resolution=64, bucketing={"enabled": True, "step": 32}))) == 5
    assert DataConfig(image_dir="x", resolution=64).bucketing.enabled is False  # off, the step does not matter



def test_one_bucket_made_by_a_resolution_on_the_command_line_names_that_override(tmp_path):
    """recipes/lora.yaml's step of 64 is fine at its 512; data.resolution=64 typed for a small test run made it the square's only
    bucket, and the error named the recipe file, whose settings were not the ones changed."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {image_dir: x, resolution: 512, bucketing: {enabled: true, step: 64}}\n")
    with pytest.raises(FinetuneError, match=r"^override 'data.resolution=64': key 'data': data.bucketing at data.resolution 64 has one bucket"):
        load_recipe(recipe, ["data.resolution=64"])


def test_one_bucket_made_by_two_overrides_names_both_and_the_bucketing_one_alone(tmp_path):
    """recipes/lora.yaml data.resolution=64 data.bucketing.enabled=true (bucketing off in the recipe): the error blamed the
    resolution, fine before the bucketing override turned on the default step of 64 that leaves the square its one bucket."""
    lora = Path(__file__).parent.parent / "recipes" / "lora.yaml"
    with pytest.raises(FinetuneError, match=r"^overrides 'data.resolution=64' and 'data.bucketing.enabled=true': key 'data': data.bucketing at "
                                            r"data.resolution 64 has one bucket.*: lower data.bucketing.step"):  # fmt: skip
        load_recipe(lora, ["data.image_dir=x", "data.resolution=64", "data.bucketing.enabled=true"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {image_dir: x, resolution: 64}\n")  # was: the file named, its resolution not the one changed
    with pytest.raises(FinetuneError, match=r"^override 'data.bucketing.enabled=true': key 'data': data.bucketing at data.resolution 64"):
        load_recipe(recipe, ["data.bucketing.enabled=true"])


def test_kohya_folders_without_captions_are_suggested_with_their_name_as_the_prompt(tmp_path, capsys):
    # sd-scripts prompts the uncaptioned images of `10_sks dog` with "sks dog"; the suggested entry gave the
    # repeats only, so pasting it stopped the check with 'no caption' for every image of the folder.
    from odd_images import captioned, noise

    from finetune.cli.main import main
    from finetune.config import DataConfig
    from finetune.data.sources import read_examples

    root = tmp_path / "train"
    (root / "10_sks dog").mkdir(parents=True)
    for name in ("0.png", "1.png"):
        noise(64, 64, seed=len(name)).save(root / "10_sks dog" / name)  # no caption files
        captioned(root / "1_dog", name)  # captioned: its captions train
    assert main(["check-data", "--image-dir", str(root), "--resolution", "64"]) == 2
    suggestion = capsys.readouterr().err.strip().split("e.g. ")[1]
    assert suggestion == """folders: [{path: "10_sks dog", repeats: 10, template: "sks dog"}, {path: "1_dog", repeats: 1}]"""
    recipe = tmp_path / "recipe.yaml"  # the suggestion, pasted into a recipe
    recipe.write_text(f"model: {{pretrained: {SHIPPED_BASE}}}\ndata:\n  image_dir: {root}\n  resolution: 64\n  {suggestion}\n")
    assert main(["check-data", str(recipe)]) == 0
    captions = {example.caption for example in load_examples(load_recipe(recipe).data, check=False) if "10_sks dog" in example.source}
    assert captions == {"sks dog"}
    with pytest.raises(FinetuneError) as raised:  # data.caption prompts every image: no folder is uncaptioned then
        read_examples(DataConfig(image_dir=str(root), resolution=64, caption="a photo"))
    assert str(raised.value).endswith("""folders: [{path: "10_sks dog", repeats: 10}, {path: "1_dog", repeats: 1}]""")


def test_an_uncaptioned_image_of_a_data_folders_entry_is_told_to_give_that_entry_a_template(tmp_path):
    # It said "or set data.caption to one prompt for all images", which would prompt every folder's
    # images alike, the captioned ones too.
    from odd_images import captioned, noise

    from finetune.config import DataConfig
    from finetune.data.sources import read_examples
    from finetune.data_check.check import FATAL, inspect_examples

    (tmp_path / "10_sks dog").mkdir()
    noise(64, 64, seed=1).save(tmp_path / "10_sks dog" / "a.png")
    captioned(tmp_path / "1_dog", "b.png")
    config = DataConfig(image_dir=str(tmp_path), resolution=64, folders=[{"path": "10_sks dog", "repeats": 10}, {"path": "1_dog"}])
    fatal = [f.message for f in inspect_examples(read_examples(config), config, "data").of_level(FATAL)]
    assert fatal == [f"image {tmp_path / '10_sks dog' / 'a.png'} has no caption: add a.txt, a metadata.jsonl or metadata.csv entry, "
                     "or give data.folders path '10_sks dog' a template (the prompt of its images)"]  # fmt: skip
    alone = DataConfig(image_dir=str(tmp_path / "10_sks dog"), resolution=64)  # without data.folders, one prompt for all is the other fix
    assert inspect_examples(read_examples(alone), alone, "data").of_level(FATAL)[0].message.endswith("or set data.caption to one prompt for all images")


@pytest.mark.parametrize("method", ["lora", "dreambooth", "controlnet"])
def test_held_out_images_are_scored_with_their_captions_as_written(method, make_recipe, pairs_folder, image_folder, tmp_path, monkeypatch):
    # A held-out image's caption was drawn like a training one: with data.caption_dropout (0.05 in
    # recipes/lora.yaml; ControlNet's empty_prompt_share, 0.5) it could be scored with the empty prompt for
    # the whole run, with tag dropout without some tags, so runs with other settings did not compare.
    import finetune.training.training_run as training_run

    scored = []
    real = training_run.held_out_loss

    def recording(method_, modules, dataset, collate_fn, held_out, *args, **kwargs):
        scored.extend(dataset[(index, 0)]["caption"] for index in held_out)
        return real(method_, modules, dataset, collate_fn, held_out, *args, **kwargs)

    monkeypatch.setattr(training_run, "held_out_loss", recording)
    settings = dict(validation__loss_images=1, validation__at_start=False, train__max_steps=1, train__batch_size=1)
    if method == "controlnet":
        recipe = make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__empty_prompt_share=1.0, **settings)
        written = {json.loads(line)["text"] for line in (pairs_folder / "metadata.jsonl").read_text().splitlines()}
    elif method == "dreambooth":
        concept = {"instance_dir": str(image_folder), "instance_prompt": "a sks shape, red, striped", "class_prompt": "a shape", "class_dir": str(tmp_path / "class")}
        dreambooth = {"concepts": [concept], "adapter": "lora", "num_class_images": 2, "class_generation": {"num_inference_steps": 1}}
        recipe = make_recipe(method="dreambooth", dreambooth=dreambooth, data__image_dir=None, data__caption_dropout=1.0, data__tag_dropout=1.0, **settings)
        written = {"a sks shape, red, striped"}
    else:
        recipe = make_recipe(data__caption_dropout=1.0, data__shuffle_tags=True, data__tag_dropout=1.0, **settings)
        written = {example.caption for example in load_examples(recipe.data)}
    trained = train(recipe)
    assert len(trained.validation_losses) == 1 and len(scored) == 1
    assert scored[0] in written and scored[0]  # not emptied, no tag dropped



def test_the_lora_recipes_commented_data_settings_load_when_uncommented():
    # The commented bucketing example had min_side, max_side and no_upscale: true, which refuse each other:
    # uncommenting the block, as its comment invites, stopped with "min_side and max_side do not apply".
    from pathlib import Path

    from finetune.config.recipe_loading import recipe_from_dict

    lines, commented = [], False
    for line in (Path(__file__).parent.parent / "recipes" / "lora.yaml").read_text().splitlines():
        commented = line.startswith("  # More data settings") or (commented and line.startswith("  # "))
        lines.append("  " + line[4:] if commented and not line.startswith("  # More") and not line[4:].lstrip().startswith("#") else line)
    raw = yaml.safe_load("\n".join(lines))
    assert raw["data"]["bucketing"]["enabled"] and raw["data"]["shuffle_tags"] and raw["data"]["folders"]  # uncommented
    recipe = recipe_from_dict(raw)
    assert recipe.data.bucketing.min_side == 256 and not recipe.data.bucketing.no_upscale
