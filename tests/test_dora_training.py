"""DoRA (`lora.use_dora`) trained on the tiny model: what it trains, the file diffusers loads as the trained model, and
the runs it starts (`lora.init_from`). Its resume is in tests/test_resume_matrix.py, a use_dora change at a resume in
tests/test_resume_changes.py."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora
from finetune.methods.lora import LoRAMethod
from finetune.models.encoders import encode_prompts
from finetune.models.loading import load_base_model
from finetune.training.trainer import train
from dora_helpers import DORA, PROMPTS, loaded_by_diffusers
from test_lora_training import unet_output



def trained_model(recipe, checkpoint):
    """The base with the recipe's (peft) LoRA holding what `checkpoint` kept of the run's trained weights: the model as
    it trained, read apart from the LoRA file."""
    base = load_base_model(recipe.model)
    method = LoRAMethod(recipe)
    method.setup(base)
    for index, (part, module) in enumerate(method.trained_modules().items()):
        missing, unexpected = module.load_state_dict(load_file(checkpoint / f"trainable_{index}.safetensors"), strict=False)
        assert not unexpected and not [key for key in missing if "lora_" in key], part
    return base


def test_a_dora_run_saves_what_diffusers_loads_as_the_model_it_trained(make_recipe, capsys):
    # Text encoder, LoRA+, max_norm and gradient checkpointing with it: each touches the layers or their parameters.
    recipe = make_recipe(train__max_steps=3, optimizer__lr=1e-2, lora__train_text_encoder=True, lora__loraplus_lr_ratio=4.0,
                         lora__max_norm=0.5, train__gradient_checkpointing=True, **DORA)  # fmt: skip
    result = train(recipe)
    assert "DoRA (lora.use_dora): each adapted layer also learns a magnitude per output channel" in capsys.readouterr().out
    lora_file = result.output_dir / LORA_WEIGHTS_NAME
    with safe_open(str(lora_file), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
        magnitudes = [key for key in f.keys() if key.endswith(".lora_magnitude_vector.weight")]
    assert config["unet.use_dora"] is True and config["text_encoder.use_dora"] is True
    lora = load_lora(lora_file)
    assert len(magnitudes) == len(lora.layers) and all(layer.magnitude.shape == layer.up.shape[:1] for layer in lora.layers.values())

    trained = trained_model(recipe, result.output_dir / "checkpoints" / "checkpoint-3")
    pipeline = loaded_by_diffusers(recipe.model.pretrained, lora_file)
    assert torch.allclose(unet_output(pipeline.unet), unet_output(trained.unet), atol=1e-5)
    expected_text = encode_prompts(trained.tokenizer, trained.text_encoder, PROMPTS)
    assert torch.allclose(encode_prompts(pipeline.tokenizer, pipeline.text_encoder, PROMPTS), expected_text, atol=1e-5)
    # The magnitudes trained: the same down and up weights as a plain LoRA give another model.
    for layer in lora.layers.values():
        layer.magnitude = None
    plain = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
    from finetune.sampling.inference import load_lora_into

    load_lora_into(plain, lora, lora_file, "plain")
    assert not torch.allclose(unet_output(plain.unet), unet_output(trained.unet), atol=1e-4)


def test_lora_plus_keeps_the_magnitudes_at_the_base_rate(make_recipe):
    """LoRA+ speeds up the up (B) weights only; a magnitude is no LoRA factor (peft's own LoRA+ would move a Linear's,
    not a Conv2d's, with the up weights)."""
    recipe = make_recipe(lora__loraplus_lr_ratio=16.0, **DORA)
    method = LoRAMethod(recipe)
    method.setup(load_base_model(recipe.model))
    names = {id(p): name for module in method.trained_modules().values() for name, p in module.named_parameters()}
    groups = {group["name"]: [names[id(p)] for p in group["params"]] for group in method.parameter_groups()}
    assert any("lora_magnitude_vector" in name for name in groups["unet"])
    assert not any("lora_magnitude_vector" in name for name in groups["unet_up"])


def test_init_from_starts_from_a_dora_file_as_it_is_and_from_a_plain_lora_as_base_plus_it(make_recipe, tmp_path):
    dora = train(make_recipe(output_dir=str(tmp_path / "dora"), train__max_steps=2, optimizer__lr=1e-2, **DORA))
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), train__max_steps=2, optimizer__lr=1e-2,
                              lora__target_modules=DORA["lora__target_modules"]))  # fmt: skip
    for source in (dora.output_dir, plain.output_dir):
        expected = unet_output(loaded_by_diffusers(make_recipe().model.pretrained, source / LORA_WEIGHTS_NAME).unet)
        recipe = make_recipe(lora__init_from=str(source), **{**DORA, "lora__alpha": 8})  # another alpha: the file's is kept
        base = load_base_model(recipe.model)
        LoRAMethod(recipe).setup(base)
        assert torch.allclose(unet_output(base.unet), expected, atol=1e-5), source.name
    with pytest.raises(FinetuneError, match=rf"^lora.init_from {dora.output_dir} is a DoRA \(a magnitude per output channel beside its LoRA\): "
                                            r"set lora.use_dora: true to start from it$"):  # fmt: skip
        LoRAMethod(make_recipe(lora__init_from=str(dora.output_dir), lora__target_modules=DORA["lora__target_modules"]))


def test_use_dora_is_refused_where_no_lora_trains(make_recipe):
    with pytest.raises(Exception, match=r"lora.use_dora shapes a LoRA, and method full trains none: remove it \(or use method lora\)"):
        make_recipe(method="full", lora__use_dora=True)


def test_a_dreambooth_lora_trains_a_dora_with_its_text_encoder(make_recipe, image_folder):
    concept = {"instance_dir": str(image_folder), "instance_prompt": "a sks shape"}
    recipe = make_recipe(method="dreambooth", data__image_dir=None, train__batch_size=1, train__max_steps=2, **DORA,
                         dreambooth={"adapter": "lora", "prior_preservation": False, "train_text_encoder": True, "concepts": [concept]})  # fmt: skip
    lora = load_lora(train(recipe).output_dir / LORA_WEIGHTS_NAME)
    assert {key.split(".", 1)[0] for key in lora.layers} == {"unet", "text_encoder"}
    assert all(layer.magnitude is not None for layer in lora.layers.values())


def test_a_dora_on_convolutions_trains_with_channels_last_as_without(make_recipe, tmp_path):
    """peft's DoRA flattens a conv layer's LoRA factors with .view, which failed (a traceback at the first step) once
    train.channels_last had made them NHWC: the trainer leaves LoRA factors contiguous."""
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), train__max_steps=2, **DORA))
    nhwc = train(make_recipe(output_dir=str(tmp_path / "nhwc"), train__max_steps=2, train__channels_last=True, **DORA))
    assert torch.allclose(torch.tensor(nhwc.losses), torch.tensor(plain.losses), rtol=1e-4)
    a, b = load_file(plain.output_dir / LORA_WEIGHTS_NAME), load_file(nhwc.output_dir / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
