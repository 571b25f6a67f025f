"""Full fine-tuning: every UNet weight trains; optionally the text encoder too, at its own rate.

Used to pretrain the toy-world base model from random weights (with the text encoder), and as the
base of full-UNet DreamBooth. The output is a complete diffusers pipeline folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from finetune.methods.base import DiffusionMethod, text_encoder_groups
from finetune.pipeline_io import save_pipeline
from finetune.sampling import build_pipeline

PIPELINE_DIR = "pipeline"


class FullMethod(DiffusionMethod):
    name = "full"

    def __init__(self, recipe, train_text_encoder: bool | None = None, text_encoder_lr: float | None = None):
        super().__init__(recipe)
        self.train_text_encoder = recipe.full.train_text_encoder if train_text_encoder is None else train_text_encoder
        self.text_encoder_lr = text_encoder_lr if train_text_encoder is not None else recipe.full.text_encoder_lr

    def configure_model(self) -> None:
        unet = self.base.unet
        unet.to(torch.float32).requires_grad_(True).train()
        if self.train_text_encoder:
            self.base.text_encoder.to(torch.float32).requires_grad_(True).train()

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.base.unet}
        if self.train_text_encoder:
            modules["text_encoder"] = self.base.text_encoder
        return modules

    def parameter_groups(self) -> list[dict]:
        return text_encoder_groups(self.base, self.train_text_encoder, self.text_encoder_lr or self.recipe.optimizer.lr)

    def predict(self, modules, noisy_latents, timesteps, encoder_hidden_states, batch) -> torch.Tensor:
        return modules["unet"](noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

    def save(self, output_dir: Path, modules, metadata: dict[str, str]) -> list[Path]:
        return [save_pipeline(self.base, output_dir / PIPELINE_DIR, **modules)]

    def pipeline(self, modules) -> DiffusionPipeline:
        pipeline = build_pipeline(self.base, unet=modules["unet"])
        if "text_encoder" in modules:
            pipeline.text_encoder = modules["text_encoder"]
        return pipeline
