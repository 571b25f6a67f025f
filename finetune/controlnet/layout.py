"""The layout (config.json) of a ControlNet a run started from (controlnet.pretrained), across a resume: the resume
reads no starting weights (finetune.models.start_weights), and `ControlNetModel.from_unet` would not make that layout (another
conditioning embedding, say). A checkpoint keeps it in its state; one from before that has it in its controlnet/
output (checkpoint.save_outputs); one with neither, of a layout from_unet does not make, is said to be so in one line
before its weights load (it was 'another lora.rank?', the checkpoint's shape error; under DeepSpeed, DeepSpeed's)."""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from finetune.checkpoints.resume_checks import DEEPSPEED_FOLDER

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
    layout the checkpoint does not keep), from the shapes it holds (`saved_shapes`); None where they fit."""
    shapes = {name: tuple(parameter.shape) for name, parameter in made.named_parameters()}
    for name, shape in saved_shapes(checkpoint):
        if name in shapes and shapes[name] != shape:
            return (f"checkpoint {checkpoint} was written before checkpoints kept the layout of the ControlNet they started from "
                    f"(controlnet.pretrained {began}), with checkpoint.save_outputs: false, so nothing in it says that layout, which is "
                    f"not one ControlNetModel.from_unet makes ({name}: shape {shape}, not {shapes[name]}): resume from a checkpoint of "
                    f"this run that holds a controlnet/ folder, or start a new run from {began}")  # fmt: skip
    return None


def saved_shapes(checkpoint: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each trained parameter `checkpoint` holds: from its trainable_<i> files' headers, or, written under
    DeepSpeed (which writes none of those: its old layout-less checkpoints ended in DeepSpeed's size mismatch as their
    weights loaded), from its engine's model states' param_shapes, as DeepSpeed's zero_to_fp32 reads them; the same for
    ZeRO-3's shards (full shapes). Those files are read without their weights (mmap), weights-only."""
    shapes = []
    for saved in sorted(checkpoint.glob("trainable_*.safetensors")):
        with contextlib.suppress(SafetensorError, OSError), safe_open(str(saved), "pt") as opened:
            shapes += [(name, tuple(opened.get_slice(name).get_shape())) for name in opened.keys()]
    for states in sorted((checkpoint / DEEPSPEED_FOLDER).glob("*model_states.pt"))[:1]:  # one process's: each holds every shape
        try:
            # Read before the resume's own check of DeepSpeed's files (finetune.checkpoints.pickles): weights-only, as the model
            # states DeepSpeed writes hold tensors, numbers, names and shapes alone (its config is a dict).
            state = torch.load(states, map_location="cpu", mmap=True, weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, AttributeError, ImportError, pickle.UnpicklingError):
            continue  # damaged, or holding other objects: the resume's check of its files says so
        groups = [*(state.get("param_shapes") or []), state.get("frozen_param_shapes") or {}] if isinstance(state, dict) else []
        shapes += [(name, tuple(shape)) for group in groups for name, shape in group.items()]
    return shapes
