"""How prompts become text embeddings: training (frozen, cached, or through a trained text encoder) and
sampling (validation, `finetune sample`, the demo: all through finetune.sampling.pipelines.generate) must hand the
UNet the same states for the same prompt and settings, or an adapter is sampled with prompts encoded
another way than it learned them."""

import pytest
import torch
import yaml

from finetune.methods.lora import LoRAMethod
from finetune.models.loading import load_base_model
from finetune.sampling.pipelines import generate

LONG = ", ".join(["red circle", "blue square", "green triangle"] * 14)  # past 77 tokens, under 150


def states_the_unet_sees(pipeline, prompt: str, negative_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative, prompt) encoder_hidden_states of the UNet's first call in one guided sampling step."""
    seen = []
    forward = pipeline.unet.forward

    def record(*args, **kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())
        return forward(*args, **kwargs)

    pipeline.unet.forward = record
    try:
        generate(pipeline, [prompt], 1, 0, 1, 7.5, 32, negative_prompt=negative_prompt)
    finally:
        del pipeline.unet.forward
    negative, positive = seen[0].chunk(2)  # classifier-free guidance stacks (negative, prompt)
    return negative, positive


@pytest.mark.parametrize(
    "settings, prompt",
    [
        ({}, "a red circle"),
        ({"model__clip_skip": 2}, "a red circle"),
        ({"model__max_token_length": 150}, LONG),
        ({"model__max_token_length": 150}, "a red circle"),  # a short caption: training reads it in 2 chunks too
        ({"model__max_token_length": 150, "model__clip_skip": 2}, LONG + ", yellow star"),
        ({"lora__train_text_encoder": True}, "a red circle"),
    ],
)
def test_training_and_sampling_encode_a_prompt_alike(make_recipe, settings, prompt):
    recipe = make_recipe(train__cache_text_embeddings=True, **settings)
    method = LoRAMethod(recipe)
    method.setup(load_base_model(recipe.model))
    modules = method.trained_modules()
    if "text_encoder" in modules:  # a trained text encoder: move its LoRA off zero, so a stale encoding would show
        with torch.no_grad():
            for name, parameter in modules["text_encoder"].named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = method.encode_text(modules, [prompt, ""])  # "": a caption dropped by data.caption_dropout
        again = method.encode_text(modules, [prompt, ""])  # from the text cache where there is one
    assert torch.equal(trained, again)
    negative, positive = states_the_unet_sees(method.pipeline(modules), prompt)
    assert positive.shape == trained[:1].shape
    assert torch.allclose(positive, trained[:1], atol=1e-5)
    assert torch.allclose(negative, trained[1:], atol=1e-5)  # no negative prompt: the empty caption, as diffusers


def test_the_webuis_prompt_weighting_is_said_to_be_read_as_words(tiny_model, make_recipe, tmp_path, capsys):
    from finetune.cli.main import main
    from finetune.config.recipe_warnings import unused_settings
    from finetune.demo.engine import DemoEngine, Request

    # Nothing here reads "(words:1.3)": the pipeline encodes the parentheses, colon and number as words.
    tokenizer = load_base_model(make_recipe().model).tokenizer
    assert len(tokenizer("a (red circle:1.3)").input_ids) > len(tokenizer("a red circle").input_ids) + 3
    note = ("is the webui's prompt weighting, which is not read here: its parentheses, colon and number are encoded as words, "
            "as training reads captions; write the words without them")
    said = f"'(red circle:1.3)' {note}"

    assert main(["sample", "--base", str(tiny_model), "--prompt", "a (red circle:1.3)", "--steps", "1", "--num-images", "1",
                 "--resolution", "32", "--out", str(tmp_path / "sampled")]) == 0  # fmt: skip
    assert f"note: {said}" in capsys.readouterr().out
    main(["sample", "--base", str(tiny_model), "--prompt", "kirby (series), a red circle", "--negative-prompt", "(blurry:1.2)",
          "--steps", "1", "--num-images", "1", "--resolution", "32", "--out", str(tmp_path / "sampled")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "note: '(blurry:1.2)' is the webui's prompt weighting" in printed and "(series)" not in printed  # plain parentheses are text

    # Its LoRA tags, as a model card's webui line writes them, load nothing either.
    main(["sample", "--base", str(tiny_model), "--prompt", "a red circle <lora:mine:0.8>", "--steps", "1", "--num-images", "1",
          "--resolution", "32", "--out", str(tmp_path / "sampled")])  # fmt: skip
    assert ("note: '<lora:mine:0.8>' is the webui's LoRA tag, which is not read here: it is encoded as words and loads nothing "
            "(sample takes --lora, the demo its LoRA lists, validation samples the one in training): leave it out") in capsys.readouterr().out

    recipe = make_recipe(validation__prompts=["a (red circle:1.3)", "a blue square --n (blurry:0.5)", "a green triangle"])
    lines = [line for line in unused_settings({}, recipe) if "weighting" in line]
    assert lines == [f"validation.prompts: '(red circle:1.3)' (and 1 more prompt) {note}"]
    assert not [line for line in unused_settings({}, make_recipe(validation__prompts=["a red circle (left)"])) if "weighting" in line]

    summary = DemoEngine(str(tiny_model), tmp_path / "no-adapters").render(Request(prompt="a (red circle:1.3)", steps=1, size=32))[3]
    assert summary.endswith(f"; note: {said}")


def test_a_text_cache_asked_for_while_the_text_encoder_trains_is_said_to_do_nothing(make_recipe, tmp_path):
    from finetune.config.recipe_warnings import unused_settings

    said = ("train.cache_text_embeddings does nothing while the text encoder trains (lora.train_text_encoder): its embeddings change "
            "at every step and are encoded anew: set cache_text_embeddings: false")  # fmt: skip
    cache_dir = tmp_path / "cache"
    recipe = make_recipe(lora__train_text_encoder=True, train__cache_text_embeddings=True, train__cache_latents=True, train__cache_dir=str(cache_dir))
    assert said in unused_settings({}, recipe)
    assert not [line for line in unused_settings({}, make_recipe(train__cache_text_embeddings=True)) if "cache_text_embeddings" in line]
    method = LoRAMethod(recipe)
    method.setup(load_base_model(recipe.model))
    assert method.text_cache is None and [folder.name.split("-")[0] for folder in cache_dir.iterdir()] == ["latents"]  # no idle text folder
    assert not [line for line in method.start_lines if "text embeddings" in line]


def test_captions_written_with_weights_are_said_to_train_as_words(make_recipe, image_folder, tmp_path, capsys):
    import shutil

    from finetune.cli.main import main
    from finetune.training.trainer import train

    folder = tmp_path / "data"
    shutil.copytree(image_folder, folder)
    (folder / "metadata.jsonl").unlink()  # the .txt sidecars caption the images
    sidecars = sorted(folder.glob("*.txt"))
    sidecars[1].write_text("a (red circle:1.2) on gray, (kirby) series")
    said = (f"warning: 1 of 4 captions use the webui's prompt weighting (the first: {sidecars[1].with_suffix('.png')}, '(red circle:1.2)'), "
            "which training does not read: its parentheses, colon and number train as words; write the words without them")  # fmt: skip
    recipe = make_recipe(data__image_dir=str(folder), train__max_steps=1)
    train(recipe)
    assert said in capsys.readouterr().out.splitlines()
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    main(["check-data", str(tmp_path / "recipe.yaml")])
    assert said in capsys.readouterr().out.splitlines()
    sidecars[1].write_text("a red circle (left), kirby (series)")  # plain parentheses are words
    main(["check-data", str(tmp_path / "recipe.yaml")])
    assert "prompt weighting" not in capsys.readouterr().out


def test_a_class_image_is_the_one_its_prompt_draws_alone_when_batched_with_a_long_prompt(make_recipe, tmp_path):
    import numpy as np
    from PIL import Image

    from finetune.config import ClassImageGeneration
    from finetune.dreambooth.class_images import generate_class_images
    from finetune.sampling.pipelines import build_pipeline

    pipeline = build_pipeline(load_base_model(make_recipe().model))
    images = {}
    for batch_size in (1, 2):
        settings = ClassImageGeneration(num_inference_steps=2, guidance_scale=7.5, batch_size=batch_size, seed=5)
        generate_class_images(pipeline, ["a red circle", LONG], tmp_path / str(batch_size), "k", [0, 1], settings, 32)
        images[batch_size] = [np.asarray(Image.open(path), dtype=np.float32) for path in sorted((tmp_path / str(batch_size)).glob("*.png"))]
    assert len(images[1]) == len(images[2]) == 2
    for alone, batched in zip(images[1], images[2]):  # batched, it was read in two chunks as the long one
        assert np.abs(alone - batched).mean() < 0.5


def test_sample_and_the_demo_read_a_short_prompt_in_the_chunks_its_model_was_trained_on(tiny_model, tmp_path):
    """Training with model.max_token_length 150 reads even a short caption in 2 chunks of 75 (152 states), and its
    outputs record the setting; `finetune sample` and the demo read a prompt as it did, not in CLIP's 77 tokens."""
    import json
    import shutil

    from finetune.checkpoints.run_files import METADATA_FILE
    from finetune.demo.engine import DemoEngine, Request
    from finetune.evaluation.evaluate import sampled_as
    from finetune.models.encoders import text_hidden_states
    from finetune.sampling.adapters_as_trained import adapters_max_token_length
    from finetune.sampling.inference import load_sampling_pipeline

    model = tmp_path / "trained-150"  # a full fine-tune's pipeline: its record is what a LoRA's metadata holds
    shutil.copytree(tiny_model, model)
    (model / METADATA_FILE).write_text(json.dumps({"finetune.method": "full", "finetune.max_token_length": "150"}))
    pipeline = load_sampling_pipeline(str(model))
    with torch.no_grad():  # as DiffusionMethod.encode_text encodes the caption and a dropped one under 150
        trained = text_hidden_states(pipeline.tokenizer, pipeline.text_encoder, ["a red circle", ""], "cpu", chunks=2)
    negative, positive = states_the_unet_sees(pipeline, "a red circle")
    assert positive.shape == trained[:1].shape == (1, 152, trained.shape[-1])
    assert torch.allclose(positive, trained[:1], atol=1e-5) and torch.allclose(negative, trained[1:], atol=1e-5)
    assert sampled_as(pipeline)["max_token_length"] == 150  # what an eval report says it sampled with

    engine = DemoEngine(str(model), tmp_path / "no-adapters", device="cpu")
    seen = []
    forward = engine.base.unet.forward
    engine.base.unet.forward = lambda *args, **kwargs: seen.append(kwargs["encoder_hidden_states"].detach().clone()) or forward(*args, **kwargs)
    engine.render(Request(prompt="a red circle", steps=1, size=32))
    assert torch.allclose(seen[0], torch.cat([trained[1:], trained[:1]]), atol=1e-5)  # (negative, prompt)
    # A value that is no number (sd-scripts writes "None" for 75) reads as 75; of several adapters, the longest is read.
    assert adapters_max_token_length({"a": {}, "b": {"finetune.max_token_length": "None"}}) == 75
    assert adapters_max_token_length({"a": {"finetune.max_token_length": "150"}, "b": {"finetune.max_token_length": "225"}, "c": {}}) == 225
