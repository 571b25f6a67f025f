"""What a folder given as controlnet.pretrained (training) or --controlnet (sample, eval) is when it holds no
ControlNet: said in one line before any weight loads, in place of "not found" or "has no config.json".
diffusers' `ControlNetModel.from_pretrained` reads a folder whose config.json is a ControlNetModel's, beside
its weights."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.checkpoint import STATE_FILE, list_checkpoints

# A UNet or a pipeline given where the user meant to make a ControlNet of it.
FROM_A_UNET = "to make a new ControlNet of a pipeline's UNet, set controlnet.pretrained: null (it copies model.pretrained's UNet)"
EXPECTED = ("controlnet.pretrained must be a diffusers ControlNet folder (a ControlNetModel's config.json beside its weights, as "
            "ControlNetModel.from_pretrained reads it), a controlnet run's output folder, a hub id, or null to start from the UNet")  # fmt: skip
# The commands that sample with a ControlNet (sample, eval) read local folders only, and take a pipeline as --base.
COMMAND_EXPECTED = ("--controlnet must be a diffusers ControlNet folder (a ControlNetModel's config.json beside its weights, as "
                    "ControlNetModel.from_pretrained reads it) or a controlnet run's output folder")  # fmt: skip
PIPELINE_AS_BASE = "to sample with the pipeline itself, pass it as --base"
# By who names the folder: (what it must be, what to do with a pipeline folder instead).
EXPECTED_OF = {"controlnet.pretrained": (EXPECTED, FROM_A_UNET), "--controlnet": (COMMAND_EXPECTED, PIPELINE_AS_BASE)}


def not_a_controlnet_message(path: Path, given: str, named: str = "controlnet.pretrained") -> str:
    """The line for `named` (controlnet.pretrained or --controlnet) `given` (at `path`), a folder without config.json
    or one that is not there."""
    expected, from_a_pipeline = EXPECTED_OF[named]
    if not path.exists():
        return f"ControlNet {given} not found: {expected}"
    what, hint = folder_kind(path, from_a_pipeline)
    return f"{named} {given} is {what}, not a ControlNet: {expected}{hint}"


def folder_kind(path: Path, from_a_pipeline: str = FROM_A_UNET) -> tuple[str, str]:
    """(what the folder is, what to do with it instead: '' or a clause starting '; '); `from_a_pipeline`: that for a pipeline."""
    from finetune.sources import folder_images

    if (path / "model_index.json").is_file():  # a pipeline saved with a ControlNet holds controlnet/, taken before this
        return "a Stable Diffusion pipeline folder (model_index.json) with no controlnet/ folder", f"; {from_a_pipeline}"
    if (path / STATE_FILE).is_file():
        return "a training checkpoint with no controlnet/ folder (its run trained none, or had checkpoint.save_outputs: false)", ""
    if (method := _run_method(path)) is not None:
        checkpoints = [found for found in list_checkpoints(path / "checkpoints") if (found / "controlnet" / "config.json").is_file()]
        if method == "controlnet" and checkpoints:  # stopped before its end: its checkpoints hold the ControlNet as of their step
            return "a controlnet run's output folder with no controlnet/ folder yet", f"; its checkpoints hold one, e.g. {checkpoints[-1]} (the latest)"
        return f"a {method} run's output folder (its recipe.yaml) with no controlnet/ folder", ""
    if checkpoints := list_checkpoints(path):
        return "a run's checkpoints folder", f"; pick a checkpoint (checkpoint-N, of step N), e.g. {checkpoints[-1]}, the latest"
    if images := folder_images(path):
        return f"a folder of images ({images[0].name}, ...)", ""
    return "a folder with no config.json", ""


def _run_method(path: Path) -> str | None:
    """The method of the training run whose output folder `path` is (its recipe.yaml), or None."""
    try:
        recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return str(recipe["method"]) if isinstance(recipe, dict) and recipe.get("method") else None
