"""ControlNet folders on the tiny model for the sample and eval tests, without a training run.

`fresh` is what a controlnet run starts from (`ControlNetModel.from_unet`: zero convs, so the UNet's
output is exactly unchanged); `trained` has random zero convs, so it really steers the UNet. Both are
written the way the controlnet method saves them: `<run>/controlnet` with finetune metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from finetune.methods.controlnet import CONTROLNET_DIR, save_model_folder

METADATA = {"finetune.method": "controlnet", "finetune.steps": "0"}


def zero_convs(controlnet: ControlNetModel) -> list[torch.Tensor]:
    convs = [*(block.weight for block in controlnet.controlnet_down_blocks), controlnet.controlnet_mid_block.weight]
    return convs + [controlnet.controlnet_cond_embedding.conv_out.weight]  # without it the image is not read


def write_controlnet_run(tiny_model: Path, run: Path, trained: bool) -> Path:
    """A controlnet run's output folder holding `controlnet/`; returns the run folder."""
    torch.manual_seed(0)  # the conditioning embedding's random init
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"))
    if trained:
        with torch.no_grad():
            for conv in zero_convs(controlnet):
                conv.normal_(0, 0.5)
    save_model_folder(controlnet, run / CONTROLNET_DIR, METADATA)
    return run
