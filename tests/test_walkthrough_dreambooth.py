"""DreamBooth as a user walks through it: class images reused only when they were made as this run would
make them."""

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from finetune.config.recipe_loading import load_recipe
from finetune.dreambooth.class_image_names import class_image_caption
from finetune.dreambooth.class_image_plans import class_image_plans
from finetune.toyworld.datasets import write_folder


@pytest.fixture(scope="module")
def star_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("star") / "star", 3, seed=11, include_held_out="only_shape")


def dreambooth_recipe(make_recipe, star_folder, tmp_path, **overrides):
    concept = {"instance_dir": str(star_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape",
               "class_dir": str(tmp_path / "class")}  # fmt: skip
    settings = {"concepts": [concept], "num_class_images": 3, "class_generation": {"num_inference_steps": 2}, **overrides.pop("dreambooth", {})}
    return make_recipe(method="dreambooth", dreambooth=settings, data__image_dir=None, train__batch_size=1, **overrides)


def key_of_earlier_versions(recipe) -> str:
    """The name prefix versions before the base-alone fix gave class images (single prompt, clip skip 1, a local base)."""
    described = {"prompt": recipe.dreambooth.concepts[0].class_prompts[0], "resolution": recipe.data.resolution,
                 **recipe.dreambooth.class_generation.model_dump(), "base": str(Path(recipe.model.pretrained).resolve()), "revision": None}  # fmt: skip
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:10]


def test_class_images_of_earlier_versions_made_with_a_starting_lora_are_not_reused(make_recipe, star_folder, tmp_path, capsys):
    """Earlier versions generated class images with a lora.init_from LoRA active, under the names this version
    gives base-only images: a resumed or repeated run trained its prior on base + LoRA. Now every such image is
    ignored (with a warning) and made again from the base alone; the user's own class images still count."""
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"adapter": "lora"}, lora__init_from=str(tmp_path / "start.safetensors"))
    folder = tmp_path / "class"
    folder.mkdir()
    earlier = key_of_earlier_versions(recipe)
    for k in range(3):
        Image.new("RGB", (64, 64), "red").save(folder / f"{earlier}-{k:05d}.png")
    Image.new("RGB", (64, 64), "blue").save(folder / "mine.png")

    (_, key, paths, missing), = class_image_plans(recipe)
    assert key != earlier
    assert paths[0].name == "mine.png" and all(not p.name.startswith(earlier) for p in paths)
    assert missing == [0, 1]  # both generated places are made again
    said = capsys.readouterr().out
    assert "ignoring 3 generated images" in said and "earlier version of finetune" in said


def test_another_class_generation_batch_size_continues_the_images_already_made(make_recipe, star_folder, tmp_path):
    """Image k comes from seed + k in whatever batch it is made, but the batch size was part of the images'
    names: lowering it after running out of memory, or raising it on a larger GPU, threw away every class
    image made so far and generated them all again. Now the run continues with the missing ones."""
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"class_generation": {"num_inference_steps": 2, "batch_size": 4}})
    (_, key, paths, missing), = class_image_plans(recipe)
    assert missing == [0, 1, 2]
    paths[0].parent.mkdir()
    Image.new("RGB", (64, 64), "red").save(paths[0])  # made before the interruption

    recipe.dreambooth.class_generation.batch_size = 1
    (_, key_now, _, missing_now), = class_image_plans(recipe)
    assert key_now == key and missing_now == [1, 2]
    recipe.dreambooth.class_generation.guidance_scale = 3.0  # a setting that changes the images still starts over
    (_, other_key, _, _), = class_image_plans(recipe)
    assert other_key != key


def test_concepts_sharing_a_class_folder_do_not_call_each_others_images_ignored(make_recipe, star_folder, tmp_path, capsys):
    """Two concepts with one class_dir and their own class prompts: each warned that the other's generated
    images were 'ignored', as if they were stale (deleting them made the other concept generate them again).
    Now only images no concept of the run uses are counted, in one warning for the folder."""
    concepts = [{"instance_dir": str(star_folder), "instance_prompt": prompt, "class_prompt": cls, "class_dir": str(tmp_path / "class")}
                for prompt, cls in (("a sks shape", "a shape"), ("a zwx shape", "a small shape"))]  # fmt: skip
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": concepts})
    (tmp_path / "class").mkdir()
    for _, _, paths, _ in class_image_plans(recipe):
        for path in paths:
            Image.new("RGB", (64, 64), "red").save(path)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "class" / "0123456789-00000.png")  # of an earlier run's settings

    capsys.readouterr()
    plans = class_image_plans(recipe)
    assert [missing for *_, missing in plans] == [[], []]
    warnings = capsys.readouterr().out.splitlines()
    assert len(warnings) == 1 and "ignoring 1 generated image " in warnings[0]


def test_a_prior_loss_weight_of_zero_says_the_class_images_do_nothing(capsys):
    """prior_loss_weight 0 with prior preservation on generated every class image and doubled every batch
    for a loss term weighing nothing, without a word."""
    recipes = Path(__file__).parent.parent / "recipes"
    star = f"dreambooth.concepts.0.instance_dir={recipes.parent / 'datasets' / 'star'}"
    load_recipe(recipes / "dreambooth.yaml", [star, "dreambooth.prior_loss_weight=0"])
    assert capsys.readouterr().err.startswith("warning: dreambooth.prior_loss_weight is 0, so the class images are made and trained for nothing")
    load_recipe(recipes / "dreambooth.yaml", [star, "dreambooth.prior_loss_weight=0", "dreambooth.prior_preservation=false"])
    assert "prior_loss_weight is 0" not in capsys.readouterr().err  # the prior_preservation line names it already


def test_a_class_image_of_the_user_named_like_a_generated_one_still_counts(make_recipe, star_folder, tmp_path, capsys):
    """Any 10 characters, a dash and 5 digits passed for a generated image's name: the user's own
    "photo_0001-00001.png" was left out as 'a generated image of another class prompt or settings'."""
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path)
    (tmp_path / "class").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "class" / "photo_0001-00001.png")
    (_, key, paths, missing), = class_image_plans(recipe)
    assert paths[0].name == "photo_0001-00001.png" and missing == [0, 1]
    assert class_image_caption(paths[0], ["a shape"]) == "a shape" and "ignoring" not in capsys.readouterr().out


def test_class_images_not_reused_are_told_by_what_changed(make_recipe, star_folder, tmp_path, monkeypatch, capsys):
    """The names of generated class images are a hash: with another guidance scale all of them were made
    again, and the warning could only list every setting that might have changed. Generation now records
    how each set is made in the folder's class_images.json, and the warning names what changed."""
    import finetune.methods.dreambooth as dreambooth
    from test_dreambooth import set_up_to_make_class_images

    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, train__max_steps=1)
    made = []
    method, _, make = set_up_to_make_class_images(recipe, monkeypatch, lambda pipeline: made.append(True))
    monkeypatch.setattr(dreambooth.DreamBoothMethod, "_check_class_images", lambda *args: None)
    make()
    plan = method.class_plans[0]
    assert made and (plan.folder / "class_images.json").is_file()
    Image.new("RGB", (64, 64), "red").save(plan.paths[0])  # what the generation made

    recipe.dreambooth.class_generation.guidance_scale = 5.0
    capsys.readouterr()
    (_, key, _, missing), = class_image_plans(recipe)
    assert key != plan.key and missing == [0]
    assert f"warning: {plan.folder}: ignoring 1 generated image made with guidance_scale 7.5 (now 5.0)\n" in capsys.readouterr().out


def test_class_images_of_a_local_base_retrained_in_place_are_not_reused(tiny_model, tmp_path):
    """The key held a local base's path only: a base retrained (or merged into) at the same path reused the
    class images of its old weights. Its contents count now; a copy elsewhere or a touch does not change them."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from finetune.config import ClassImageGeneration, ModelConfig
    from finetune.dreambooth.class_image_names import generation_record
    from test_class_images import generation_key

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    model, settings = ModelConfig(pretrained=str(base)), ClassImageGeneration()
    key = generation_key(["a shape"], settings, 64, model)
    weights = next((base / "unet").glob("*.safetensors"))
    os.utime(weights, (1, 1))
    (base / "unet" / ".DS_Store").write_bytes(b"Finder")
    assert generation_key(["a shape"], settings, 64, model) == key  # the same weights, another time, a file of macOS's

    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 0.01  # retrained in place: same size, same path
    save_file(tensors, weights)
    assert generation_key(["a shape"], settings, 64, model) != key
    assert "base_contents" in generation_record(["a shape"], settings, 64, model, "no")
    # A large file is read in slices spread over it: a change deep inside still shows.
    from finetune.dreambooth.class_image_names import file_sample_digest

    large = tmp_path / "large.bin"
    large.write_bytes(bytes(8 << 20))
    before = file_sample_digest(large)
    with large.open("r+b") as file:
        file.seek((8 << 20) * 40 // 64 + 100)
        file.write(b"\x01")
    assert file_sample_digest(large) != before


def test_class_images_of_a_single_file_base_read_with_other_configs_are_not_reused(tmp_path):
    """A single-file base is read with the configs model.single_file_config names (SD2's v-prediction or
    SD1's epsilon, say): images sampled under one set were reused under another."""
    from finetune.config import ClassImageGeneration, ModelConfig
    from test_class_images import generation_key

    checkpoint = tmp_path / "base.safetensors"
    checkpoint.write_bytes(b"weights")
    keys = {generation_key(["a shape"], ClassImageGeneration(), 64, ModelConfig(pretrained=str(checkpoint), single_file_config=configs))
            for configs in ("stabilityai/stable-diffusion-2-1", "stable-diffusion-v1-5/stable-diffusion-v1-5")}  # fmt: skip
    assert len(keys) == 2


def test_class_images_of_another_weights_variant_or_precision_are_not_reused(make_recipe, star_folder, tmp_path, capsys):
    """The images' key left out model.variant and train.mixed_precision: class images sampled from a hub id's fp16
    weights, or in bf16, were reused by a run of its full weights in fp32, and an interrupted generation went on in
    another precision, without a word. Now each makes its own. A record of an earlier version, which lacks both,
    cannot say which it was made with: its images are made again, and the warning says why."""
    from finetune.dreambooth.class_image_names import record_key
    from finetune.dreambooth.class_image_plans import recipe_generation_record
    from finetune.dreambooth.class_images import write_generation_record

    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path)
    (folder, key, paths, _), = class_image_plans(recipe)
    folder.mkdir()
    for path in paths:
        Image.new("RGB", (64, 64), "red").save(path)
    write_generation_record(folder, key, recipe_generation_record(recipe, ["a shape"]))
    for section, name, value in ((recipe.train, "mixed_precision", "bf16"), (recipe.model, "variant", "fp16")):
        made_with = getattr(section, name)
        setattr(section, name, value)
        capsys.readouterr()
        (_, key_now, _, missing), = class_image_plans(recipe)
        assert key_now != key and missing == [0, 1, 2]
        assert f"ignoring 3 generated images made with {name} {made_with!r} (now {value!r})\n" in capsys.readouterr().out
        setattr(section, name, made_with)
    assert class_image_plans(recipe)[0][1] == key

    earlier = {name: value for name, value in recipe_generation_record(recipe, ["a shape"]).items() if name not in ("variant", "mixed_precision")}
    for path in paths:
        path.rename(path.with_name(f"{record_key(earlier)}{path.name[10:]}"))
    write_generation_record(folder, record_key(earlier), earlier)
    capsys.readouterr()
    (_, _, _, missing), = class_image_plans(recipe)
    assert missing == [0, 1, 2]
    assert "ignoring 3 generated images made with mixed_precision and variant unknown (an earlier version of finetune" in capsys.readouterr().out


def test_a_damaged_entry_of_the_class_image_records_only_loses_the_warnings_detail(make_recipe, star_folder, tmp_path, capsys):
    """class_images.json with an entry that is no record (edited by hand: a string) stopped check-data and training
    with a TypeError in the warning about the images it describes; the file's other damage lost only detail."""
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path)
    (tmp_path / "class").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "class" / "0123456789-00000.png")
    (tmp_path / "class" / "class_images.json").write_text(json.dumps({"0123456789": "made with the old base"}))
    (_, _, _, missing), = class_image_plans(recipe)
    assert missing == [0, 1, 2] and "ignoring 1 generated image of another class prompt" in capsys.readouterr().out
