"""What kind of adapter a LoRA file's names say it is, when it is one this project does not load.

One check for the loader (`finetune.kohya.load_lora`: sample, merge, eval, export, lora.init_from) and the
demo's adapter list (`finetune.adapter_scan`, from the header alone), so both name a LyCORIS, DoRA or SDXL
file the same way instead of failing on its first unknown key.
"""

from __future__ import annotations

import contextlib
import json

# Key endings of adapters the loader refuses.
LYCORIS_ENDINGS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".lora_mid.weight")  # LoHa, LoKr, Tucker-decomposed LoCon
DORA_ENDINGS = (".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")
# SDXL's names: kohya's two text encoders and its UNet by the original layout's blocks; diffusers' second text encoder.
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "text_encoder_2.")


def unsupported_kind(keys: list[str], metadata: dict[str, str]) -> str | None:
    """What the file is and that it does not load here (`a DoRA file: ...`), or None for a plain LoRA."""
    if any(key.endswith(LYCORIS_ENDINGS) for key in keys):
        return "a LyCORIS LoHa, LoKr or Tucker LoCon file: only plain LoRA (down/up weights) is loaded"
    if any(key.endswith(DORA_ENDINGS) for key in keys) or _peft_dora(metadata):
        return "a DoRA file: only plain LoRA is loaded"
    if any(key.startswith(SDXL_PREFIXES) for key in keys):
        return "an SDXL LoRA (lora_te1_/lora_te2_, input_blocks or text_encoder_2 names): only SD1.x LoRAs are loaded"
    return None


def _peft_dora(metadata: dict[str, str]) -> bool:
    """Whether diffusers' saved peft config (`unet.use_dora`, ...) says DoRA."""
    with contextlib.suppress(ValueError, AttributeError):
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        return any(key.endswith("use_dora") and value for key, value in config.items())
    return False

