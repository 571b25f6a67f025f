"""The demo's engine applies a DoRA (lora.use_dora) beside the weights as peft applies it in `finetune sample`: alone at
any strength, 0 included, and together with another LoRA on the same layers."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.demo.lora_hooks import loras_applied
from finetune.formats.kohya import load_lora
from finetune.models.encoders import encode_prompts
from finetune.training.trainer import train
from dora_helpers import DORA, PROMPTS, train_dora
from test_lora_training import unet_output


@pytest.fixture
def dora_run(make_recipe):
    return train_dora(make_recipe)


def test_the_demo_applies_a_dora_as_sample_does_alone_and_with_another_lora(dora_run, make_recipe, tmp_path):
    recipe, dora_file = dora_run
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), train__max_steps=2, optimizer__lr=1e-2,
                              lora__target_modules=DORA["lora__target_modules"])).output_dir / LORA_WEIGHTS_NAME  # fmt: skip
    sampled = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)  # finetune sample's loading: peft's layers
    sampled.load_lora_weights(str(dora_file.parent), weight_name=dora_file.name, adapter_name="dora")
    sampled.load_lora_weights(str(plain.parent), weight_name=plain.name, adapter_name="plain")
    demo = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
    models = {"unet": demo.unet, "text_encoder": demo.text_encoder}
    base = unet_output(demo.unet)
    dora, other = load_lora(dora_file), load_lora(plain)
    for strengths in ((1.0, 0.0), (0.5, 0.0), (0.0, 0.0), (0.7, 1.0)):  # at 0 a DoRA's magnitudes still apply, as in sample
        sampled.set_adapters(["dora", "plain"], adapter_weights=list(strengths))
        expected = unet_output(sampled.unet), encode_prompts(sampled.tokenizer, sampled.text_encoder, PROMPTS)
        for loras in ([(dora, strengths[0]), (other, strengths[1])], [(other, strengths[1]), (dora, strengths[0])]):  # either hook first
            with loras_applied(models, loras):
                assert torch.allclose(unet_output(demo.unet), expected[0], atol=1e-5), strengths
                assert torch.allclose(encode_prompts(demo.tokenizer, demo.text_encoder, PROMPTS), expected[1], atol=1e-5), strengths
    assert torch.equal(unet_output(demo.unet), base)  # the hooks came off


def test_the_demo_lists_a_dora_as_one_in_either_layout(dora_run, tmp_path):
    from finetune.demo.adapter_scan import scan_adapters
    from finetune.demo.page import table_row
    from finetune.formats.kohya import load_lora, save_lora_file
    from finetune.formats.lora_export import export_lora

    _, dora_file = dora_run
    export_lora(dora_file, tmp_path / "adapters", "kohya")
    save_lora_file(load_lora(dora_file), tmp_path / "adapters" / "ours" / LORA_WEIGHTS_NAME, "diffusers")
    foreign = load_lora(dora_file)  # another trainer's DoRA: no record of ours, its names alone say it
    foreign.metadata = {}
    save_lora_file(foreign, tmp_path / "adapters" / "theirs.safetensors", "kohya")
    rows = {name: table_row(adapter) for name, adapter in scan_adapters(tmp_path / "adapters").items()}
    assert {name: row[1] for name, row in rows.items()} == {"run": "DoRA (kohya)", "ours": "DoRA (diffusers)", "theirs": "DoRA (kohya)"}
    assert all(row[-1] == "ok" for row in rows.values())
