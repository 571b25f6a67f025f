"""A DoRA's files: the kohya export LyCORIS and ComfyUI read (`dora_scale`, one per output channel) and its way back,
what `finetune sample` loads, and the files refused in one line."""

import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.errors import FinetuneError
from finetune.formats.kohya import LoRA, LoRALayer, load_lora, save_lora_file
from finetune.formats.lora_export import export_lora
from finetune.sampling.inference import load_lora_into
from dora_helpers import loaded_by_diffusers, train_dora
from test_lora_training import unet_output

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture
def dora_run(make_recipe):
    return train_dora(make_recipe)


def lycoris_output_axis(weight, down, up, alpha, dora_scale):
    """LyCORIS' weight decomposition on the output axis (`wd_on_output`), from a kohya file's tensors as they are."""
    rank = down.shape[0]
    combined = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / rank)
    norm = combined.reshape(combined.shape[0], -1).norm(dim=1).reshape(combined.shape[0], *[1] * (combined.dim() - 1))
    return combined * (dora_scale / norm)


def test_the_kohya_export_holds_lycoris_output_axis_scales_and_comes_back_as_the_same_model(dora_run, tmp_path):
    recipe, lora_file = dora_run
    kohya_file, card, _ = export_lora(lora_file, tmp_path / "webui", "kohya")
    assert "| DoRA | a magnitude per output channel beside each layer's LoRA (lora.use_dora)" in card.read_text()
    with safe_open(str(kohya_file), "pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}.items() <= json.loads(metadata["ss_network_args"]).items()
    # What LyCORIS computes from the file's own tensors is the layer peft trained, for a Linear and a 3x3 conv layer.
    trained = loaded_by_diffusers(recipe.model.pretrained, lora_file).unet
    for module in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"):
        name = "lora_unet_" + module.replace(".", "_")
        layer = trained.get_submodule(module)
        base = layer.get_base_layer().weight
        assert tensors[f"{name}.dora_scale"].shape == (base.shape[0], *[1] * (base.dim() - 1))
        expected = lycoris_output_axis(base, *(tensors[f"{name}.{key}"] for key in ("lora_down.weight", "lora_up.weight")),
                                       tensors[f"{name}.alpha"].item(), tensors[f"{name}.dora_scale"])  # fmt: skip
        x = torch.randn(2, *base.shape[1:2], *([8, 8] if base.dim() == 4 else []), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = layer(x) - (0 if layer.get_base_layer().bias is None else layer.get_base_layer().bias.reshape(-1, *[1] * (x.dim() - 2)))
            direct = torch.nn.functional.conv2d(x, expected, padding=1) if base.dim() == 4 else x @ expected.T
        assert torch.allclose(got, direct, atol=1e-5), module
    # Read back (as sample and export --to diffusers read it): the same magnitudes, the same UNet and text encoder.
    original, back = load_lora(lora_file), load_lora(kohya_file)
    assert back.layers.keys() == original.layers.keys()
    assert all(torch.equal(back.layers[key].magnitude, layer.magnitude) for key, layer in original.layers.items())
    sampled = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
    load_lora_into(sampled, back, kohya_file, "lora")  # finetune sample's loading
    assert torch.allclose(unet_output(sampled.unet), unet_output(trained), atol=1e-5)
    diffusers_again, *_ = export_lora(kohya_file, tmp_path / "again", "diffusers")
    assert torch.allclose(unet_output(loaded_by_diffusers(recipe.model.pretrained, diffusers_again).unet), unet_output(trained), atol=1e-5)


def test_dora_files_with_magnitudes_missing_are_refused_in_one_line(tmp_path):
    """(One per input channel, LyCORIS' other decomposition: tests/test_other_tools_files.py.)"""
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    tensors = {f"{name}.{key}": value for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                                                   "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k")
               for key, value in (("lora_down.weight", down.clone()), ("lora_up.weight", up.clone()))}  # fmt: skip
    save_file({**tensors, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale": torch.rand(32, 1)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(FinetuneError, match=r"^LoRA \S+half.safetensors: it has DoRA magnitudes for 1 of its 2 layers only \(\S+to_k has none\): a damaged or cut file\?$"):
        load_lora(tmp_path / "half.safetensors")
    save_lora_file(LoRA({Q: LoRALayer(down, up, 4.0)}), tmp_path / "plain" / LORA_WEIGHTS_NAME, "diffusers")
    with safe_open(str(tmp_path / "plain" / LORA_WEIGHTS_NAME), "pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.use_dora"] is False  # a plain LoRA says so; one saying DoRA must hold the magnitudes
    save_file(tensors, str(tmp_path / "cut.safetensors"), {**metadata, "lora_adapter_metadata": json.dumps({**config, "unet.use_dora": True})})
    with pytest.raises(FinetuneError, match=r"^LoRA \S+cut.safetensors: its lora_adapter_metadata says DoRA \(use_dora\) and it holds no DoRA "
                                            r"magnitudes \(lora_magnitude_vector\): a damaged or cut file\?$"):  # fmt: skip
        load_lora(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("shape", [(3, 1), (32, 2), (), (0,)])
def test_kohya_magnitudes_of_no_layers_shape_are_called_damaged_not_another_decomposition(tmp_path, shape):
    """Only LyCORIS' (1, in, ...) is a scale per input channel; a dora_scale cut or edited to any other shape was called one too,
    which sent the user looking for a LyCORIS setting instead of a good copy of the file."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4), f"{name}.dora_scale": torch.rand(shape)},
              str(tmp_path / "cut.safetensors"))  # fmt: skip
    with pytest.raises(FinetuneError, match=rf"^LoRA \S+cut.safetensors: LoRA key {name}.dora_scale \({re.escape(str(shape))}\) is not one DoRA "
                                            r"magnitude per output channel \(32\) nor per input channel: a damaged file\? get it again$"):  # fmt: skip
        load_lora(tmp_path / "cut.safetensors")


def test_a_kohya_file_whose_metadata_says_dora_must_hold_its_magnitudes(tmp_path):
    """A LyCORIS DoRA whose dora_scale tensors a converter dropped (keeping ss_network_args) loaded as a plain LoRA: another model."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4)}
    args = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})}
    save_file(tensors, str(tmp_path / "dropped.safetensors"), args)
    with pytest.raises(FinetuneError, match=r"^LoRA \S+dropped.safetensors: its ss_network_args say DoRA \(dora_wd\) and it holds no DoRA magnitudes "
                                            r"\(dora_scale\): a damaged file, or one converted by a tool that drops them\? get the original$"):  # fmt: skip
        load_lora(tmp_path / "dropped.safetensors")
    save_file({**tensors, f"{name}.dora_scale": torch.rand(32, 1)}, str(tmp_path / "whole.safetensors"), args)
    assert load_lora(tmp_path / "whole.safetensors").layers[Q].magnitude.shape == (32,)
    save_file(tensors, str(tmp_path / "plain.safetensors"), {**args, "ss_network_args": json.dumps({"algo": "lora", "dora_wd": "False"})})
    assert load_lora(tmp_path / "plain.safetensors").layers[Q].magnitude is None
