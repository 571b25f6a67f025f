"""The `sd15` preset: SD1.5's architecture with random weights, and the peak FLOP/s of the GPUs it is meant for."""

from __future__ import annotations

import tempfile
from pathlib import Path

# ---------------------------------------------------------------------------------------------------
# Peak FLOP/s of the GPUs we know (dense, no sparsity; NVIDIA data sheets), by precision


PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    # Matched in order against torch.cuda.get_device_name(); the first substring found wins.
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    # The NVL cards (PCIe, lower power) share the SXM parts' names but not their clocks: 1671 sparse, 835.5 dense.
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM, same tensor cores as H100 SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of `device_name` for `precision` (bf16, fp16, tf32, fp32), or None if unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(precision)
    return None


# ---------------------------------------------------------------------------------------------------
# SD1.5's architecture with random weights

SD15_UNET_CHANNELS = (320, 640, 1280, 1280)
SD15_VAE_CHANNELS = (128, 256, 512, 512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408)


def build_sd15_pipeline(width_divisor: int = 1, device: str | None = None):
    """A StableDiffusionPipeline with SD1.5's architecture and random weights (nothing is downloaded).

    UNet: diffusers' default UNet2DConditionModel (SD1.5's config) with cross_attention_dim 768; VAE:
    SD's KL-f8 autoencoder; text encoder: CLIP ViT-L/14's text tower (12 layers, 768 wide, 49408 tokens),
    read with the project's generated tokenizer. `width_divisor` divides every width (8 builds a
    ~1/64-size copy for tests); `device="meta"` builds it without allocating weights.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from finetune.models.tiny_model import DEFAULT_WORDS, assemble_pipeline
    from finetune.models.tokenizer import make_clip_tokenizer

    if 32 % width_divisor:
        raise ValueError(f"width_divisor must divide 32 (the norm groups), got {width_divisor}")
    scale = lambda channels: tuple(c // width_divisor for c in channels)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_clip_tokenizer(DEFAULT_WORDS, Path(scratch))
    torch.manual_seed(0)  # the same random weights for every bench
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=scale(SD15_UNET_CHANNELS),
            cross_attention_dim=768 // width_divisor,
            attention_head_dim=8,
            norm_num_groups=32 // width_divisor,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=scale(SD15_VAE_CHANNELS),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32 // width_divisor,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=SD15_TEXT["vocab_size"],
                hidden_size=SD15_TEXT["hidden_size"] // width_divisor,
                intermediate_size=SD15_TEXT["intermediate_size"] // width_divisor,
                num_hidden_layers=SD15_TEXT["num_hidden_layers"],
                num_attention_heads=SD15_TEXT["num_attention_heads"],
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=SD15_TEXT["hidden_size"] // width_divisor,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return assemble_pipeline(vae, text_encoder, tokenizer, unet)
