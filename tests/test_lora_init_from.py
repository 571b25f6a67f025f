"""lora.init_from (sd-scripts' network_weights): a run that starts from a trained LoRA in any layout, the files it
refuses, and the record it keeps through a resume."""

import dataclasses
import re
import shutil

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora, save_lora_file
from finetune.models.encoders import encode_prompts
from finetune.training.trainer import train
from test_lora_training import lora_model, unet_output


def test_init_from_starts_as_base_plus_that_lora_in_any_layout(make_recipe, tiny_model, tmp_path):
    """sd-scripts' network_weights: a new run starts from a trained LoRA (ours or sd-scripts' layout, another alpha)."""
    from finetune.cli.main import main

    first = train(make_recipe(output_dir=str(tmp_path / "first"), train__max_steps=3, lora__train_text_encoder=True))
    assert main(["export", str(first.output_dir), str(tmp_path / "kohya"), "--to", "kohya"]) == 0
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipeline.load_lora_weights(str(first.output_dir), weight_name=LORA_WEIGHTS_NAME)
    prompts = ["a red circle"]
    expected_unet = unet_output(pipeline.unet)
    expected_text = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, prompts)
    for source in (first.output_dir, next((tmp_path / "kohya").glob("*.safetensors"))):
        recipe = make_recipe(lora__init_from=str(source), lora__alpha=8, lora__train_text_encoder=True)  # the first run's alpha is 2
        base, unet = lora_model(recipe)
        assert torch.allclose(unet_output(unet), expected_unet, atol=1e-5), source
        assert torch.allclose(encode_prompts(base.tokenizer, base.text_encoder, prompts), expected_text, atol=1e-5), source
    for overrides, message in (
        ({"lora__rank": 8, "lora__train_text_encoder": True}, r"has rank 4 at .*, this recipe's lora.rank is 8: set lora.rank: 4"),
        ({}, r"has text-encoder layers: set lora.train_text_encoder: true"),
        # Every left-out kind at once, by the name lora.target_modules takes (not the layer's path, which it refuses).
        ({"lora__target_modules": ["to_q"], "lora__train_text_encoder": True},
         r"adapts \d+ layers this recipe's LoRA leaves out \(e\.g\. unet\.\S+\): add to_k, to_out\.0, to_v to lora\.target_modules$"),
    ):
        with pytest.raises(FinetuneError, match=message):
            lora_model(make_recipe(lora__init_from=str(first.output_dir), **overrides))
    # A LoRA (from another trainer) of text-encoder layers this recipe's text-encoder LoRA leaves out (sd-scripts' MLP
    # layers: lora.text_encoder_target_modules adds them), and of one no setting adapts.
    lora = load_lora(first.output_dir / LORA_WEIGHTS_NAME)
    for layer, message in (("mlp.fc1", r"leaves out: add fc1 to lora.text_encoder_target_modules"),
                           ("self_attn.qkv", r"does not train \(it trains q_proj, k_proj, v_proj, out_proj, fc1, fc2\): it cannot start from this file")):  # fmt: skip
        lora_file = tmp_path / "mlp" / f"{layer}.safetensors"
        save_lora_file(dataclasses.replace(lora, layers={key.replace("self_attn.q_proj", layer): value for key, value in lora.layers.items()}), lora_file, "kohya")
        for text_encoder in (True, False):  # said either way: lora.train_text_encoder alone could not take them
            also = ", and set lora.train_text_encoder: true" if layer == "mlp.fc1" and not text_encoder else ""
            with pytest.raises(FinetuneError, match=rf"adapts text-encoder layers \({layer.split('.')[-1]}; e\.g\. text_encoder\.\S+\.{layer}\) that this "
                                                    rf"\S+ text-encoder LoRA {message}{re.escape(also)}$"):  # fmt: skip
                lora_model(make_recipe(lora__init_from=str(lora_file), lora__train_text_encoder=text_encoder))
    with pytest.raises(FinetuneError, match=r"lora.init_from .*nothere not found: give a LoRA .safetensors file"):
        train(make_recipe(lora__init_from=str(tmp_path / "nothere")))
    with pytest.raises(FinetuneError, match=r"lora.init_from starts a LoRA, and method full trains none"):
        make_recipe(method="full", lora__init_from=str(first.output_dir))


def test_an_sd_scripts_lora_of_the_text_encoders_mlp_starts_a_run_with_lora_text_encoder_target_modules(make_recipe, tiny_model, tmp_path):
    """sd-scripts' LoRA adapts each CLIP layer's MLP (fc1, fc2) besides its attention, so a creator's kohya-trained LoRA
    with its text encoder was refused as lora.init_from ("it cannot start from this file"). lora.text_encoder_target_modules
    adds those layers: the run starts as base + that file, as diffusers' load_lora_weights reads it, and trains them."""
    every_layer = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    first = train(make_recipe(output_dir=str(tmp_path / "first"), train__max_steps=2, optimizer__lr=1e-2, lora__train_text_encoder=True,
                              lora__text_encoder_target_modules=every_layer))  # fmt: skip
    lora = load_lora(first.output_dir / LORA_WEIGHTS_NAME)
    mlp = [key for key in lora.layers if key.startswith("text_encoder.") and ".mlp." in key]
    assert mlp and all(lora.layers[key].up.abs().max() > 0 for key in mlp)  # trained, not left at peft's zeros
    kohya_file = tmp_path / "kohya" / "sd-scripts.safetensors"
    save_lora_file(lora, kohya_file, "kohya")
    with safe_open(str(kohya_file), "pt") as f:  # sd-scripts' names of them
        assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in set(f.keys())
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    prompts = ["a red circle"]
    plain_text = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, prompts)
    pipeline.load_lora_weights(str(kohya_file.parent), weight_name=kohya_file.name)
    expected_unet, expected_text = unet_output(pipeline.unet), encode_prompts(pipeline.tokenizer, pipeline.text_encoder, prompts)
    with pytest.raises(FinetuneError, match=r"\(fc1, fc2; e\.g\. \S+\) that this recipe's text-encoder LoRA leaves out: add fc1, fc2 to lora\.text_encoder_target_modules$"):
        lora_model(make_recipe(lora__init_from=str(kohya_file), lora__train_text_encoder=True))
    base, unet = lora_model(make_recipe(lora__init_from=str(kohya_file), lora__train_text_encoder=True, lora__text_encoder_target_modules=every_layer))
    assert torch.allclose(unet_output(unet), expected_unet, atol=1e-5)
    started_text = encode_prompts(base.tokenizer, base.text_encoder, prompts)
    assert torch.allclose(started_text, expected_text, atol=1e-5) and not torch.allclose(started_text, plain_text, atol=1e-3)
    with pytest.raises(FinetuneError, match=r"lora.text_encoder_target_modules picks the text encoder's LoRA layers, and no text-encoder LoRA trains: "
                                         r"remove it \(or set lora.train_text_encoder: true\)"):  # fmt: skip
        make_recipe(lora__text_encoder_target_modules=every_layer)
    with pytest.raises(FinetuneError, match=r"lora.text_encoder_target_modules: 'mlp' is no text-encoder layer a LoRA adapts; pick from q_proj, .*, fc2"):
        make_recipe(lora__train_text_encoder=True, lora__text_encoder_target_modules=["q_proj", "mlp"])
    # Read in one order: a resume given them in another refused its own checkpoint ("['q_proj', ..., 'fc1', 'fc2'] -> [..., 'fc2', 'fc1']").
    reordered = make_recipe(lora__train_text_encoder=True, lora__text_encoder_target_modules=["fc2", "q_proj", "fc1", "fc2"])
    assert reordered.lora.text_encoder_target_modules == ["q_proj", "fc1", "fc2"]


def test_a_run_started_from_a_lora_says_so_records_it_and_keeps_it_when_resumed(make_recipe, tmp_path, capsys):
    first = train(make_recipe(output_dir=str(tmp_path / "first"), train__max_steps=3))
    capsys.readouterr()
    common = dict(output_dir=str(tmp_path / "continued"), checkpoint__every_n_steps=1)
    continued = train(make_recipe(lora__init_from=str(first.output_dir), train__max_steps=2, **common))
    layers = len(load_lora(first.output_dir / LORA_WEIGHTS_NAME).layers)
    assert f"starting from the LoRA {first.output_dir} (lora.init_from): {layers} layers, rank 4, alpha 2, trained 3 steps" in capsys.readouterr().out
    with safe_open(str(continued.output_dir / LORA_WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["finetune.init_from"] == "first" and f.metadata()["finetune.steps"] == "2"
    from finetune.cli.main import main

    assert main(["export", str(continued.output_dir), str(tmp_path / "webui"), "--to", "kohya"]) == 0
    assert "| started from | the LoRA `first`" in (tmp_path / "webui" / "continued.md").read_text()
    # Resumed without the key (it was a command-line override): the record keeps where the weights began.
    train(make_recipe(train__max_steps=3, **common), resume="latest")
    out = capsys.readouterr().out
    assert "starting from the LoRA" not in out and "lora.init_from" not in out  # nor a "settings changed" warning
    assert yaml.safe_load((continued.output_dir / "recipe_as_run.yaml").read_text())["lora"]["init_from"] == str(first.output_dir)
    with safe_open(str(continued.output_dir / LORA_WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["finetune.init_from"] == "first"
    # The LoRA it started from since deleted: the checkpoint holds the weights (it was 'lora.init_from ... not found').
    shutil.rmtree(first.output_dir)
    assert train(make_recipe(lora__init_from=str(first.output_dir), train__max_steps=4, **common), resume="latest").final_step == 4
    with safe_open(str(continued.output_dir / LORA_WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["finetune.init_from"] == "first"


def test_a_lora_recording_no_prediction_type_is_taken_as_the_bases_and_sampled_so_at_step_0(make_recipe, tiny_model, tmp_path, monkeypatch):
    """A LoRA from elsewhere (diffusers' layout, no finetune.prediction_type nor ss_v_parameterization) is taken to be
    trained for the base's epsilon, as sample reads it. Under model.prediction_type it was continued without a word and
    its step-0 grid read as v: noise, where the user expects the LoRA as loaded. Now a warning says so, step 0 reads it
    as epsilon and later grids as v; one recording v is read as v from the start. DreamBooth's LoRA does the same."""
    from validation_sampling import sampled_as

    from finetune.methods import METHODS
    from finetune.methods.lora import add_lora, save_lora
    from finetune.models.loading import load_base_model

    recipe = make_recipe()
    unet = load_base_model(recipe.model).unet
    add_lora(unet, recipe.lora.target_modules, torch.float32, recipe.lora)
    unrecorded = save_lora({"unet": unet}, tmp_path / "theirs" / "theirs.safetensors", {})
    recorded = save_lora({"unet": unet}, tmp_path / "ours" / "ours.safetensors", {"finetune.prediction_type": "v_prediction"})

    def set_up(source, **overrides):
        method = METHODS[overrides.get("method", "lora")](make_recipe(lora__init_from=str(source), model__prediction_type="v_prediction", **overrides))
        method.setup(load_base_model(method.recipe.model))
        return method

    method = set_up(unrecorded)
    assert method.start_lines[-1] == (
        f"warning: lora.init_from {unrecorded} records no prediction type and is taken to be trained for the base's epsilon, this run trains for "
        "v_prediction (model.prediction_type): it starts from what it did not learn (its step-0 samples are read as epsilon, the later ones as "
        "v_prediction); remove model.prediction_type if it was trained for epsilon")  # fmt: skip
    assert (sampled_as(method, 0), sampled_as(method, 2)) == ("epsilon", "v_prediction")
    method = set_up(recorded)
    assert not any(line.startswith("warning") for line in method.start_lines) and sampled_as(method, 0) == "v_prediction"
    concept = {"instance_dir": str(tmp_path), "instance_prompt": "a sks shape"}
    dreambooth = set_up(unrecorded, method="dreambooth", dreambooth={"concepts": [concept], "adapter": "lora", "prior_preservation": False},
                    data__image_dir=None)
    assert dreambooth.started_as_pretrained() and dreambooth.start_lines[-1].startswith(f"warning: lora.init_from {unrecorded} records no prediction type")


def test_the_recorded_name_of_lora_init_from_is_its_folders_name_also_when_given_as_a_dot(make_recipe, tmp_path, monkeypatch):
    """`lora.init_from=.`, run in the LoRA's folder, recorded an empty name ("." has none)."""
    from finetune.outputs.metadata import output_metadata

    (tmp_path / "first").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    recipe = make_recipe(lora__init_from=".")
    assert output_metadata(recipe, step=1, prediction_type="epsilon")["finetune.init_from"] == "first"


def test_a_lora_continued_on_another_noise_schedule_is_warned(make_recipe, tmp_path, capsys):
    """model.zero_terminal_snr changes the noise schedule the LoRA learned on (the prediction type being the same):
    a warning, as for caption tokens, since a deliberate switch is a real use."""
    v = dict(model__prediction_type="v_prediction", train__max_steps=1)
    first = train(make_recipe(output_dir=str(tmp_path / "first"), model__zero_terminal_snr=True, **v))
    capsys.readouterr()
    train(make_recipe(output_dir=str(tmp_path / "continued"), lora__init_from=str(first.output_dir), **v))
    assert (f"warning: lora.init_from {first.output_dir} was trained with a zero-terminal-SNR schedule, this run trains without one: "
            "set model.zero_terminal_snr: true to continue as it was trained") in capsys.readouterr().out
    train(make_recipe(output_dir=str(tmp_path / "same"), lora__init_from=str(first.output_dir), model__zero_terminal_snr=True, **v))
    assert "zero-terminal-SNR" not in capsys.readouterr().out
