"""What a folder or file given as a ControlNet (controlnet.pretrained in training, --controlnet in sample and eval, the
demo's list) holds, checked before any weight loads: one that is no ControlNet folder (a file, the original layout,
another model, not there), one of other than RGB conditioning images, and which weights variant a folder has. Each is
said in one line, in place of "not found", "has no config.json" or a shape error mid-run. diffusers'
`ControlNetModel.from_pretrained` reads a folder whose config.json is a ControlNetModel's, beside its weights."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import yaml

from finetune.checkpoints.run_files import CONTROLNET_DIR, METADATA_FILE, STATE_FILE, UNET_DIR, list_checkpoints, record_text
from finetune.config.run_recipe import run_recipe_file
from finetune.errors import FinetuneError, looked_for_here
from finetune.models.base_folder import files_ending, misnamed_weights_in, pickle_refusal
from finetune.models.model_source import hub_files, where_looked

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
    if not path.exists():  # controlnet.pretrained takes hub ids too: a path spelled as one is said to be read as a path
        return f"ControlNet {given} not found{where_looked(given) if named == 'controlnet.pretrained' else looked_for_here(given)}: {expected}"
    what, hint = folder_kind(path, from_a_pipeline)
    return f"{named} {given} is {what}, not a ControlNet: {expected}{hint}"


def folder_kind(path: Path, from_a_pipeline: str = FROM_A_UNET) -> tuple[str, str]:
    """(what the folder is, what to do with it instead: '' or a clause starting '; '); `from_a_pipeline`: that for a pipeline."""
    from finetune.data.sources import folder_images

    if (path / "model_index.json").is_file():  # a pipeline saved with a ControlNet holds controlnet/, taken before this
        return "a Stable Diffusion pipeline folder (model_index.json) with no controlnet/ folder", f"; {from_a_pipeline}"
    if (path / STATE_FILE).is_file():
        return "a training checkpoint with no controlnet/ folder (its run trained none, or had checkpoint.save_outputs: false)", ""
    if (method := _run_method(path)) is not None:
        checkpoints = [found for found in list_checkpoints(path / "checkpoints") if (found / "controlnet" / "config.json").is_file()]
        if method == "controlnet" and checkpoints:  # stopped before its end: its checkpoints hold the ControlNet as of their step
            return "a controlnet run's output folder with no controlnet/ folder yet", f"; its checkpoints hold one, e.g. {checkpoints[-1]} (the latest)"
        return f"a {method} run's output folder (its {run_recipe_file(path).name}) with no controlnet/ folder", ""
    if checkpoints := list_checkpoints(path):
        return "a run's checkpoints folder", f"; pick a checkpoint (checkpoint-N, of step N), e.g. {checkpoints[-1]}, the latest"
    if images := folder_images(path):
        return f"a folder of images ({images[0].name}, ...)", ""
    return "a folder with no config.json", ""


def _run_method(path: Path) -> str | None:
    """The method of the training run whose output folder `path` is (its recorded recipe), or None."""
    try:
        recipe = yaml.safe_load(run_recipe_file(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return str(recipe["method"]) if isinstance(recipe, dict) and recipe.get("method") else None


# The names of a ControlNet in the original (lllyasviel's) layout, as model sites share it in one file.
ORIGINAL_CONTROLNET_PREFIXES = ("control_model.", "input_hint_block.")
CONVERT_ORIGINAL_CONTROLNET = "convert it to a diffusers folder (diffusers' ControlNetModel.from_single_file, then save_pretrained)"


def weights_variant(folder: Path | str) -> dict[str, str]:
    """`from_pretrained`'s variant for a ControlNet folder holding only one variant's weights (hub ControlNets ship
    diffusion_pytorch_model.fp16.safetensors beside the full file, and a copy may keep only that): {"variant": "fp16"},
    else {} (diffusers looks for the plain file, then a .bin, and names only the .bin when both are missing). A variant's
    suffix in any letter case (.fp16.SafeTensors, which a disk ignoring case serves by its lowercase name)."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "diffusion_pytorch_model.safetensors").is_file():
        return {}
    variants = [file for file in files_ending(folder, ".safetensors") if file.name.startswith("diffusion_pytorch_model.") and file.name.count(".") > 1]
    return {"variant": variants[0].name.split(".")[1]} if len(variants) == 1 else {}


def refuse_a_controlnet_file(path: Path, named: str) -> None:
    """A ControlNet is loaded from a diffusers folder (config.json beside its weights): one given as a single file
    is said to be one, and which, not 'not found'."""
    if not path.is_file():
        return
    if (path.parent / "config.json").is_file():
        raise FinetuneError(f"{named} is a file of the model folder {path.parent}: pass that folder")
    if path.suffix.lower() != ".safetensors":
        raise FinetuneError(f"{named} is not a .safetensors file: pickle checkpoints are not loaded (they can run code)")
    from safetensors import SafetensorError, safe_open

    with contextlib.suppress(SafetensorError, OSError), safe_open(str(path), "pt") as opened:
        if any(key.startswith(ORIGINAL_CONTROLNET_PREFIXES) for key in opened.keys()):
            raise FinetuneError(f"{named} is a single-file ControlNet in the original layout (control_model. keys, as model sites share it): "
                                f"{CONVERT_ORIGINAL_CONTROLNET} and pass that folder")  # fmt: skip
    raise FinetuneError(f"{named} is a file, not a ControlNet folder: pass a diffusers ControlNet folder (config.json and diffusion_pytorch_model.safetensors)")


def require_controlnet_config(folder: Path, named: str, other_model_hint: str = "") -> None:
    """Stop before any model loads if `folder` holds another diffusers model (a UNet or VAE folder given
    by mistake): diffusers would build a ControlNet from its config and fail on the meta tensors it left unset;
    or a ControlNet that takes other than RGB conditioning images (`conditioning_channels_problem`). `other_model_hint`
    ends the line for another model."""
    try:
        config = json.loads((folder / "config.json").read_text())
        class_name = config.get("_class_name", "ControlNetModel")
    except (OSError, ValueError, AttributeError):
        raise FinetuneError(f"{named}: {folder / 'config.json'} is not a JSON model config") from None
    if class_name != "ControlNetModel":
        raise FinetuneError(f"{named} holds a {class_name}, not a ControlNet: pass a ControlNetModel folder (its config.json says _class_name ControlNetModel)"
                            + other_model_hint)  # fmt: skip
    if (problem := conditioning_channels_problem(config)) is not None:
        raise FinetuneError(f"{named} {problem}")
    if misnamed := misnamed_weights_in(folder):  # found in any case, and opened by diffusers in lowercase alone
        raise FinetuneError(f"{named}: {misnamed}")
    if not files_ending(folder, ".safetensors"):  # its pickle weights load (with torch.load(weights_only=True)), or none
        for weights in files_ending(folder, ".bin"):
            if refusal := pickle_refusal(weights, f"{named}: {weights.name}", "weights"):  # was diffusers' traceback as it loaded
                raise FinetuneError(refusal)


def conditioning_channels_problem(config) -> str | None:
    """Why a ControlNet (its config) cannot take the conditioning images training, sample and the demo give it, or
    None: they are read as RGB (`finetune.data.images.open_rgb`), and a ControlNet of another conditioning_channels (a
    1-channel depth ControlNet) failed on its first convolution, mid-run, with torch's shape error."""
    channels = config.get("conditioning_channels", 3)
    if channels == 3:
        return None
    return (f"takes {channels}-channel conditioning images (its config.json's conditioning_channels), but conditioning images "
            "are read as RGB (3 channels): use a ControlNet made for RGB conditioning images (conditioning_channels 3)")


# Config keys that must agree for a ControlNet's residuals to fit the UNet's skip connections.
CONTROLNET_FIT_KEYS = ("block_out_channels", "cross_attention_dim", "in_channels", "down_block_types", "layers_per_block")


def check_controlnet_fits(controlnet_config, unet_config, named: str, base: str) -> None:
    """Refuse a ControlNet (its config) whose residuals would not fit this UNet's (its config) in one line, rather
    than torch's shape error mid-sampling; `named`: the ControlNet as the command or page names it. A key either
    config lacks is not compared; a number and a list of that one number agree."""
    for key in CONTROLNET_FIT_KEYS:
        ours, theirs = controlnet_config.get(key), unet_config.get(key)
        if ours is not None and theirs is not None and _as_list(ours) != _as_list(theirs):
            raise FinetuneError(f"{named} does not fit base model {base}: its {key} is {ours}, the UNet's is {theirs}")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_hub_controlnet(repo_id: str) -> None:
    """controlnet.pretrained as a hub id: its config.json (kilobytes) fetched, or found in the cache, and checked before
    any model loads; its weights download as it loads. Not in the cache offline, or not on the hub, was the hub's error
    as it loaded, after the base model (a moved runs/edges is looked up on the hub where no runs/ folder is here)."""
    folder = hub_files(repo_id, "controlnet.pretrained", what="ControlNet", local="a local ControlNet folder", allow_patterns=["config.json"])
    if not (folder / "config.json").is_file():  # offline, the cache's snapshot folder comes back with what it holds
        raise FinetuneError(f"ControlNet {repo_id} has no config.json in the local Hugging Face cache: download it once with network, "
                            "or set controlnet.pretrained to a local ControlNet folder")  # fmt: skip
    require_controlnet_config(folder, f"controlnet.pretrained {repo_id}", f"; {FROM_A_UNET}")


def resolve_controlnet_folder(controlnet: str) -> Path:
    """The ControlNet folder: the one given, or `<output>/controlnet` when given a controlnet run's output folder."""
    path = Path(controlnet).expanduser()
    if (path / CONTROLNET_DIR / "config.json").is_file():
        path = path / CONTROLNET_DIR
    refuse_a_controlnet_file(path, f"ControlNet {controlnet}")
    if not (path / "config.json").is_file():  # not there, or what the folder is (a pipeline, a LoRA run, ...), as training says it
        raise FinetuneError(not_a_controlnet_message(path, controlnet, "--controlnet"))
    in_a_pipeline = (path.parent / "model_index.json").is_file()  # a pipeline's unet/, say
    require_controlnet_config(path, f"--controlnet {controlnet}", f"; to sample with its pipeline, pass {path.parent} as --base" if in_a_pipeline else "")
    if (decoder := unlocked_decoder_folder(path)) and (misnamed := misnamed_weights_in(decoder)):  # sampled with it, said before torch
        raise FinetuneError(f"the UNet {decoder} its ControlNet was trained with: {misnamed}")
    return path


def check_control_options(controlnet: str | None, condition: str | None, conditioning_scale: float | None) -> None:
    """Refuse half-given ControlNet options before any model loads."""
    if controlnet is None:
        if condition is not None or conditioning_scale is not None:
            raise FinetuneError("--condition and --conditioning-scale steer a ControlNet: pass --controlnet PATH too, or leave them out")
        return
    resolve_controlnet_folder(controlnet)
    if condition is None:
        raise FinetuneError(f"--controlnet {controlnet} needs a conditioning image: pass --condition IMAGE (e.g. one written by finetune make-conditions)")
    if Path(condition).is_dir():  # a make-conditions folder's conditioning/, given whole: it is there, not "not found"
        from finetune.data.sources import IMAGE_SUFFIXES

        images = sorted(path for path in Path(condition).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
        example = f" (such as {images[0]})" if images else ""
        raise FinetuneError(f"--condition {condition} is a folder: give one conditioning image{example}; each --condition is one image")
    if not Path(condition).is_file():
        raise FinetuneError(f"conditioning image {condition} not found: check --condition")


def unlocked_decoder_folder(controlnet_folder: Path) -> Path | None:
    """The UNet that a run with controlnet.unlock_unet_decoder saved beside its ControlNet, else None.

    That ControlNet was trained against the changed decoder and only works with it. Both folders of one
    run carry the same metadata, so a unet/ left by another run is not picked up.
    """
    unet = controlnet_folder.parent / UNET_DIR
    ours, theirs = controlnet_folder / METADATA_FILE, unet / METADATA_FILE
    if not ((unet / "config.json").is_file() and ours.is_file() and theirs.is_file()):
        return None
    return unet if record_text(ours) == record_text(theirs) else None
