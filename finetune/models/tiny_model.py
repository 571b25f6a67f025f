"""Build small Stable Diffusion pipelines from scratch: same classes as SD1.5, tiny configs.

`tiny` is for tests and the quickstart (seconds on a CPU); `world` is the toy-world base model's architecture
(pretrained by recipes/pretrain_*.yaml); `medium` keeps SD1.5's block pattern (three cross-attention down blocks,
a plain one, and the mirror on the way up) at about 1/7 of the width (48-192 channels for 320-1280; a UNet of 19 M
parameters, about 1/44 of SD1.5's 860 M), for the benchmark. Each writes a normal diffusers folder that every loader
in the project accepts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from finetune.models.tokenizer import COMMON_WORDS, make_clip_tokenizer
from finetune.toyworld.world import WORLD_WORDS

# Captions of the sample data and the toy world encode as whole-word tokens, but for "striped" and "diamond"
# (finetune/models/tokenizer.py says why they split and why that stays).
DEFAULT_WORDS = tuple(sorted(set(COMMON_WORDS) | set(WORLD_WORDS)))


@dataclass(frozen=True)
class Preset:
    resolution: int
    unet_channels: tuple[int, ...]
    unet_down_blocks: tuple[str, ...]
    unet_up_blocks: tuple[str, ...]
    layers_per_block: int
    attention_head_dim: int
    text_hidden: int
    text_layers: int
    vae_channels: tuple[int, ...]
    vae_norm_groups: int | None = None  # None: `norm_groups(vae_channels)`, as the UNet's


PRESETS = {
    "tiny": Preset(
        resolution=64,
        unet_channels=(32, 64),
        unet_down_blocks=("CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        text_hidden=32,
        text_layers=2,
        vae_channels=(16, 32, 32, 32),
    ),
    # The toy-world base model's architecture (pretrained by recipes/pretrain_*.yaml).
    "world": Preset(
        resolution=64,
        unet_channels=(32, 64, 64),
        unet_down_blocks=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        text_hidden=64,
        text_layers=2,
        # Chosen by short probes (400 steps, test L1): 32/64 channels at the two full-resolution
        # levels reconstructed shapes and colours far better than 16/32 or a wider bottleneck.
        vae_channels=(32, 64, 64, 64),
        vae_norm_groups=8,
    ),
    "medium": Preset(
        resolution=64,
        unet_channels=(48, 96, 192, 192),
        unet_down_blocks=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        unet_up_blocks=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        attention_head_dim=8,
        text_hidden=128,
        text_layers=4,
        vae_channels=(32, 64, 64, 64),
    ),
}


def norm_groups(channels: tuple[int, ...]) -> int:
    """GroupNorm's group count for blocks of these widths: SD's 32, or half the first block's channels where that is
    fewer (the narrow presets: 32 groups cannot split the tiny VAE's 16 channels)."""
    return min(32, channels[0] // 2)


def sd15_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """SD1.5's noise schedule (scaled-linear betas, 1000 steps)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_pipeline(
    preset: str = "tiny",
    seed: int = 0,
    prediction_type: str = "epsilon",
) -> StableDiffusionPipeline:
    """A randomly initialised pipeline of the given preset; the seed fixes every weight."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_clip_tokenizer(DEFAULT_WORDS, Path(scratch))

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=spec.resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        down_block_types=spec.unet_down_blocks,
        up_block_types=spec.unet_up_blocks,
        layers_per_block=spec.layers_per_block,
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=norm_groups(spec.unet_channels),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=spec.vae_norm_groups or norm_groups(spec.vae_channels),
        sample_size=spec.resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_hidden * 4,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=spec.text_hidden,
        )
    )
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, prediction_type)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """An SD pipeline from its parts, with SD1.5's noise schedule and DDIM sampling, no safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**sd15_scheduler_config(prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_model(output_dir: str | Path, preset: str = "tiny", seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a complete diffusers pipeline folder and return its path."""
    output_dir = Path(output_dir)
    pipeline = build_tiny_pipeline(preset=preset, seed=seed, prediction_type=prediction_type)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return output_dir

