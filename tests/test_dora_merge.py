"""`finetune merge` folds a DoRA (lora.use_dora) as peft applies it in `finetune sample`, at any strength."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from finetune.formats.merge import merge_lora
from finetune.models.encoders import encode_prompts
from dora_helpers import PROMPTS, train_dora
from test_lora_training import unet_output


@pytest.fixture
def dora_run(make_recipe):
    return train_dora(make_recipe)


def test_merge_folds_a_dora_as_peft_applies_it_at_each_strength(dora_run, tmp_path):
    recipe, lora_file = dora_run
    base = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
    for strength in (1.0, 0.5):  # at 0.5 the magnitudes still apply, to half the update: peft's scale reaches up @ down only
        merged = StableDiffusionPipeline.from_pretrained(merge_lora(str(recipe.model.pretrained), str(lora_file), strength, tmp_path / f"merged-{strength}"))
        applied = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
        applied.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="dora")
        applied.set_adapters(["dora"], adapter_weights=[strength])  # what finetune sample --lora-scale does
        assert torch.allclose(unet_output(merged.unet), unet_output(applied.unet), atol=1e-5), strength
        text = encode_prompts(applied.tokenizer, applied.text_encoder, PROMPTS)
        assert torch.allclose(encode_prompts(merged.tokenizer, merged.text_encoder, PROMPTS), text, atol=1e-5), strength
        assert not torch.allclose(unet_output(merged.unet), unet_output(base.unet), atol=1e-4)


def test_finetune_sample_of_a_dora_in_either_layout_draws_its_merge(dora_run, tmp_path):
    """The commands end to end: sample --lora (the run's file, its kohya export) draws what sample --base draws of the merge."""
    import numpy as np
    from PIL import Image

    from finetune.cli.main import main

    recipe, lora_file = dora_run
    assert main(["export", str(lora_file), str(tmp_path / "webui"), "--to", "kohya"]) == 0
    assert main(["merge", "--base", str(recipe.model.pretrained), "--lora", str(lora_file), str(tmp_path / "merged")]) == 0
    drawn = {}
    for name, source in (("diffusers", ["--lora", str(lora_file)]), ("kohya", ["--lora", str(tmp_path / "webui")]),
                         ("merged", ["--base", str(tmp_path / "merged")]), ("base", [])):  # fmt: skip
        base = [] if name == "merged" else ["--base", str(recipe.model.pretrained)]
        assert main(["sample", *base, *source, "--prompt", "a red circle", "--steps", "2", "--resolution", "64", "--out", str(tmp_path / name)]) == 0
        drawn[name] = np.asarray(Image.open(tmp_path / name / "00000-prompt0_seed0.png"), dtype=np.int16)
    for name in ("diffusers", "kohya"):
        assert np.abs(drawn[name] - drawn["merged"]).max() <= 1, name  # measured 0; its LoRA without the magnitudes: 6
    assert np.abs(drawn["diffusers"] - drawn["base"]).max() > 8  # measured 23
