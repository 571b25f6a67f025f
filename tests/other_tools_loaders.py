"""How ComfyUI, Forge and the AUTOMATIC1111 webui find the layer a kohya LoRA key adapts, and what they add to it.

Re-derived from their loaders' code (read, not imported; none is installed here), for an SD1.x checkpoint in the
original layout as those tools load it (`finetune export-checkpoint` writes one):

- ComfyUI (comfyanonymous/ComfyUI comfy/lora.py@41444b5 `model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`;
  comfy/utils.py@2ba5cc8 `unet_to_diffusers`; comfy/model_detection.py@d415a44 `detect_unet_config`;
  comfy/weight_adapter/lora.py@6fd406f and base.py@9c0cf36 `weight_decompose`). It reads the UNet's block structure from
  the checkpoint's keys, builds diffusers' name of every original weight from it, and accepts `lora_unet_<name>` under
  either name; the text encoder's only for the six Linear layers of each CLIP layer. A key it maps to no weight is
  printed as "lora key not loaded" and skipped. Forge (lllyasviel/stable-diffusion-webui-forge
  packages_3rdparty/comfyui_lora_collection/lora.py@5e1dcd3, backend/patcher/lora.py@cea9f37) uses the same code.
- The webui (AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py@873edba
  `convert_diffusers_name_to_compvis`, network_lora.py@ea90381, network.py's `apply_weight_decompose` of v1.9+) turns a
  diffusers name into the original module's with SD1.5's fixed numbering (3 layers per level), and looks that up among
  the model's modules; a key it finds no module for is listed as "Failed to match keys" and skipped.
"""

from __future__ import annotations

import re

import torch

CHECKPOINT_UNET, CHECKPOINT_CLIP = "model.diffusion_model.", "cond_stage_model.transformer."
# comfy/lora.py LORA_CLIP_MAP: the CLIP layers ComfyUI gives kohya names to.
COMFYUI_CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
# comfy/utils.py: the original's names of a ResNet's layers -> diffusers', and the layers of an attention block.
RESNET_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
                 "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
ATTENTION_LAYERS = ("proj_in", "proj_out", "norm")
TRANSFORMER_LAYERS = ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
                      *(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")))  # fmt: skip
TOP_LAYERS = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}  # fmt: skip
# What a kohya LoRA layer holds, as both tools read it.
LAYER_TENSORS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")


def flat(path: str) -> str:
    return path.replace(".", "_")


# --- ComfyUI and Forge ---------------------------------------------------------------------------


def _blocks(keys, prefix: str) -> int:
    """How many `prefix.format(n)` for n = 0, 1, ... some key starts with (comfy's count_blocks)."""
    count = 0
    while any(key.startswith(prefix.format(count)) for key in keys):
        count += 1
    return count


def _transformer_depth(keys, block: str) -> int:
    return _blocks(keys, f"{block}1.transformer_blocks.{{}}.")


def comfyui_unet_config(unet_keys) -> dict:
    """detect_unet_config's block structure of an original-layout UNet (keys without `model.diffusion_model.`)."""
    res_blocks, depth, depth_out, level_res_blocks = [], [], [], 0
    inputs = _blocks(unet_keys, "input_blocks.{}.")
    for n in range(inputs):
        block, mirror = f"input_blocks.{n}.", f"output_blocks.{inputs - n - 1}."  # the output blocks in reverse order
        if f"{block}0.op.weight" in unet_keys:  # a downsampler ends a level
            res_blocks.append(level_res_blocks)
            level_res_blocks = 0
            depth_out.append(_transformer_depth(unet_keys, mirror))
            continue
        if f"{block}0.in_layers.0.weight" in unet_keys:
            level_res_blocks += 1
            depth.append(_transformer_depth(unet_keys, block))
        if f"{mirror}0.in_layers.0.weight" in unet_keys:
            depth_out.append(_transformer_depth(unet_keys, mirror))
    res_blocks.append(level_res_blocks)
    return {"num_res_blocks": res_blocks, "transformer_depth": depth, "transformer_depth_output": depth_out,
            "transformer_depth_middle": _blocks(unet_keys, "middle_block.1.transformer_blocks.{}.")}  # fmt: skip


def _attention(names: dict, diffusers: str, original: str, transformers: int) -> None:
    for layer in ATTENTION_LAYERS:
        names[f"{diffusers}.{layer}"] = f"{original}.{layer}"
    for t in range(transformers):
        for layer in TRANSFORMER_LAYERS:
            names[f"{diffusers}.transformer_blocks.{t}.{layer}"] = f"{original}.transformer_blocks.{t}.{layer}"


def _resnet(names: dict, diffusers: str, original: str) -> None:
    for theirs, ours in RESNET_LAYERS.items():
        names[f"{diffusers}.{ours}"] = f"{original}.{theirs}"


def comfyui_diffusers_names(config: dict) -> dict[str, str]:
    """unet_to_diffusers, by module: diffusers' module path -> the original's, for the detected structure."""
    names, depth, depth_out = dict(TOP_LAYERS), list(config["transformer_depth"]), list(config["transformer_depth_output"])
    res_blocks = config["num_res_blocks"]
    for level, count in enumerate(res_blocks):
        n = 1 + (count + 1) * level
        for i in range(count):
            _resnet(names, f"down_blocks.{level}.resnets.{i}", f"input_blocks.{n}.0")
            transformers = depth.pop(0)
            if transformers:
                _attention(names, f"down_blocks.{level}.attentions.{i}", f"input_blocks.{n}.1", transformers)
            n += 1
        names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    _attention(names, "mid_block.attentions.0", "middle_block.1", config["transformer_depth_middle"])
    for i, n in enumerate((0, 2)):
        _resnet(names, f"mid_block.resnets.{i}", f"middle_block.{n}")
    for level, count in enumerate(reversed(res_blocks)):
        n = (count + 1) * level
        for i in range(count + 1):
            _resnet(names, f"up_blocks.{level}.resnets.{i}", f"output_blocks.{n}.0")
            after = 1
            transformers = depth_out.pop()
            if transformers:
                after = 2
                _attention(names, f"up_blocks.{level}.attentions.{i}", f"output_blocks.{n}.1", transformers)
            if i == count:
                names[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{n}.{after}.conv"
            n += 1
    return names


def comfyui_key_map(checkpoint_keys) -> dict[str, str]:
    """A kohya layer name -> the weight it patches (model_lora_keys_unet and _clip, as ComfyUI's SD1 model names its weights)."""
    unet_keys = {key.removeprefix(CHECKPOINT_UNET) for key in checkpoint_keys if key.startswith(CHECKPOINT_UNET)}
    key_map = {}
    for key in unet_keys:
        if key.endswith(".weight"):
            key_map[f"lora_unet_{flat(key.removesuffix('.weight'))}"] = f"diffusion_model.{key}"
    for diffusers, original in comfyui_diffusers_names(comfyui_unet_config(unet_keys)).items():
        key_map[f"lora_unet_{flat(diffusers)}"] = f"diffusion_model.{original}.weight"
    clip_keys = {key.replace(CHECKPOINT_CLIP, "clip_l.transformer.", 1) for key in checkpoint_keys if key.startswith(CHECKPOINT_CLIP)}
    for key in clip_keys:
        match = re.fullmatch(r"clip_l\.transformer\.text_model\.encoder\.layers\.(\d+)\.(.+)\.weight", key)
        if match and match[2] in COMFYUI_CLIP_LAYERS:
            key_map[f"lora_te_text_model_encoder_layers_{match[1]}_{flat(match[2])}"] = key
    return key_map


def comfyui_weight(weight: torch.Tensor, tensors: dict[str, torch.Tensor], name: str, strength: float) -> torch.Tensor:
    """The weight ComfyUI patches `weight` to with the kohya layer `name` (LoRAAdapter.calculate_weight, weight_decompose)."""
    up, down = (tensors[f"{name}.{part}.weight"].to(weight.dtype) for part in ("lora_up", "lora_down"))
    alpha = tensors[f"{name}.alpha"].item() / down.shape[0] if f"{name}.alpha" in tensors else 1.0
    diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    scale = tensors.get(f"{name}.dora_scale")
    if scale is None:
        return weight + strength * alpha * diff
    adapted = weight + alpha * diff
    if scale.shape[0] == weight.shape[0]:  # a magnitude per output channel: normed by the weight before the update
        norm = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = adapted.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    decomposed = adapted * (scale.to(weight.dtype) / (norm + torch.finfo(weight.dtype).eps))
    return weight + strength * (decomposed - weight)


# --- the webui -----------------------------------------------------------------------------------


def webui_modules(checkpoint: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """network_layer_mapping of an SD1 model, by the shape of each module's weight: `diffusion_model_<path>` for the
    UNet (sd_model.model), `transformer_<path>` for CLIP (cond_stage_model.wrapped)."""
    modules = {}
    for key, shape in checkpoint.items():
        if key.endswith(".weight"):
            path = key.removesuffix(".weight")
            if path.startswith(CHECKPOINT_UNET):
                modules["diffusion_model_" + flat(path.removeprefix(CHECKPOINT_UNET))] = shape
            elif path.startswith(CHECKPOINT_CLIP):
                modules["transformer_" + flat(path.removeprefix(CHECKPOINT_CLIP))] = shape
    return modules


RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
WEBUI_NAMES = [  # (pattern, the module it names) in convert_diffusers_name_to_compvis' order, for an SD1 model
    (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{_suffix(m[2], m[4])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(m[1], m[3])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{_suffix(m[2], m[4])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
]  # fmt: skip


def _suffix(kind: str, layer: str) -> str:
    return RESNET_SUFFIXES.get(layer, layer) if kind == "resnets" else layer


def webui_module(name: str, modules: dict) -> str | None:
    """The module a kohya layer name adapts in the webui (load_network), or None: the key is skipped."""
    for pattern, module in WEBUI_NAMES:
        match = re.match(pattern, name)
        if match:
            converted = module(match)
            break
    else:
        converted = name
    if converted in modules:
        return converted
    original = name.replace("lora_unet", "diffusion_model")  # names already in the original layout
    return original if "lora_unet" in name and original in modules else None


def webui_weight(weight: torch.Tensor, tensors: dict[str, torch.Tensor], name: str, strength: float) -> torch.Tensor:
    """The weight the webui gives the module (NetworkModuleLora.calc_updown, finalize_updown, apply_weight_decompose)."""
    up, down = (tensors[f"{name}.{part}.weight"].to(weight.dtype) for part in ("lora_up", "lora_down"))
    scale = tensors[f"{name}.alpha"].item() / down.shape[0] if f"{name}.alpha" in tensors else 1.0
    updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
    magnitude = tensors.get(f"{name}.dora_scale")
    if magnitude is not None:  # always per input channel
        adapted = weight + updown
        norm = adapted.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
        updown = adapted * (magnitude.to(weight.dtype) / norm) - weight
    return weight + updown * strength


# --- ComfyUI, of a file in diffusers' layout ----------------------------------------------------------

# load_lora's (up, down) endings of a layer's names: kohya's, diffusers' old attention processors', peft's, diffusers',
# transformers' (as Forge's copy; ComfyUI's LoRAAdapter adds two of other models' trainers).
COMFYUI_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"), (".lora_B.weight", ".lora_A.weight"),
                 (".lora.up.weight", ".lora.down.weight"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))  # fmt: skip


def comfyui_diffusers_layout_names(checkpoint_keys) -> set[str]:
    """The layer names model_lora_keys_unet and _clip give an SD1 model in diffusers' layout: the UNet's as diffusers'
    attention processors named them (`unet.<path>.processor.to_q`, `...processor.to_out`), CLIP's under `text_model.`."""
    unet_keys = {key.removeprefix(CHECKPOINT_UNET) for key in checkpoint_keys if key.startswith(CHECKPOINT_UNET)}
    names = set()
    for diffusers in comfyui_diffusers_names(comfyui_unet_config(unet_keys)):
        name = diffusers.replace(".to_", ".processor.to_")
        names |= {name.removesuffix(".0") if name.endswith(".to_out.0") else name for name in (name, "unet." + name)}
    for key in checkpoint_keys:
        match = re.fullmatch(re.escape(CHECKPOINT_CLIP) + r"(text_model\.encoder\.layers\.\d+\.(.+))\.weight", key)
        if match and match[2] in COMFYUI_CLIP_LAYERS:
            names.add(f"text_encoder.{match[1]}")
    return names


def comfyui_loaded(keys: set[str], names: set[str]) -> set[str]:
    """The keys of a file load_lora uses for the layers `names`; it prints "lora key not loaded" for the others."""
    loaded = set()
    for name in names:
        for up, down in COMFYUI_PAIRS:
            if name + up in keys:
                loaded |= {name + up, name + down}
                break
        loaded |= {f"{name}.alpha", f"{name}.dora_scale"} & keys
    return loaded
