"""validation.prompts: null (finetune/sampling/unset_prompts.py): the grids sample prompts of the training data, not a
recipe's examples that show nothing of it; said in one line at the run's start. Explicit prompts sample as before."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import finetune.methods.base
import finetune.methods.controlnet
from finetune.config.recipe_loading import load_recipe
from finetune.controlnet.pairs import checked_pairs
from finetune.errors import FinetuneError
from finetune.sampling.unset_prompts import CAPTION_PROMPTS, unset_prompts
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


@pytest.mark.parametrize("name", ["lora.yaml", "controlnet.yaml"])
def test_the_shipped_lora_and_controlnet_recipes_leave_them_unset_without_a_warning(name, capsys):
    """Their sampling settings sample (the captions): not 'nothing without validation.prompts'. controlnet.yaml listed a
    living room and a sports car, which show nothing of a creator's pairs."""
    recipe = load_recipe(RECIPES / name, ["data.image_dir=somewhere"])
    assert recipe.validation.prompts is None and recipe.samples_unset_prompts
    assert capsys.readouterr().err == ""


def test_unset_prompts_are_bounded_in_the_grid_and_checked_with_the_sections_sampler(make_recipe):
    with pytest.raises(FinetuneError, match="validation.images_per_prompt"):
        make_recipe(validation__prompts=None, validation__images_per_prompt=100_000)
    with pytest.raises(FinetuneError, match="validation.num_inference_steps with validation.sampler"):
        make_recipe(validation__prompts=None, validation__sampler="dpmpp_2m", validation__num_inference_steps=999)


def test_a_controlnets_unset_prompts_are_its_first_pairs_captions_with_their_own_conditioning_images(make_recipe, pairs_folder, tmp_path,
                                                                                                        monkeypatch, capsys):  # fmt: skip
    """null was refused for a ControlNet, whose grid pairs each prompt with a conditioning image: it samples the first pairs'
    captions, each with its own pair's conditioning image (the first pair, uncaptioned, is passed over with its image)."""
    folder = tmp_path / "pairs"
    shutil.copytree(pairs_folder, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = ""
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    drawn = []

    def generate(pipeline, settings, *args, conditions, **kwargs):
        drawn.extend((prompt.prompt, condition.tobytes()) for prompt, condition in zip(settings, conditions))
        return [[Image.new("RGB", (64, 64))] for _ in settings]

    monkeypatch.setattr(finetune.methods.controlnet, "generate_with_settings", generate)
    recipe = make_recipe(method="controlnet", data__image_dir=str(folder), validation__prompts=None, validation__at_start=False, train__max_steps=1)
    train(recipe)
    own = [(row["text"], Image.open(folder / row["conditioning_file_name"]).convert("RGB").tobytes()) for row in rows[1:3]]
    assert drawn == own
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation prompts:")]
    assert len(lines) == 1 and lines[0].startswith("validation prompts: 2 captions of the training set, each with its image's conditioning image "
                                                   f"(validation.prompts unset): '{rows[1]['text'][:40]}")  # fmt: skip
    assert lines[0].endswith("(0002.png)") and "(0001.png), '" in lines[0]
    private = make_recipe(method="controlnet", data__image_dir=str(folder), validation__prompts=None, checkpoint__record_caption_tags=False)
    assert unset_prompts(private, [pair.image for pair in checked_pairs(private)[0]]) == []  # captions kept private: no grid, as for the others
    # Conditioning images of its own need prompts of its own: a caption of another pair would not describe them.
    with pytest.raises(FinetuneError, match=r"validation.prompts: null samples the first training pairs' captions, each with its own conditioning "
                                            r"image; controlnet.validation_conditions needs prompts of its own"):  # fmt: skip
        make_recipe(method="controlnet", data__image_dir=str(folder), validation__prompts=None, controlnet__validation_conditions=["a.png"])


def test_a_dreamboths_unset_prompts_are_its_instance_and_class_prompts(make_recipe, tmp_path, monkeypatch, capsys):
    """The subject by its identifier, and the class prior preservation keeps: a grid that shows both whatever the
    instance prompt (a recipe's 'a photo of sks dog in a bucket' showed nothing of 'zwx cat')."""
    from finetune.config import ClassImageGeneration
    from finetune.toyworld.datasets import write_folder

    folder = write_folder(tmp_path / "star", 2, seed=11, include_held_out="only_shape")
    concept = {"instance_dir": str(folder), "instance_prompt": "a zwx shape", "class_prompt": ["a shape", "a shape on grass"]}
    generation = ClassImageGeneration(num_inference_steps=2, guidance_scale=3.0, batch_size=2, seed=5).model_dump()
    settings = {"concepts": [concept], "num_class_images": 2, "class_generation": generation}
    drawn = sampled_prompts(monkeypatch)
    train(make_recipe(method="dreambooth", dreambooth=settings, data__image_dir=None, train__batch_size=1, train__max_steps=1,
                      validation__prompts=None, validation__at_start=False))  # fmt: skip
    assert drawn == ["a zwx shape", "a shape"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation prompts:")]
    assert lines == ["validation prompts: the instance and class prompts of dreambooth.concepts (validation.prompts unset): 'a zwx shape', 'a shape'"]
    # Without prior preservation no class trains: the subject alone.
    alone = make_recipe(method="dreambooth", dreambooth={"concepts": [concept], "prior_preservation": False}, data__image_dir=None,
                        validation__prompts=None)  # fmt: skip
    assert unset_prompts(alone, []) == ["a zwx shape"]


def test_the_shipped_dreambooth_recipes_follow_an_instance_prompt_given_on_the_command_line(capsys):
    for name in ("dreambooth.yaml", "dreambooth_lora.yaml"):
        recipe = load_recipe(RECIPES / name, ["dreambooth.concepts.0.instance_dir=somewhere", "dreambooth.concepts.0.instance_prompt=a photo of zwx cat",
                                              "dreambooth.concepts.0.class_prompt=a photo of a cat"])  # fmt: skip
        assert unset_prompts(recipe, []) == ["a photo of zwx cat", "a photo of a cat"]
        assert capsys.readouterr().err == ""  # no 'none names the subject' warning: the grids do


def test_captions_kept_private_are_not_sampled(make_recipe, monkeypatch, capsys):
    """checkpoint.record_caption_tags: false keeps the captions out of shared files; a grid's labels (copied beside the model
    card) would show them: no grid, said in the line."""
    drawn = sampled_prompts(monkeypatch)
    train(make_recipe(validation__prompts=None, validation__at_start=False, train__max_steps=1, checkpoint__record_caption_tags=False))
    assert drawn == []
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation prompts:")]
    assert len(lines) == 1 and "checkpoint.record_caption_tags: false keeps the captions out of shared files" in lines[0]


def test_check_data_says_the_line_train_starts_with(make_recipe, tiny_model, image_folder, pairs_folder, tmp_path, monkeypatch, capsys):
    """check-data did not say which captions a null validation.prompts samples (or why none), which train says at its start."""
    from finetune.cli.main import main

    sampled_prompts(monkeypatch)
    train(make_recipe(validation__prompts=None, validation__at_start=False, train__max_steps=1))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation prompts:")]
    for method, data, private, start in (("lora", image_folder, False, said[0]), ("lora", image_folder, True, "validation prompts: none ("),
                                         ("controlnet", pairs_folder, False, "validation prompts: 2 captions of the training set, each with its ")):  # fmt: skip
        recipe = tmp_path / f"{method}-{private}.json"
        recipe.write_text(json.dumps({"method": method, "seed": 3, "model": {"pretrained": str(tiny_model)}, "data": {"image_dir": str(data), "resolution": 64},
                                      "validation": {"prompts": None}, "checkpoint": {"record_caption_tags": not private}}))  # fmt: skip
        assert main(["check-data", str(recipe)]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation prompts:")]
        assert len(lines) == 1 and lines[0].startswith(start), lines
