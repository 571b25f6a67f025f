"""`finetune merge` folds a DoRA (lora.use_dora) as peft applies it in `finetune sample`, at any strength."""

import torch
from diffusers import StableDiffusionPipeline

from finetune.encoders import encode_prompts
from finetune.merge import merge_lora
from test_dora_files import dora_run  # noqa: F401 - the fixture
from test_dora_training import PROMPTS
from test_lora_training import unet_output


def test_merge_folds_a_dora_as_peft_applies_it_at_each_strength(dora_run, tmp_path):  # noqa: F811
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
