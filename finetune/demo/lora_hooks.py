"""A LoRA (or DoRA) applied beside a model's weights for a while, as the demo renders a column: forward hooks add
s * (alpha/rank) * up(down(x)) to their layers' outputs (a DoRA's output rescaled per output channel: `finetune.formats.dora`),
as peft's layers do in `finetune sample`, from our neutral `LoRA` form (kohya and diffusers files behave the same,
alpha != rank keeps its strength). The weights are never changed, so in bf16 or fp16 a weak LoRA is not rounded away,
and several LoRAs at different strengths need no adapter bookkeeping in peft."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from finetune.formats.dora import dora_output_hook, uses_dora
from finetune.formats.kohya import LoRA, LoRALayer
from finetune.formats.merge import find_module


@contextlib.contextmanager
def loras_applied(models: dict[str, torch.nn.Module], loras: list[tuple[LoRA, float]]):
    """Each LoRA added to its layers' outputs, s * (alpha/rank) * up(down(x)), in the layers' own precision, as
    peft's layers do it for `finetune sample`; the hooks come off after, leaving the model untouched.

    Not merged into the weights: in bf16 (and fp16) an update smaller than half a weight's last bit is rounded
    away, and a weak LoRA's is (the quickstart LoRA at strength 0.1 gave the base's image, bit for bit)."""
    hooks = []
    try:
        for lora, strength in loras:
            if strength == 0 and not uses_dora(lora):  # nothing to add: the base's image exactly (a DoRA's magnitudes still apply, as in sample)
                continue
            for key, layer in lora.layers.items():
                part, path = key.split(".", 1)
                module = find_module(models[part], path, part)
                hooks.append(module.register_forward_hook(_adds_lora_output(module, layer, strength)))
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _adds_lora_output(module: torch.nn.Module, layer: LoRALayer, strength: float):
    """A forward hook adding `layer`'s output at `strength` to `module`'s (a Linear or a Conv2d: peft's order of operations)."""
    down, up = (t.to(module.weight.device, module.weight.dtype) for t in (layer.down, layer.up))
    scale = strength * layer.alpha / layer.rank
    if isinstance(module, torch.nn.Conv2d):  # down has the layer's kernel, stride and padding; up is 1x1
        branch = lambda x: F.conv2d(F.conv2d(x, down, None, module.stride, module.padding, module.dilation), up)
    else:
        branch = lambda x: F.linear(F.linear(x, down.flatten(1)), up.flatten(1))
    if layer.magnitude is not None:  # a DoRA rescales each output channel too
        return dora_output_hook(module, layer, strength, branch, scale)
    return lambda _module, inputs, output: output + branch(inputs[0].to(down.dtype)) * scale
