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
The header has no module without weights (a Dropout, an activation): those are known by where diffusers puts them
(WEIGHTLESS), so a target naming one is said as that, not as naming no layer. A norm's weight is 1-D there (a Linear's
2-D, a Conv2d's 4-D), and a block (an attention, a transformer block, a ModuleList) holds none of its own but its
layers do: peft refuses a target naming either once the model has loaded, so they are said here too (NORM_KINDS).
"""

from __future__ import annotations

import re
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.formats.original_layout import UNET_RESNET_NAMES, unet_prefixes
from finetune.models.model_source import BaseLocation

# The layers a LoRA most often adapts, in the order examples are named: those of them the UNet has.
EXAMPLE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


def matches(name: str, target: str) -> bool:
    """Whether a module's full name is what `target` names (peft's matching of a target_modules entry)."""
    return name == target or name.endswith("." + target)


# The recipe key a target list is given by, which the lines below name: the UNet's, unless a caller checks the text encoder's
# (lora.text_encoder_target_modules, as methods.lora.check_targets does once the model has loaded).
UNET_TARGETS_KEY = "lora.target_modules"


def unmatched_targets_line(unmatched: list[str], adaptable: list[str], model: str, key: str = UNET_TARGETS_KEY) -> str:
    """The one line for the targets naming no layer of `model`, with a few that name some (`adaptable`: the full names
    of its Linear and Conv2d layers)."""
    names = ", ".join(f"'{target}'" for target in unmatched)
    return (f"{key}: {names} {'names' if len(unmatched) == 1 else 'name'} no layer of the {model} "
            f"(it has e.g. {_examples(adaptable)}): fix or remove {'it' if len(unmatched) == 1 else 'them'}")


def weightless_targets_line(weightless: dict[str, list[str]], adaptable: list[str], model: str, key: str = UNET_TARGETS_KEY) -> str:
    """The one line for the targets naming only layers without weights of `model` (target -> their kinds: Dropout,
    SiLU), with a few targets that name layers LoRA adapts (`adaptable`, as `unmatched_targets_line` takes them)."""
    return _unadapted_targets_line(weightless, adaptable, model, "which have no weights for LoRA to adapt", key)


def norm_targets_line(norms: dict[str, list[str]], adaptable: list[str], model: str, key: str = UNET_TARGETS_KEY) -> str:
    """The one line for the targets naming norm layers of `model` (target -> their kinds: GroupNorm, LayerNorm), whose
    weights scale each channel: peft adapts no such layer."""
    return _unadapted_targets_line(norms, adaptable, model, "which LoRA does not adapt", key)


def _unadapted_targets_line(kinds_named: dict[str, list[str]], adaptable: list[str], model: str, why: str, key: str) -> str:
    names = ", ".join(f"'{target}'" for target in kinds_named)
    kinds = ", ".join(sorted({kind for found in kinds_named.values() for kind in found}))
    one = len(kinds_named) == 1
    return (f"{key}: {names} {'names' if one else 'name'} {kinds} layers of the {model}, {why} "
            f"(it adapts Linear and Conv2d layers, e.g. {_examples(adaptable)}): fix or remove {'it' if one else 'them'}")


def block_targets_line(blocks: dict[str, list[str]], model: str, key: str = UNET_TARGETS_KEY) -> str:
    """The one line for the targets naming blocks of `model` (an attention, a transformer block: modules whose layers hold
    the weights), with names of their layers (target -> the full names of the Linear and Conv2d layers inside them)."""
    names = ", ".join(f"'{target}'" for target in blocks)
    examples = []
    for target, inside in blocks.items():
        # Under the target's own name where that names the layer (attn1.to_q), else the layer's (to_q): never a path of indices.
        examples += [f"{target}.{example}" if any(name.endswith(f"{target}.{example}") for name in inside) else example
                     for example in _examples(inside).split(", ")]  # fmt: skip
    one = len(blocks) == 1
    return (f"{key}: {names} {'names' if one else 'name'} blocks of the {model}, not the layers in them LoRA adapts: "
            f"name their layers instead, e.g. {', '.join(list(dict.fromkeys(examples))[:6])}")


def _examples(adaptable: list[str]) -> str:
    """A few targets naming some of the `adaptable` layers: EXAMPLE_TARGETS's, else their own names (a text encoder's)."""
    examples = [target for target in EXAMPLE_TARGETS if any(matches(name, target) for name in adaptable)]
    return ", ".join((examples or list(dict.fromkeys(name.rpartition(".")[2] for name in adaptable)))[:6])


# The modules of SD1.x's and SD2.x's UNet2DConditionModel without weights, which its header therefore leaves out: each
# module that holds some (a regular expression of its full name; "" the UNet itself) -> its weightless children and their
# kinds. Read from the installed diffusers' source (0.42): Attention.to_out is [Linear, Dropout]
# (diffusers/models/attention_processor.py), FeedForward.net [GELU (holding `proj`), Dropout, Linear]
# (diffusers/models/attention.py), ResnetBlock2D has `dropout` and `nonlinearity` (diffusers/models/resnet.py),
# TimestepEmbedding `act` (diffusers/models/embeddings.py), and UNet2DConditionModel `conv_act` and `time_proj`
# (diffusers/models/unets/unet_2d_condition.py). tests/test_lora_targets_first.py checks them against a loaded UNet.
WEIGHTLESS = {
    r"(.+\.)?to_out": {"1": "Dropout"},
    r"(.+\.)?ff\.net": {"1": "Dropout"},
    r"(.+\.)?resnets\.\d+": {"dropout": "Dropout", "nonlinearity": "SiLU"},
    r"time_embedding": {"act": "SiLU"},
    r"": {"conv_act": "SiLU", "time_proj": "Timesteps"},
}


# The norm layers of SD1.x's and SD2.x's UNet2DConditionModel (a 1-D weight in the header) by their full names: a transformer
# block's norm1-3 are LayerNorm (diffusers/models/attention.py's BasicTransformerBlock), every other GroupNorm (a resnet's,
# Transformer2DModel's `norm`, `conv_norm_out`). tests/test_lora_targets_first.py checks them against a loaded UNet.
NORM_KINDS = {r"(.+\.)?transformer_blocks\.\d+\.norm\d": "LayerNorm"}


def norm_kind(name: str) -> str:
    return next((kind for pattern, kind in NORM_KINDS.items() if re.fullmatch(pattern, name)), "GroupNorm")


def weightless_modules(modules: set[str]) -> dict[str, str]:
    """The full names of the modules without weights beside `modules` (those holding some, and the modules above them)
    -> their kinds, by WEIGHTLESS."""
    found = {}
    for holder in [*modules, ""]:
        for pattern, children in WEIGHTLESS.items():
            if re.fullmatch(pattern, holder):
                found.update({f"{holder}.{child}".lstrip("."): kind for child, kind in children.items()})
    return found


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
        return diffusers_names(weight_dims(path, ORIGINAL_UNET)) if path.suffix.lower() == ".safetensors" else None
    files = [file for file in part_weights(base.folder, "unet", base.config.variant) if file.suffix.lower() == ".safetensors"]
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
    """Refuse the targets that name no module of the base's UNet, only ones without weights, norm layers or blocks, from
    its weights' header; nothing is said where no header is at hand (the LoRA's check says it once the model has loaded)."""
    dims = unet_weight_dims(base)
    if not dims:
        return
    modules = module_names(dims)
    weightless = weightless_modules(modules)
    unmatched = [target for target in target_modules if not any(matches(name, target) for name in modules)]
    adaptable = [name for name, ndim in dims.items() if ndim in (2, 4)]  # Linear and Conv2d weights
    if without_weights := {target: sorted({kind for name, kind in weightless.items() if matches(name, target)}) for target in unmatched}:
        if missing := [target for target, kinds in without_weights.items() if not kinds]:
            raise FinetuneError(unmatched_targets_line(missing, adaptable, "UNet2DConditionModel"))
        raise FinetuneError(weightless_targets_line(without_weights, adaptable, "UNet2DConditionModel"))
    # peft refuses a target any of whose matches it cannot adapt, though others it could (`norm1` names a resnet's GroupNorm too).
    norms = {target: sorted({norm_kind(name) for name, ndim in dims.items() if ndim == 1 and matches(name, target)}) for target in target_modules}
    if norms := {target: kinds for target, kinds in norms.items() if kinds}:
        raise FinetuneError(norm_targets_line(norms, adaptable, "UNet2DConditionModel"))
    blocks = {target: [name for name in adaptable if any(name.startswith(f"{block}.") for block in _blocks(modules - dims.keys(), target))]
              for target in target_modules}  # fmt: skip
    if blocks := {target: inside for target, inside in blocks.items() if inside}:
        raise FinetuneError(block_targets_line(blocks, "UNet2DConditionModel"))


def _blocks(holders: set[str], target: str) -> list[str]:
    """The modules of `holders` (those holding no weight of their own, only their layers do) that `target` names."""
    return [name for name in holders if matches(name, target)]


def module_names(dims: dict[str, int]) -> set[str]:
    """The modules holding the weights `dims` names, and those above them (a block, an attention, a ModuleList): `a.b.c`,
    `a.b`, `a`."""
    return {".".join(parts[:end]) for parts in (name.split(".") for name in dims) for end in range(1, len(parts) + 1)}
