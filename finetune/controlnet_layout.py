"""The layout (config.json) of a ControlNet a run started from (controlnet.pretrained), across a resume: the resume
reads no starting weights (finetune.start_weights), and `ControlNetModel.from_unet` would not make that layout (another
conditioning embedding, say). A checkpoint keeps it in its state; one from before that has it in its controlnet/
output (checkpoint.save_outputs); one with neither, of a layout from_unet does not make, is said to be so in one line
before its weights load (it was 'another lora.rank?', the checkpoint's shape error)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

RESUMED_LAYOUT = "controlnet_config"  # in a checkpoint's method state


def kept_layout(checkpoint: Path, method_state: dict) -> dict | None:
    """The layout of the ControlNet `checkpoint` trained from controlnet.pretrained (its `method_state`, else its
    controlnet/ output's config), or None where it has neither (or a damaged one)."""
    if method_state.get(RESUMED_LAYOUT):
        return method_state[RESUMED_LAYOUT]
    with contextlib.suppress(OSError, ValueError):
        return json.loads((checkpoint / "controlnet" / "config.json").read_text())
    return None


def unknown_layout_problem(made: torch.nn.Module, checkpoint: Path, began: str) -> str | None:
    """Why the ControlNet `made` from the UNet cannot take `checkpoint`'s weights (one started from `began`, whose
    layout the checkpoint does not keep), from the shapes its trainable_<i> files hold; None where they fit."""
    shapes = {name: tuple(parameter.shape) for name, parameter in made.named_parameters()}
    for saved in sorted(checkpoint.glob("trainable_*.safetensors")):
        with contextlib.suppress(SafetensorError, OSError), safe_open(str(saved), "pt") as opened:
            for name in opened.keys():
                shape = tuple(opened.get_slice(name).get_shape())
                if name in shapes and shapes[name] != shape:
                    return (f"checkpoint {checkpoint} was written before checkpoints kept the layout of the ControlNet they started from "
                            f"(controlnet.pretrained {began}), with checkpoint.save_outputs: false, so nothing in it says that layout, which is "
                            f"not one ControlNetModel.from_unet makes ({name}: shape {shape}, not {shapes[name]}): resume from a checkpoint of "
                            f"this run that holds a controlnet/ folder, or start a new run from {began}")  # fmt: skip
    return None
