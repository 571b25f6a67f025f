"""ControlNet test helpers: recipes and methods on the tiny model, a fixed batch of its examples, a --condition
as `finetune sample` reads it, a spy on the method the trainer builds, the zero convolutions, and ControlNet
run folders written without a training run.

In `write_controlnet_run`, `fresh` is what a controlnet run starts from (`ControlNetModel.from_unet`: zero convs, so the UNet's
output is exactly unchanged); `trained` has random zero convs, so it really steers the UNet. Both are
written the way the controlnet method saves them: `<run>/controlnet` with finetune metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image

from finetune.checkpoints.run_files import CONTROLNET_DIR
from finetune.controlnet.data import ControlNetDataset, controlnet_collate
from finetune.methods.controlnet import ControlNetMethod
from finetune.models.loading import load_base_model
from finetune.outputs.pipeline_io import save_model_folder
from finetune.sampling.inference import fit_condition, read_condition

METADATA = {"finetune.method": "controlnet", "finetune.steps": "0"}


def zero_convs(controlnet: ControlNetModel) -> dict[str, torch.Tensor]:
    """The zero-initialised convolutions by name (with the conditioning embedding's last conv: without
    it the conditioning image is not read)."""
    convs = {f"down.{i}": block.weight for i, block in enumerate(controlnet.controlnet_down_blocks)}
    convs["mid"] = controlnet.controlnet_mid_block.weight
    convs["embedding_out"] = controlnet.controlnet_cond_embedding.conv_out.weight
    return convs


def controlnet_recipe(make_recipe, folder, **overrides):
    return make_recipe(method="controlnet", data__image_dir=str(folder), **overrides)


def set_up(recipe) -> ControlNetMethod:
    """The method with its ControlNet attached to the recipe's base model, as the trainer sets it up."""
    method = ControlNetMethod(recipe)
    method.check_data()
    torch.manual_seed(recipe.seed)
    method.setup(load_base_model(recipe.model))
    return method


def fixed_batch(method: ControlNetMethod, indices: list[int], empty_prompts: bool = False) -> dict:
    """The method's examples `indices` as a batch, center-cropped and unflipped, with their captions (or "")."""
    config = method.recipe.data.model_copy(update={"crop": "center", "random_flip": False})
    dataset = ControlNetDataset(method.pairs, config, method.recipe.seed, empty_prompt_share=0.0)
    batch = controlnet_collate([dataset[(i, 0)] for i in indices])
    if empty_prompts:
        batch["captions"] = [""] * len(indices)
    return batch


def load_condition(path: Path, resolution: int) -> Image.Image:
    """--condition as `finetune sample` reads it (checked before the model loads) and then fits it to the sampled size."""
    return fit_condition(read_condition(path), path, resolution)


class Capture:
    """Keep the method object the trainer builds, to inspect what it trained."""

    def __init__(self, monkeypatch):
        self.method = None
        original = ControlNetMethod.configure_model

        def spy(method):
            original(method)
            self.method = method

        monkeypatch.setattr(ControlNetMethod, "configure_model", spy)


def write_controlnet_run(tiny_model: Path, run: Path, trained: bool) -> Path:
    """A controlnet run's output folder holding `controlnet/`; returns the run folder."""
    torch.manual_seed(0)  # the conditioning embedding's random init
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"))
    if trained:
        with torch.no_grad():
            for conv in zero_convs(controlnet).values():
                conv.normal_(0, 0.5)
    save_model_folder(controlnet, run / CONTROLNET_DIR, METADATA)
    return run


def layoutless_refusal(checkpoint, began, mismatch: str) -> str:
    """The layout check's line for a checkpoint that kept no layout, of a ControlNet `from_unet` does not make."""
    return (f"checkpoint {checkpoint} was written before checkpoints kept the layout of the ControlNet they started from (controlnet.pretrained "
            f"{began}), with checkpoint.save_outputs: false, so nothing in it says that layout, which is not one ControlNetModel.from_unet "
            f"makes ({mismatch}): resume from a checkpoint of this run that holds a controlnet/ folder, or start a new run from {began}")
