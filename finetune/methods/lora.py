"""LoRA on the UNet (Hu et al., 2021) through peft: low-rank updates to chosen layers, base frozen.

The saved file is diffusers' `pytorch_lora_weights.safetensors` layout, so
`StableDiffusionPipeline.load_lora_weights()` reads it with no missing or unexpected keys; the LoRA
config (rank, alpha, targets) travels in the file's metadata so the strength alpha/rank is preserved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from finetune.checkpoint import atomic_save_safetensors
from finetune.methods.base import DiffusionMethod
from finetune.models import freeze
from finetune.sampling import build_pipeline

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


class LoRAMethod(DiffusionMethod):
    name = "lora"

    def setup(self) -> None:
        unet = self.base.unet
        freeze(unet, self.weight_dtype)
        unet.train()  # LoRA dropout is active while training
        settings = self.recipe.lora
        unet.add_adapter(
            LoraConfig(
                r=settings.rank,
                lora_alpha=settings.alpha,
                lora_dropout=settings.dropout,
                target_modules=list(settings.target_modules),
                init_lora_weights="gaussian",  # A random, B zero: the adapter starts as a no-op
            )
        )
        # Adapter weights train in fp32 even when the frozen base runs in bf16/fp16.
        for parameter in unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.base.unet}

    def predict(self, modules, noisy_latents, timesteps, encoder_hidden_states, batch) -> torch.Tensor:
        return modules["unet"](noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

    def save(self, output_dir: Path, modules, metadata: dict[str, str]) -> list[Path]:
        return [save_unet_lora(modules["unet"], output_dir / LORA_WEIGHTS_NAME, metadata)]

    def pipeline(self, modules) -> DiffusionPipeline:
        return build_pipeline(self.base, unet=modules["unet"])


def save_unet_lora(unet: torch.nn.Module, path: Path, metadata: dict[str, str]) -> Path:
    """Write the UNet's LoRA weights in diffusers' layout, with the LoRA config in the metadata."""
    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tensors = {f"unet.{key}": value.detach().to("cpu", torch.float32).contiguous() for key, value in weights.items()}
    lora_config = unet.peft_config["default"].to_dict()
    lora_config = {f"unet.{key}": sorted(value) if isinstance(value, set) else value for key, value in lora_config.items()}
    full_metadata = {
        "format": "pt",
        # diffusers reads this key back in load_lora_weights to restore alpha (and so the strength).
        "lora_adapter_metadata": json.dumps(lora_config, sort_keys=True, default=str),
        **metadata,
    }
    atomic_save_safetensors(tensors, path, full_metadata)
    return path
