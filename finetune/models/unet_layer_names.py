"""lora.target_modules against the base's UNet, before anything loads.

A target names the layers whose full name is it or ends in `.<it>` (peft's matching: `to_q`, `attn1.to_q`,
`down_blocks.0.attentions.0.proj_in`). One naming no layer was said when the LoRA was made, after the model had
loaded and, under `finetune train`, after the data check had decoded every image. The UNet's module names are in its
weights' safetensors header, each weight's name less `.weight`/`.bias` (and every module above it, by its prefix):
read without torch or the weights, as `finetune train` does before its data check (finetune/cli/run_refusals.py).
A base without such a header (a single file, `.bin` weights, a hub base whose weights are not fetched yet) is checked
as the LoRA is made (`finetune.methods.lora.check_targets`), in the same words.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError

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


def unet_weight_dims(folder: Path, variant: str | None) -> dict[str, int] | None:
    """Each UNet module holding a weight -> that weight's number of dimensions (2: Linear, 4: Conv2d, 1: a norm), from the
    headers of `folder`'s unet/ safetensors files; None where there are none (the weights are read otherwise)."""
    from safetensors import safe_open

    from finetune.models.base_folder import part_weights

    files = [file for file in part_weights(folder, "unet", variant) if file.suffix == ".safetensors"]
    if not files:
        return None
    dims = {}
    for file in files:
        with safe_open(str(file), "np") as weights:  # the header alone ("pt" would import torch)
            for key in weights.keys():
                if key.endswith(".weight"):
                    dims[key.removesuffix(".weight")] = len(weights.get_slice(key).get_shape())
    return dims


def check_unet_targets_first(target_modules: list[str], folder: Path | None, variant: str | None) -> None:
    """Refuse the targets that name no module of the base's UNet, from its weights' header (`folder`: the base's diffusers
    folder, None for a single file); nothing is said where no header is at hand."""
    dims = unet_weight_dims(folder, variant) if folder is not None else None
    if not dims:
        return
    modules = {prefix for name in dims for prefix in _prefixes(name)}  # a block, an attention, a ModuleList: modules too
    unmatched = [target for target in target_modules if not any(matches(name, target) for name in modules)]
    if unmatched:
        adaptable = [name for name, rank in dims.items() if rank in (2, 4)]
        raise FinetuneError(unmatched_targets_line(unmatched, adaptable, "UNet2DConditionModel"))


def _prefixes(name: str) -> list[str]:
    """`a.b.c` and the modules above it: `a.b`, `a`."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
