"""Our kohya exports as ComfyUI, Forge and the AUTOMATIC1111 webui load them: every key adapts a layer, at our strength.

A key those tools map to no layer is skipped by them ("lora key not loaded"), so a LoRA would do nothing there for
that layer. Their loaders are re-derived in tests/other_tools_loaders.py (which names the code read) and run on an
SD1.5-shaped model (4 UNet blocks of 2 layers, as the webui's fixed numbering needs; tiny widths), trained for a step
with every kind of layer we export: a LoRA of every UNet layer kind with LoCon's own rank and alpha and rsLoRA, the text
encoder's (its MLP too), a DoRA, a DreamBooth LoRA, an fp16 export, and `finetune merge`'s pipeline as one checkpoint file.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import build_recipe
from diffusers import StableDiffusionPipeline
from other_tools_loaders import (CHECKPOINT_CLIP, CHECKPOINT_UNET, LAYER_TENSORS, comfyui_diffusers_layout_names, comfyui_diffusers_names, comfyui_key_map,
                                 comfyui_loaded, comfyui_unet_config, comfyui_weight, webui_module, webui_modules, webui_weight)
from safetensors import safe_open
from safetensors.torch import load_file
from test_single_file import sd15_shaped_pipeline

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.formats.dora import row_norms
from finetune.formats.kohya import kohya_name
from finetune.formats.lora_export import export_lora
from finetune.formats.merge import merge_lora
from finetune.formats.single_file_export import export_checkpoint
from finetune.training.trainer import train

# lora.target_modules naming every kind of Linear and Conv2d layer of SD1.x's UNet ("conv": the down- and upsamplers').
EVERY_UNET_LAYER = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]  # fmt: skip


def run_settings(image_folder) -> dict[str, dict]:
    """The runs whose files are checked, by name: recipe overrides of conftest's build_recipe."""
    concept = {"instance_dir": str(image_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape"}
    return {
        "lora": dict(lora__target_modules=EVERY_UNET_LAYER, lora__conv_rank=2, lora__conv_alpha=1.0, lora__use_rslora=True, lora__train_text_encoder=True,
                     lora__text_encoder_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),  # sd-scripts' text-encoder layers
        "dora": dict(lora__use_dora=True, lora__target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                     lora__train_text_encoder=True, optimizer__lr=1e-2, train__max_steps=2),
        "dreambooth": dict(method="dreambooth", data__image_dir=None, dreambooth={
            "concepts": [concept], "adapter": "lora", "train_text_encoder": True, "num_class_images": 1,
            "class_generation": {"num_inference_steps": 2, "batch_size": 1}}),
    }  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory, image_folder):
    """The base as one original-layout checkpoint file, the runs' folders, their kohya exports and the exports' cards (by run)."""
    folder = tmp_path_factory.mktemp("other-tools")
    sd15_shaped_pipeline(folder).save_pretrained(folder / "base")
    checkpoint, _ = export_checkpoint(folder / "base", folder / "base.safetensors")
    runs, exports, cards = {}, {}, {}
    for name, settings in run_settings(image_folder).items():
        recipe = build_recipe(folder / "base", image_folder, folder / name, **{"train__max_steps": 1, "train__batch_size": 1, **settings})
        runs[name] = train(recipe).output_dir
        exports[name], cards[name], _ = export_lora(runs[name], folder / "webui", "kohya")
    exports["lora-fp16"] = export_lora(runs["lora"], folder / "webui" / "lora-fp16.safetensors", "kohya", precision="fp16")[0]
    return SimpleNamespace(folder=folder, checkpoint=checkpoint, runs=runs, exports=exports, cards=cards)


def shapes_of(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def checkpoint_key(comfyui_weight_name: str) -> str:
    """The checkpoint file's key of a weight as ComfyUI's SD1 model names it."""
    if comfyui_weight_name.startswith("diffusion_model."):
        return "model." + comfyui_weight_name
    return comfyui_weight_name.replace("clip_l.transformer.", CHECKPOINT_CLIP, 1)


def layer_names(tensors) -> set[str]:
    return {key.split(".", 1)[0] for key in tensors}


def test_the_detected_structure_is_sd15s_and_its_names_are_every_weight_of_the_checkpoint(made):
    """ComfyUI's names come from the checkpoint's keys through its diffusers map: the map must name every UNet weight."""
    checkpoint = made.checkpoint
    unet_keys = {key.removeprefix(CHECKPOINT_UNET) for key in shapes_of(checkpoint) if key.startswith(CHECKPOINT_UNET)}
    config = comfyui_unet_config(unet_keys)
    assert config == {"num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                      "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1}  # fmt: skip
    named = {f"{original}.{kind}" for original in comfyui_diffusers_names(config).values() for kind in ("weight", "bias")}
    assert unet_keys <= named  # (the map also names a downsampler of the last level, which SD1.x has not)


@pytest.mark.parametrize("name", ["lora", "lora-fp16", "dora", "dreambooth"])
def test_every_key_of_a_kohya_export_adapts_a_layer_in_comfyui_forge_and_the_webui(made, name):
    checkpoint, exports = made.checkpoint, made.exports
    model = shapes_of(checkpoint)
    comfyui, webui = comfyui_key_map(model), webui_modules(model)
    file = shapes_of(exports[name])
    layers, unknown = layer_names(file), sorted(key for key in file if key.split(".", 1)[1] not in LAYER_TENSORS)
    assert unknown == []  # ComfyUI loads only these of a layer; anything else is "lora key not loaded"
    assert any(layer.startswith("lora_te_") for layer in layers) and any(layer.startswith("lora_unet_") for layer in layers)
    not_mapped = []
    for layer in sorted(layers):
        out_channels = file[f"{layer}.lora_up.weight"][0]
        down = file[f"{layer}.lora_down.weight"]
        weight = model.get(checkpoint_key(comfyui.get(layer, "(none)")))
        if weight is None or (weight[0], math.prod(weight[1:])) != (out_channels, math.prod(down[1:])):
            not_mapped.append(f"ComfyUI/Forge: {layer} -> {comfyui.get(layer)} {weight}")
        module = webui_module(layer, webui)
        shape = webui.get(module)
        # The webui's LoRA module adapts Linear and Conv2d layers only (network_lora.py); a norm's weight is 1-D.
        if shape is None or len(shape) not in (2, 4) or (shape[0], math.prod(shape[1:])) != (out_channels, math.prod(down[1:])):
            not_mapped.append(f"webui: {layer} -> {module} {shape}")
    assert not_mapped == []
    if name == "lora":  # what the run adapted: every kind, the 3x3 convolutions at their own rank
        kinds = ["attn1_to_q", "attn2_to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2", "resnets_0_conv1", "conv2",
                 "time_emb_proj", "conv_shortcut", "downsamplers_0_conv", "upsamplers_0_conv", "conv_in", "conv_out",
                 "time_embedding_linear_1", "time_embedding_linear_2", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]  # fmt: skip
        assert all(any(layer.endswith(kind) for layer in layers) for kind in kinds)
        assert {file[f"{layer}.lora_down.weight"][0] for layer in layers if layer.endswith("conv1")} == {2}


def trained_updates(base, run) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per kohya name: (the base weight, the update the trained peft layer adds, its DoRA magnitudes or None), in fp64."""
    pipeline = StableDiffusionPipeline.from_pretrained(base)
    pipeline.load_lora_weights(str(run), weight_name=LORA_WEIGHTS_NAME, adapter_name="run")
    updates = {}
    for part in ("unet", "text_encoder"):
        for path, module in getattr(pipeline, part).named_modules():
            if hasattr(module, "lora_A") and "run" in module.lora_A:
                magnitude = module.lora_magnitude_vector["run"].weight.reshape(-1) if module.use_dora.get("run") else None
                delta = module.get_delta_weight("run")  # scale (alpha/rank, alpha/sqrt(rank) with rsLoRA) x up @ down
                updates[kohya_name(f"{part}.{path}")] = (module.get_base_layer().weight.double(), delta.double(), magnitude)
    return updates


def fp16_rounding(tensors, layer: str, shape) -> torch.Tensor:
    """How far an fp16 export's rounding of a layer's lora_up and lora_down (here, the fp32 export's) can move each
    element of its update, to first order. fp16 keeps 11 significant bits (2^-11 of a value, at most) down to 2^-14 and
    steps of 2^-24 below: where the up weights of a layer that barely trained lie, as the mid block's self-attention q
    and k (over its one token the softmax is 1, so their gradient is 0 but for the CPU kernels' rounding)."""
    up, down = (tensors[f"{layer}.lora_{part}.weight"].double().flatten(1) for part in ("up", "down"))
    scale = tensors[f"{layer}.alpha"].item() / down.shape[0]
    rounded = lambda factor: factor.abs() * 2**-11 + 2**-25  # noqa: E731
    return (scale * (rounded(up) @ down.abs() + up.abs() @ rounded(down))).reshape(shape)


@pytest.mark.parametrize("name", ["lora", "lora-fp16", "dreambooth"])
def test_comfyui_forge_and_the_webui_add_the_update_we_trained_at_each_strength(made, name):
    """The file's alpha/rank, which ComfyUI and the webui scale by, is the scale peft trained with (rsLoRA's alpha/sqrt(rank),
    LoCon's conv_alpha), and their strength multiplies the update as `finetune sample --lora-scale` does."""
    folder, checkpoint, runs, exports = made.folder, made.checkpoint, made.runs, made.exports
    tensors, model = load_file(exports[name]), load_file(checkpoint)
    comfyui = comfyui_key_map(model)
    updates = trained_updates(folder / "base", runs[name.removesuffix("-fp16")])
    assert updates.keys() == layer_names(tensors)
    fp32_tensors = load_file(exports["lora"]) if name.endswith("fp16") else None
    for layer, (weight, update, _) in updates.items():
        assert torch.equal(model[checkpoint_key(comfyui[layer])].double(), weight), layer  # the tools' weight is the one peft adapted
        rounding = fp16_rounding(fp32_tensors, layer, weight.shape) if fp32_tensors else 0.0
        for strength in (1.0, 0.5):
            expected = strength * update
            atol = 1e-6 * update.abs().max().item() + strength * rounding  # fp32's rounding of peft's up @ down, and fp16's
            for tool_weight in (comfyui_weight, webui_weight):
                assert ((tool_weight(weight, tensors, layer, strength) - weight - expected).abs() <= atol).all(), (tool_weight.__name__, layer)


def test_comfyui_reads_the_dora_magnitudes_on_their_output_axis_and_the_webui_does_not(made):
    """Both load `dora_scale` beside the LoRA. ComfyUI and Forge tell the axis from its first dimension (ours: the output
    channels, as peft decomposes) but divide by the base weight's row norms, not the adapted weight's as peft and LyCORIS
    do: each output channel comes out ||W + dW|| / ||W|| times ours (docs/sampling-and-sharing.md says so). The webui
    always decomposes per input channel: another model (the docs and the export's card send a DoRA there through
    `finetune merge`)."""
    folder, runs, exports = made.folder, made.runs, made.exports
    tensors = load_file(exports["dora"])
    updates = trained_updates(folder / "base", runs["dora"])
    assert updates.keys() == layer_names(tensors) and all(magnitude is not None for _, _, magnitude in updates.values())
    for layer, (weight, update, magnitude) in updates.items():
        adapted = weight + update  # peft's DoRA: m * (W + dW) / ||W + dW||, per output channel
        ours = adapted * (magnitude.double() / row_norms(adapted)).reshape(-1, *[1] * (weight.dim() - 1))
        assert tuple(tensors[f"{layer}.dora_scale"].shape) == (weight.shape[0], *[1] * (weight.dim() - 1)), layer
        assert torch.allclose(tensors[f"{layer}.dora_scale"].double().reshape(-1), magnitude.double()), layer
        per_channel = (row_norms(weight + update) / row_norms(weight)).reshape(-1, *[1] * (weight.dim() - 1))
        atol = 1e-6 * update.abs().max().item()  # fp32's rounding of peft's up @ down, which `ours` is made of
        assert torch.allclose(comfyui_weight(weight, tensors, layer, 1.0), ours * per_channel, rtol=1e-6, atol=atol), layer
        assert not torch.allclose(webui_weight(weight, tensors, layer, 1.0), ours, atol=1e-3), layer


def test_a_dora_exports_card_tells_webui_users_to_merge_it_and_a_loras_does_not(made):
    """It told them to copy a DoRA to models/Lora as any LoRA, and said ComfyUI applies it: the webui makes another model of it."""
    dora, lora = made.cards["dora"].read_text(), made.cards["lora"].read_text()
    assert "| DoRA | a magnitude per output channel beside each layer's LoRA (lora.use_dora): diffusers and LyCORIS apply it as trained, " \
           "ComfyUI and Forge nearly (each channel normed by the base weight) |" in dora
    merge = f"finetune merge --base BASE --lora {made.exports['dora'].name} --strength 1.0 merged/"
    assert ("The AUTOMATIC1111 webui decomposes a DoRA per input channel, not per output channel as it was trained: another model. "
            f"For the webui, fold it into the base and write one checkpoint: `{merge}`, then `finetune export-checkpoint merged/ "
            f"{made.exports['dora'].stem}-merged.safetensors`.") in dora  # fmt: skip
    assert "DoRA" not in lora and "export-checkpoint" not in lora


def test_merge_writes_a_checkpoint_whose_every_weight_comfyui_and_the_webui_load_where_the_lora_put_it(made):
    """The webui loads a checkpoint's weights by name and skips unknown ones without a word (strict=False), ComfyUI
    likewise: every UNet weight of `finetune merge`'s pipeline must be under the name ComfyUI's diffusers map gives it."""
    folder, runs = made.folder, made.runs
    merged = merge_lora(str(folder / "base"), str(runs["lora"]), 1.0, folder / "merged")
    file, _ = export_checkpoint(merged, folder / "merged.safetensors")
    tensors = load_file(file)
    pipeline = StableDiffusionPipeline.from_pretrained(merged)
    unet_keys = {key.removeprefix(CHECKPOINT_UNET) for key in tensors if key.startswith(CHECKPOINT_UNET)}
    names = comfyui_diffusers_names(comfyui_unet_config(unet_keys))
    unet = pipeline.unet.state_dict()
    assert len(unet_keys) == len(unet)
    for key, value in unet.items():
        module, kind = key.rsplit(".", 1)
        assert torch.equal(tensors[f"{CHECKPOINT_UNET}{names[module]}.{kind}"], value), key
    clip = {key: value for key, value in pipeline.text_encoder.state_dict().items() if not key.endswith("position_ids")}
    for key, value in clip.items():
        assert torch.equal(tensors[f"{CHECKPOINT_CLIP}text_model.{key.removeprefix('text_model.')}"], value), key
    base = load_file(folder / "base.safetensors")
    changed = {key for key in base if key.startswith(CHECKPOINT_UNET) and not torch.equal(base[key], tensors[key])}
    assert f"{CHECKPOINT_UNET}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in changed  # the LoRA is in it


def test_comfyui_loads_a_diffusers_layout_file_in_part_only_so_the_docs_send_it_the_kohya_export(made):
    """ComfyUI names a diffusers-layout UNet's attention projections only as diffusers' old attention processors did
    (`unet.<path>.processor.to_q`), so of a training run's own file it skips those ("lora key not loaded": the default
    LoRA's whole UNet part), and it reads no alpha there (the file's is in lora_adapter_metadata): scale 1, not alpha/rank."""
    checkpoint, runs = made.checkpoint, made.runs
    keys = set(shapes_of(runs["lora"] / LORA_WEIGHTS_NAME))
    skipped = keys - comfyui_loaded(keys, comfyui_diffusers_layout_names(shapes_of(checkpoint)))
    attention = re.compile(r"unet\..+\.attn[12]\.to_(q|k|v|out\.0)\.lora\.(down|up)\.weight")
    assert skipped == {key for key in keys if attention.fullmatch(key)} and skipped
    assert any(key.startswith("text_encoder.text_model.") for key in keys - skipped)
    assert not any(key.endswith(".alpha") for key in keys)
