"""`finetune sample`: a base model plus an optional LoRA, fixed seeds, images and a grid on disk."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from finetune.checkpoint import atomic_save_safetensors
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.kohya import load_lora, to_diffusers
from finetune.methods.lora import LORA_WEIGHTS_NAME
from finetune.models import load_base_model
from finetune.sampling import build_pipeline, generate, make_grid, save_image_atomic


def resolve_lora_file(lora: str) -> Path:
    path = Path(lora)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise FinetuneError(f"LoRA {lora} not found: pass a .safetensors file or a training output folder containing {LORA_WEIGHTS_NAME}")
    if path.suffix != ".safetensors":
        raise FinetuneError(f"LoRA {path} is not a .safetensors file: pickle checkpoints are not loaded (they can run code)")
    return path


def load_lora_into(pipeline, lora_file: Path, adapter_name: str) -> None:
    """Load a LoRA file of either layout (ours/diffusers or kohya) as a named adapter.

    The file is first read into our neutral form and rewritten in our layout, with per-module alphas in
    its metadata: diffusers reads a kohya file's alphas only when they are all equal.
    """
    tensors, metadata = to_diffusers(load_lora(lora_file))
    with tempfile.TemporaryDirectory() as folder:
        atomic_save_safetensors(tensors, Path(folder) / LORA_WEIGHTS_NAME, metadata)
        try:
            pipeline.load_lora_weights(folder, weight_name=LORA_WEIGHTS_NAME, adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError) as err:
            raise FinetuneError(f"LoRA {lora_file} does not fit this base model: {str(err).splitlines()[0][:200]}") from None


def load_sampling_pipeline(base: str, lora: str | None = None, lora_scale: float = 1.0):
    pipeline = build_pipeline(load_base_model(ModelConfig(pretrained=base)))
    if lora:
        load_lora_into(pipeline, resolve_lora_file(lora), adapter_name="lora")
        pipeline.set_adapters(["lora"], adapter_weights=[lora_scale])
    return pipeline


def sample_to_folder(
    base: str,
    lora: str | None,
    lora_scale: float,
    prompts: list[str],
    negative_prompt: str | None,
    num_images: int,
    seed: int,
    steps: int,
    guidance: float,
    resolution: int | None,
    output_dir: Path,
) -> list[Path]:
    """Write prompt-P_seed-S.png for each image, then grid.png (rows = prompts); return all paths, grid last."""
    pipeline = load_sampling_pipeline(base, lora, lora_scale)
    resolution = resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    if resolution % 8:
        raise FinetuneError(f"--resolution {resolution} must be a multiple of 8")
    with torch.no_grad():
        rows = generate(pipeline, prompts, num_images, seed, steps, guidance, resolution, negative_prompt=negative_prompt)
    written = []
    for p, row in enumerate(rows):
        for k, image in enumerate(row):
            written.append(save_image_atomic(image, output_dir / f"prompt{p}_seed{seed + k}.png"))
    written.append(save_image_atomic(make_grid(rows, row_labels=prompts, label_width=160), output_dir / "grid.png"))
    return written
