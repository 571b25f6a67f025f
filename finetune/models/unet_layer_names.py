"""lora.target_modules against the base's UNet, before anything loads.

A target names the layers whose full name is it or ends in `.<it>` (peft's matching: `to_q`, `attn1.to_q`,
`down_blocks.0.attentions.0.proj_in`). One naming no layer was said when the LoRA was made, after the model had
loaded and, under `finetune train`, after the data check had decoded every image. The UNet's module names are in its
weights' safetensors header, each weight's name less `.weight` (and every module above it, by its prefix): read
without torch or the weights, as `finetune train` does before its data check (finetune/cli/run_refusals.py). A single
.safetensors file names its UNet's weights by the original layout's blocks, renamed to diffusers' as
`finetune.formats.original_layout` maps them (SD1.x's and SD2.x's UNet, the only ones a single file trains).
A base without such a header (a .ckpt, `.bin` weights, a hub base whose weights are not fetched yet) is checked
as the LoRA is made (`finetune.methods.lora.check_targets`), in the same words.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError
from finetune.formats.original_layout import UNET_RESNET_NAMES, unet_prefixes
from finetune.models.model_source import BaseLocation

# The layers a LoRA most often adapts, in the order examples are named: those of them the UNet has.
EXAMPLE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


def matches(name: str, target: str) -> bool:
    """Whether a module's full name is what `target` names (peft's matching of a target_modules entry)."""
    return name == target or name.endswith("." + target)


def unmatched_targets_line(unmatched: list[str], adaptable: list[str], model: str) -> str:
    """The one line for the targets naming no layer of `model`, with a few that name some (`adaptable`: the full names
    of its Linear and Conv2d layers)."""
    examples = [target for target in EXAMPLE_TARGETS if any(matches(name, target) for name in adaptable)]
    examples = examples or list(dict.fromkeys(name.rpartition(".")[2] for name in adaptable))
    names = ", ".join(f"'{target}'" for target in unmatched)
    return (f"lora.target_modules: {names} {'names' if len(unmatched) == 1 else 'name'} no layer of the {model} "
            f"(it has e.g. {', '.join(examples[:6])}): fix or remove {'it' if len(unmatched) == 1 else 'them'}")


ORIGINAL_UNET = "model.diffusion_model."  # where a single file keeps its UNet's weights


def weight_dims(file: Path, prefix: str = "") -> dict[str, int]:
    """Each module of safetensors file `file` holding a weight (its name after `prefix`) -> that weight's number of
    dimensions (2: Linear, 4: Conv2d, 1: a norm), from the header alone."""
    from safetensors import safe_open

    with safe_open(str(file), "np") as weights:  # "pt" would import torch
        return {key[len(prefix):].removesuffix(".weight"): len(weights.get_slice(key).get_shape())
                for key in weights.keys() if key.startswith(prefix) and key.endswith(".weight")}  # fmt: skip


def unet_weight_dims(base: BaseLocation) -> dict[str, int] | None:
    """`weight_dims` of the base's UNet under diffusers' module names; None where no safetensors header has them (the
    weights are read otherwise), or a single file's names are not all SD1.x's layout."""
    from finetune.models.base_folder import part_weights

    if base.folder is None:
        path = Path(base.config.pretrained).expanduser()
        return diffusers_names(weight_dims(path, ORIGINAL_UNET)) if path.suffix == ".safetensors" else None
    files = [file for file in part_weights(base.folder, "unet", base.config.variant) if file.suffix == ".safetensors"]
    return {name: dims for file in files for name, dims in weight_dims(file).items()} or None


def diffusers_names(original: dict[str, int]) -> dict[str, int] | None:
    """The same weights under diffusers' UNet module names (`input_blocks.1.0.in_layers.2` -> `down_blocks.0.resnets.0.conv1`);
    None if one is not SD1.x's layout (4 blocks of 2 layers, as SD2.x's too)."""
    prefixes = sorted(((old, new) for new, old in unet_prefixes().items()), key=lambda pair: -len(pair[0]))  # input_blocks.1. before .10.
    resnet_layers = {old: new for new, old in UNET_RESNET_NAMES.items()}
    renamed = {}
    for name, dims in original.items():
        found = next(((old, new) for old, new in prefixes if f"{name}.".startswith(old)), None)
        if found is None:
            return None
        rest = f"{name}."[len(found[0]):].removesuffix(".")
        if ".resnets." in found[1]:  # inside a resnet the original names its layers apart too
            if rest not in resnet_layers:
                return None
            rest = resnet_layers[rest]
        renamed[(found[1] + rest).removesuffix(".")] = dims
    return renamed or None


def check_unet_targets_first(target_modules: list[str], base: BaseLocation) -> None:
    """Refuse the targets that name no module of the base's UNet, from its weights' header; nothing is said where no
    header is at hand (the LoRA's check says it once the model has loaded)."""
    dims = unet_weight_dims(base)
    if not dims:
        return
    modules = {prefix for name in dims for prefix in _prefixes(name)}  # a block, an attention, a ModuleList: modules too
    unmatched = [target for target in target_modules if not any(matches(name, target) for name in modules)]
    if unmatched:
        adaptable = [name for name, ndim in dims.items() if ndim in (2, 4)]  # Linear and Conv2d weights
        raise FinetuneError(unmatched_targets_line(unmatched, adaptable, "UNet2DConditionModel"))


def _prefixes(name: str) -> list[str]:
    """`a.b.c` and the modules above it: `a.b`, `a`."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
