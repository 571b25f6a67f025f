"""Max-norm regularization of a LoRA (`lora.max_norm`, sd-scripts' scale_weight_norms).

After each optimizer step, every LoRA layer whose update to its weight, scale x up @ down (scale =
alpha/rank, or alpha/sqrt(rank) with rsLoRA), has a Frobenius norm above `max_norm` is shrunk back to
it: up and down are both multiplied by sqrt(max_norm / norm), so no single layer's update grows without
bound (over-trained, "burnt" LoRAs), while the others train as before. The optimizer's moments are left
as they are, as sd-scripts leaves them.
"""

from __future__ import annotations

import torch


def lora_layers(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The peft LoRA layers (Linear or Conv2d) of the trained modules, by their full names."""
    return {
        f"{part}.{name}": layer
        for part, module in modules.items()
        for name, layer in module.named_modules()
        if hasattr(layer, "lora_A") and "default" in getattr(layer, "lora_A", {})
    }


def update_norm(layer: torch.nn.Module) -> torch.Tensor:
    """||scale x up @ down||_F without forming the (out x in) update: ||BA||^2 = sum((B^T B) * (A A^T)),
    two rank x rank products (a conv's kernel is flattened into its inputs, as its update's)."""
    down = layer.lora_A["default"].weight.flatten(1).float()
    up = layer.lora_B["default"].weight.flatten(1).float()
    squared = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0.0)  # rounding may take a zero below 0
    return squared.sqrt() * layer.scaling["default"]


@torch.no_grad()
def apply_max_norm(layers: dict[str, torch.nn.Module], max_norm: float) -> dict[str, torch.Tensor]:
    """Shrink every LoRA layer (`lora_layers`) whose update norm exceeds `max_norm` back to it; return what
    TensorBoard shows: how many layers were shrunk, and the mean and largest norm after shrinking. As tensors, read
    on the host at log steps only: a read (or choosing the layers to shrink on the host) waits for the GPU to finish
    the step, where the CPU would otherwise queue the next one's kernels meanwhile."""
    norms = torch.stack([update_norm(layer) for layer in layers.values()])
    above = norms > max_norm
    # Exactly 1 where the norm is within bounds: torch divides a number by a tensor as its reciprocal times the
    # number, so max_norm / max_norm (a clamp to it) could come out just below 1 and shrink and count that layer.
    ratios = torch.where(above, max_norm / norms, torch.ones_like(norms))
    # Every layer is multiplied, those within bounds by exactly 1 (unchanged): picking the shrunk ones needs the host.
    for layer, factor in zip(layers.values(), ratios.sqrt().unbind()):
        for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            weight.mul_(factor)
    kept = norms.clamp(max=max_norm)
    return {"lora/layers_scaled": above.sum().float(), "lora/mean_norm": kept.mean(), "lora/max_norm": kept.max()}
