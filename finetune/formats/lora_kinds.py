"""What kind of adapter a LoRA file's names say it is, when it is one this project does not load; the older
names diffusers' own trainers wrote, renamed to today's; CLIP's module paths as files name them; and the SD
version a kohya export records for the webui.

One check for the loader (`finetune.formats.kohya.load_lora`: sample, merge, eval, export, lora.init_from), the
demo's adapter list (`finetune.demo.adapter_scan`) and the commands that read a LoRA's record before torch loads
(`finetune.sampling.adapter_records`), the last two from the header alone, so all name a LyCORIS or SDXL
file the same way instead of failing on its first unknown key (a DoRA loads: `finetune.formats.dora`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError
from finetune.formats.original_layout import names_sdxl_blocks

if TYPE_CHECKING:  # annotations only: a file's names are checked from its header, before torch loads (finetune.sampling.adapter_records)
    import torch

# The prefixes of kohya's names, by the part they adapt.
KOHYA_PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}

# Key endings of adapters the loader refuses.
LYCORIS_ENDINGS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".lora_mid.weight")  # LoHa, LoKr, Tucker-decomposed LoCon
# SDXL's two text encoders, in kohya's names and diffusers'.
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")


def unsupported_kind(keys: list[str]) -> str | None:
    """What the file is and that it does not load here (`an SDXL LoRA ...`), or None for a LoRA (or a DoRA)."""
    if any(key.endswith(LYCORIS_ENDINGS) for key in keys):
        return "a LyCORIS LoHa, LoKr or Tucker LoCon file: only LoRA (down/up weights) and DoRA (with magnitudes) load"
    if any(key.startswith(SDXL_PREFIXES) for key in keys):
        return "an SDXL LoRA (lora_te1_/lora_te2_ or text_encoder_2 names): only SD1.x LoRAs are loaded"
    if names_sdxl_blocks(keys):  # SD1.x's original-layout names load (finetune.formats.original_layout)
        return "an SDXL LoRA (its UNet's transformers are deeper than SD1.x's: input_blocks_N_1_transformer_blocks_1 and on): only SD1.x LoRAs are loaded"
    return None


def lora_layout(path, keys: list[str]) -> str:
    """"kohya" or "diffusers" (ours): the layout LoRA file `path`'s tensor names are in; one line for a file of a kind
    not loaded here (`unsupported_kind`), or one holding no SD1.x LoRA names at all."""
    if unsupported := unsupported_kind(keys):  # said of the file, before its first unknown key would be
        raise FinetuneError(f"LoRA {path} is {unsupported}")
    if any(key.startswith(tuple(KOHYA_PARTS.values())) for key in keys):
        return "kohya"
    if any(key.startswith(("unet.", "text_encoder.")) for key in keys):
        return "diffusers"
    raise FinetuneError(f"{path} holds no SD1.x LoRA weights (expected unet./text_encoder. or lora_unet_/lora_te_ keys)")


# diffusers' attention-processor LoRAs, as its train_dreambooth_lora.py and train_text_to_image_lora.py saved them
# in 2023 (and `load_lora_weights` still loads): `unet.<attention>.processor.to_q_lora.down.weight`, and for CLIP
# `text_encoder.<layer>.self_attn.to_q_lora.down.weight` (its q_proj).
OLD_PROCESSOR_NAME = re.compile(r"(\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
UNET_PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


def with_current_diffusers_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, attention-processor names renamed to the modules they adapt (`...attn1.to_q.lora.down.weight`,
    `...self_attn.q_proj.lora_linear_layer.down.weight`); other names as they are."""
    renamed = {}
    for key, tensor in tensors.items():
        match = OLD_PROCESSOR_NAME.search(key)
        if match and key.startswith("unet."):
            key = f"{key[:match.start()]}.{UNET_PROJECTIONS[match[2]]}.lora.{match[3]}.weight"
        elif match and key.startswith("text_encoder."):
            key = f"{key[:match.start()]}.{match[2]}_proj.lora_linear_layer.{match[3]}.weight"
        renamed[key] = tensor
    return renamed


# The text encoder's module paths are held relative to CLIPTextModel as transformers 5 builds it (no `text_model`
# level); the files we write include it, as transformers 4 (so diffusers with either) and ComfyUI name it.
CLIP_ROOT = "text_model."


def written_path(part: str, module: str) -> str:
    """A module's path as LoRA files name it: CLIP's under `text_model.`, the UNet's as it is."""
    return CLIP_ROOT + module.removeprefix(CLIP_ROOT) if part == "text_encoder" else module


def held_path(part: str, module: str) -> str:
    """A module's path as a `LoRA` holds it (the inverse of `written_path`): CLIP's without `text_model.`."""
    return module.removeprefix(CLIP_ROOT) if part == "text_encoder" else module


# Layers whose input width is the text encoder's: the UNet's cross-attention keys and values, the text encoder's own.
CONTEXT_INPUTS = ("attn2.to_k", "attn2.to_v", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
SD2_CONTEXT_WIDTH = 1024  # OpenCLIP-H's; SD1.x's CLIP-L is 768 wide


def sd_version_metadata(context_widths) -> dict[str, str]:
    """sd-scripts' record of the base's version, from the widths of the layers that read the prompt: the webui
    tells an SD2 LoRA by `ss_v2` (and shows each LoRA with the models of its version), Forge and SD.Next
    also by `ss_base_model_version`."""
    v2 = SD2_CONTEXT_WIDTH in set(context_widths)
    return {"ss_v2": str(v2), "ss_base_model_version": "sd_v2" if v2 else "sd_v1"}
