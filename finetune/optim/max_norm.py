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


def shape_groups(layers: dict[str, torch.nn.Module]) -> list[list[torch.nn.Module]]:
    """The layers by the shapes (and dtype, device) of their down and up weights and by their scale: SD1.5's 128
    attention LoRAs come in a handful of shapes, each group worked on at once, its scale a number (a tensor of the
    layers' scales would be copied to the GPU at each step, a copy the host waits for)."""
    groups: dict[tuple, list[torch.nn.Module]] = {}
    for layer in layers.values():
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        groups.setdefault((down.shape, up.shape, down.dtype, down.device, layer.scaling["default"]), []).append(layer)
    return list(groups.values())


@torch.no_grad()
def apply_max_norm(layers: dict[str, torch.nn.Module], max_norm: float) -> dict[str, torch.Tensor]:
    """Shrink every LoRA layer (`lora_layers`) whose update norm exceeds `max_norm` back to it; return what
    TensorBoard shows: how many layers were shrunk, and the mean and largest norm after shrinking. As tensors, read
    on the host at log steps only: a read (or choosing the layers to shrink on the host) waits for the GPU to finish
    the step, where the CPU would otherwise queue the next one's kernels meanwhile. A norm is taken without forming
    the (out x in) update: ||BA||^2 = sum((B^T B) * (A A^T)), two rank x rank products (a conv's kernel flattened into
    its inputs, as its update's). The layers of one shape are worked on stacked: about 9 kernels a layer, launched one
    by one, were some 1,150 launches a step for SD1.5's attention LoRA, about 20 per shape now."""
    kept = []
    for group in shape_groups(layers):
        downs = [layer.lora_A["default"].weight for layer in group]
        ups = [layer.lora_B["default"].weight for layer in group]
        down = torch.stack([w.flatten(1) for w in downs]).float()  # (layers, rank, inputs)
        up = torch.stack([w.flatten(1) for w in ups]).float()  # (layers, outputs, rank)
        squared = ((up.mT @ up) * (down @ down.mT)).sum(dim=(1, 2)).clamp(min=0.0)  # ||BA||^2 per layer; rounding may take a zero below 0
        norms = squared.sqrt() * group[0].scaling["default"]
        # Exactly 1 where the norm is within bounds: torch divides a number by a tensor as its reciprocal times the
        # number, so max_norm / max_norm (a clamp to it) could come out just below 1 and shrink and count that layer.
        ratios = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms)).sqrt().view(-1, 1, 1)
        # Every layer is multiplied, those within bounds by exactly 1 (unchanged): picking the shrunk ones needs the host.
        for weights, stacked in ((downs, down), (ups, up)):
            scaled = (stacked * ratios).to(weights[0].dtype).unbind()
            torch._foreach_copy_(weights, [rows.view_as(weight) for rows, weight in zip(scaled, weights)])
        kept.append(norms)
    norms = torch.cat(kept)
    clamped = norms.clamp(max=max_norm)
    return {"lora/layers_scaled": (norms > max_norm).sum().float(), "lora/mean_norm": clamped.mean(), "lora/max_norm": clamped.max()}
