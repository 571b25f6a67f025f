"""SD1.x's UNet as the original (CompVis/LDM) Stable Diffusion layout names it, and diffusers' names for it.

One mapping both ways: `finetune export-checkpoint` writes a pipeline's UNet under the original names, and
LoRA files that name the UNet's layers by the original blocks (`lora_unet_input_blocks_1_1_proj_in`, as
sd-scripts names SDXL's and some tools SD1.x's) are read under diffusers' names
(`lora_unet_down_blocks_0_attentions_0_proj_in`). The numbering is diffusers' own single-file conversion's
(`convert_ldm_unet_checkpoint`); SD1.x and SD2.x both have 4 blocks of 2 layers, so it holds for either.

Whether a whole pipeline is of the shape that layout describes (`check_sd1_shape`) is here too, read from its configs
without torch: `finetune export-checkpoint` says another shape before torch loads.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.counts import counted
from finetune.errors import FinetuneError

if TYPE_CHECKING:  # annotations only: a LoRA file's names are checked before torch loads (finetune.formats.lora_kinds)
    import torch

UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                     "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
KOHYA_UNET = "lora_unet_"
# The original UNet's top-level modules, as kohya names start: no diffusers module name starts so.
ORIGINAL_UNET_ROOTS = tuple(KOHYA_UNET + root for root in ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "out_"))
# SD1.x's and SD2.x's transformers are one block deep; SDXL's (same original block names) up to ten.
SDXL_TRANSFORMER_BLOCK = re.compile(r"_transformer_blocks_[1-9]")
SD1_DOWN_BLOCKS = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
SD1_UP_BLOCKS = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3


def unet_prefixes() -> dict[str, str]:
    """diffusers' module prefix -> the original's, for SD1.x's UNet (4 blocks of 2 layers).

    The original numbers its modules in one sequence per direction. input_blocks: 0 is conv_in, then per
    block its 2 layers and its downsampler. output_blocks: 3 layers per block (one more than going down: the
    extra one takes the skip from the downsampler's level), the upsampler inside the block's last layer.
    """
    names = {
        "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.", "conv_in.": "input_blocks.0.0.",
        "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.1.": "middle_block.2.",
        "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
    }  # fmt: skip
    for i in range(4):
        for j in range(2):
            names[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{3 * i + j + 1}.0."
            if i < 3:
                names[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{3 * i + j + 1}.1."
        for j in range(3):
            names[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{3 * i + j}.0."
            if i > 0:
                names[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{3 * i + j}.1."
        if i < 3:
            names[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{3 * i + 3}.0.op."
            # After the resnet, and after the attention in the blocks that have one (all but the first).
            names[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{3 * i + 2}.{2 if i else 1}."
    return names


def _flat(path: str) -> str:
    """A module path as kohya's names write it: `.` turned into `_`."""
    return path.replace(".", "_")


@functools.cache
def _kohya_prefixes() -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) as kohya names write them, longest first (a prefix never takes a longer one's names)."""
    pairs = [(_flat(original), _flat(diffusers)) for diffusers, original in unet_prefixes().items()]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def diffusers_kohya_name(name: str) -> str:
    """`lora_unet_input_blocks_1_1_proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`; other names as they are."""
    if not name.startswith(ORIGINAL_UNET_ROOTS):
        return name
    module = name.removeprefix(KOHYA_UNET) + "_"  # the prefixes end in `_`: input_blocks_1_ is no prefix of input_blocks_10_
    for original, diffusers in _kohya_prefixes():
        if not module.startswith(original):
            continue
        rest = module[len(original):].removesuffix("_")
        if "_resnets_" not in diffusers:  # attentions name their layers as diffusers does
            return KOHYA_UNET + (diffusers + rest).removesuffix("_")
        # Inside a resnet the original names its layers apart too (in_layers_2: conv1).
        for new, old in UNET_RESNET_NAMES.items():
            if _flat(old) == rest:
                return KOHYA_UNET + diffusers + new
    raise FinetuneError(f"LoRA key {name} names no layer of SD1.x's UNet in the original layout (4 blocks of 2 layers: input_blocks 0-11, "
                        "middle_block 0-2, output_blocks 0-11)")  # fmt: skip


def with_diffusers_unet_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors of a kohya file, its UNet layers named by the original blocks renamed to diffusers' names."""
    renamed = {}
    for key, tensor in tensors.items():
        name, dot, suffix = key.partition(".")
        new_key = diffusers_kohya_name(name) + dot + suffix
        if new_key in renamed:  # by its original name and by diffusers': which one counts is anyone's guess
            raise FinetuneError(f"LoRA key {key} adapts a layer another key adapts too ({new_key} in diffusers' names): a file naming a layer twice is not loaded")
        renamed[new_key] = tensor
    return renamed


def names_sdxl_blocks(keys: list[str]) -> bool:
    """Whether original-layout UNet names are SDXL's: its transformers are deeper than SD1.x's single block."""
    return any(key.startswith(ORIGINAL_UNET_ROOTS) and SDXL_TRANSFORMER_BLOCK.search(key) for key in keys)


def pipeline_config(path: Path) -> dict:
    """A pipeline part's JSON config, or one line naming the file."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FinetuneError(f"{path} cannot be read ({err.__class__.__name__}): copy the whole pipeline folder again") from None


def check_sd1_shape(folder: Path) -> dict[str, dict]:
    """The parts' configs, once each is known to be SD1.x's shape (whatever its widths): only such a pipeline has names in
    the original layout (`finetune export-checkpoint`). From its configs alone, without torch: the command says it before
    torch loads."""
    configs = {part: pipeline_config(folder / part / "config.json") for part in ("unet", "vae", "text_encoder")}
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    encoder_class = (pipeline_config(folder / "model_index.json").get("text_encoder") or [None, None])[-1]
    down, up = list(unet.get("down_block_types", [])), list(unet.get("up_block_types", []))
    vae_blocks, vae_layers, latent_channels = len(vae.get("down_block_types", [])), vae.get("layers_per_block"), vae.get("latent_channels")
    problems = [
        (encoder_class != "CLIPTextModel", f"its text encoder is a {encoder_class}, not a CLIPTextModel"),
        ((len(down), unet.get("layers_per_block")) != (4, 2), f"this UNet has {len(down)} blocks of {counted(unet.get('layers_per_block'), 'layer')} (SD1.x's: 4 of 2)"),
        ((down, up) != (SD1_DOWN_BLOCKS, SD1_UP_BLOCKS) or unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn",
         f"this UNet's blocks are {down} down, {up} up (SD1.x's: 3 CrossAttnDownBlock2D and a DownBlock2D, mirrored up)"),
        (unet.get("transformer_layers_per_block", 1) != 1, "this UNet has several transformer layers per attention (SD1.x's: 1)"),
        (unet.get("class_embed_type") or unet.get("addition_embed_type"), "this UNet takes class or added embeddings (SD1.x's does not)"),
        (unet.get("time_cond_proj_dim"), "this UNet takes a guidance embedding (time_cond_proj_dim, as LCM-distilled models), which SD1.x's has no place for"),
        (unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024 or text.get("hidden_act") != "quick_gelu",
         "this is SD2-style (OpenCLIP text encoder, 1024-wide cross-attention or linear attention projections), which that layout stores differently"),
        # (its layers per block are a size, as the widths are: `usage_notes` says the webui builds SD1.5's 2)
        ((vae_blocks, latent_channels) != (4, 4) or not isinstance(vae_layers, int) or vae_layers < 1,
         f"this VAE has {vae_blocks} blocks of {counted(vae_layers, 'layer')} and {latent_channels} latent channels (SD1.x's: 4 blocks, 4 channels)"),
    ]  # fmt: skip
    for wrong, what in problems:
        if wrong:
            raise FinetuneError(f"{folder} cannot be exported as a webui checkpoint: that layout describes SD1.x's architecture, and {what}")
    return configs
