"""Full fine-tuning: every UNet weight trains; optionally the text encoder too, at its own rate.

Used to pretrain the toy-world base model from random weights (with the text encoder), and as the
base of full-UNet DreamBooth. The output is a complete diffusers pipeline folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.checkpoints.run_files import PIPELINE_DIR
from finetune.formats.model_card import write_pipeline_card
from finetune.methods.base import UNetMethod
from finetune.outputs.pipeline_io import save_pipeline


class FullMethod(UNetMethod):
    name = "full"

    def configure_model(self) -> None:
        unet = self.base.unet
        unet.to(torch.float32).requires_grad_(True).train()
        if self.train_text_encoder:
            self.base.text_encoder.to(torch.float32).requires_grad_(True).train()

    def save(self, output_dir: Path, modules, metadata: dict[str, str]) -> list[Path]:
        folder = save_pipeline(self.base, output_dir / PIPELINE_DIR, metadata=metadata, **modules)
        write_pipeline_card(folder, metadata)  # as diffusers' DreamBooth script writes one: the prompts it learned
        return [folder]
