"""DoRA (Liu et al. 2024, weight-decomposed LoRA; peft's `use_dora`): a LoRA whose layers also hold one magnitude
per output channel. An adapted weight becomes

    W' = m * (W + s * up @ down) / ||W + s * up @ down||

with the norm taken over each output channel's row (a convolution's kernel flattened into it), s = alpha/rank
(alpha/sqrt(rank) with rsLoRA) times the strength: what peft's layers compute, so a merge or the demo gives
`finetune sample`'s model. At strength 0 the magnitudes still apply (peft's scale reaches the LoRA only).

Our `LoRA` holds each magnitude flat, one value per output channel; files name and shape it as their tools read it:
diffusers' layout by peft's name (`<module>.lora_magnitude_vector.weight`: a Linear's (out,), a Conv2d's (1, out, 1, 1)),
kohya's as LyCORIS and ComfyUI do (`<module>.dora_scale`, (out, 1) or (out, 1, 1, 1): LyCORIS' `wd_on_output`, the axis
peft decomposes on; its older per-input-channel scales, (1, in, ...), are another decomposition and are refused).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError

if TYPE_CHECKING:  # torch loads with the tensors themselves: the demo's adapter scan imports this module for names_magnitudes
    import torch

DIFFUSERS_MAGNITUDE = ".lora_magnitude_vector"  # + ".weight" as we write it (transformers 5 loads CLIP's only so); peft's own files omit it
KOHYA_MAGNITUDE = ".dora_scale"
# What sd-scripts' metadata says of a DoRA file: LyCORIS' network module and its arguments for peft's decomposition.
KOHYA_DORA_METADATA = {"ss_network_module": "lycoris.kohya"}
KOHYA_DORA_ARGS = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}


def names_magnitudes(keys) -> bool:
    """Whether a file's tensor names hold DoRA magnitudes (in either layout): what the demo's list tells a DoRA by."""
    return any(key.endswith((KOHYA_MAGNITUDE, DIFFUSERS_MAGNITUDE, DIFFUSERS_MAGNITUDE + ".weight")) for key in keys)


def diffusers_magnitude(magnitude: torch.Tensor, conv: bool) -> torch.Tensor:
    """The magnitude as peft holds it: (out,) for a Linear layer, (1, out, 1, 1) for a Conv2d."""
    return magnitude.reshape(1, -1, 1, 1) if conv else magnitude.reshape(-1)


def kohya_magnitude(magnitude: torch.Tensor, weight_ndim: int) -> torch.Tensor:
    """The magnitude as LyCORIS writes `dora_scale` on the output axis: (out, 1) or (out, 1, 1, 1)."""
    return magnitude.reshape(-1, *[1] * (weight_ndim - 1))


def read_magnitude(tensor: torch.Tensor, key: str, out_channels: int, kohya: bool) -> torch.Tensor:
    """The flat per-output-channel magnitude of `key`, or one line saying why it is not one. In a kohya file the first
    dimension tells the axis, as ComfyUI reads it; a diffusers-layout file holds peft's, always per output channel."""
    per_output = tensor.numel() == out_channels and (not kohya or (tensor.ndim >= 1 and tensor.shape[0] == out_channels))
    if per_output:
        return tensor.reshape(-1)
    if kohya and tensor.ndim >= 2 and tensor.shape[0] == 1:  # LyCORIS' (1, in, ...): told by the first dimension, as ComfyUI does
        raise FinetuneError(f"LoRA key {key} ({tuple(tensor.shape)}) is not one DoRA magnitude per output channel ({out_channels}): "
                            "a scale per input channel (LyCORIS without wd_on_output) is another decomposition, not loaded here")  # fmt: skip
    # Any other shape is no decomposition: the file is cut or edited, or the key names another layer's magnitudes.
    raise FinetuneError(f"LoRA key {key} ({tuple(tensor.shape)}) is not one DoRA magnitude per output channel ({out_channels}) nor per input channel: "
                        "a damaged file? get it again")  # fmt: skip


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """Each output channel's norm (a row of a Linear weight, a filter of a Conv2d), as peft's DoRA takes it."""
    return weight.flatten(1).norm(dim=1)


def decomposed(weight: torch.Tensor, update: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m * (W + update) / ||W + update|| per output channel, in fp32."""
    combined = weight.float() + update.float()
    return combined * (magnitude.float() / row_norms(combined)).reshape(-1, *[1] * (combined.ndim - 1))


def uses_dora(lora) -> bool:
    """Whether `lora` (a `finetune.formats.kohya.LoRA`) is a DoRA. One with magnitudes for some layers only is refused: no tool
    applies half a DoRA alike (peft would start the others' magnitudes from the base weights)."""
    missing = [key for key, layer in lora.layers.items() if layer.magnitude is None]
    if missing and len(missing) < len(lora.layers):
        raise FinetuneError(f"it has DoRA magnitudes for {len(lora.layers) - len(missing)} of its {len(lora.layers)} layers only "
                            f"({missing[0]} has none): a damaged or cut file?")  # fmt: skip
    return not missing and bool(lora.layers)


def check_config_magnitudes(lora, config: dict) -> None:
    """A diffusers-layout file whose saved peft config says DoRA must hold its magnitudes: without them diffusers would
    start each from the base weight's norm, another model than the one trained."""
    if any(key.endswith(".use_dora") and value is True for key, value in config.items()) and not uses_dora(lora):
        raise FinetuneError(f"its lora_adapter_metadata says DoRA (use_dora) and it holds no DoRA magnitudes ({DIFFUSERS_MAGNITUDE[1:]}): a damaged or cut file?")


def check_kohya_magnitudes(lora, metadata: dict[str, str]) -> None:
    """The same of a kohya file whose sd-scripts metadata says DoRA (LyCORIS' dora_wd in ss_network_args): a tool that drops
    `dora_scale` (diffusers' converter does) and keeps the metadata leaves a plain LoRA of another model than the one trained."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:  # other trainers' network_args may be anything
        return
    if isinstance(args, dict) and str(args.get("dora_wd")).lower() == "true" and not uses_dora(lora):
        raise FinetuneError(f"its ss_network_args say DoRA (dora_wd) and it holds no DoRA magnitudes ({KOHYA_MAGNITUDE[1:]}): "
                            "a damaged file, or one converted by a tool that drops them? get the original")  # fmt: skip


def dora_output_hook(module: torch.nn.Module, layer, strength: float, branch, scale: float):
    """A forward hook applying a DoRA layer beside `module` (a Linear or Conv2d) as peft's DoRA layer does: with
    r = m / ||W + update|| per output channel, it adds (r - 1) * W x + r * scale * up(down(x)) to the layer's output,
    which makes it r * (W + update) x + bias. `branch` is up(down(x)) as the demo computes it for a plain LoRA."""
    import torch

    weight = module.weight  # on the model's device (the LoRA's tensors stay on the CPU)
    norms = row_norms(weight.float() + layer.delta(strength).to(weight.device))
    ratio = (layer.magnitude.to(weight.device).float() / norms).to(weight.dtype)
    conv = isinstance(module, torch.nn.Conv2d)
    ratio = ratio.reshape(-1, 1, 1) if conv else ratio  # a convolution's output is (batch, channels, height, width)

    def hook(_module, inputs, output):
        x = inputs[0].to(weight.dtype)
        # W x recomputed, not taken from the output: another LoRA's hook on the layer may have added to that already.
        base = module._conv_forward(x, weight, None) if conv else torch.nn.functional.linear(x, weight)
        return output + (ratio - 1) * base + ratio * branch(x) * scale

    return hook
