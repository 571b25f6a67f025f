"""peft's LoRA layers without their multiply by a scale of 1.

peft adds `lora_B(lora_A(x)) * scaling` to each adapted layer's output, also when alpha/rank is 1 (lora.alpha
unset: alpha = rank, the default). Multiplying by 1.0 changes no bit, in any dtype, but it is an activation-sized
kernel per layer in the forward and another (its gradient) in the backward: 256 launches per step for SD1.5's 128
attention LoRAs. peft's own hook for variants of the forward (`LoraLayer.lora_variant`, how it runs DoRA) carries
`UnitScaleLoRA` on each plain LoRA layer: the same sum, the product skipped when the scale is exactly 1 at the call
(peft's `set_scale`, diffusers' `scale_lora_layers` may change it; otherwise multiplied as peft does).
A Linear layer's tokens go through the LoRA as one matrix (the sum with the base output too), so that a gradient
arriving non-contiguous is copied once for both, not by each linear's own unfolding (30 copies per step of the medium
preset). Merging is peft's own vanilla merge. peft marks its variant interface as subject to change: `tests/test_lora_unit_scale.py`
pins the loss and every gradient to peft's plain forward, to the bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer, LoraVariant

from finetune.models.lora_casts import cast_together


class UnitScaleLoRA(LoraVariant):
    """A plain LoRA, `result + lora_B(lora_A(dropout(x))) * scaling` as peft computes it, the product skipped at a scale of 1."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:
        pass

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropped = module.lora_dropout[active_adapter](x)
        scaling = module.scaling[active_adapter]
        if isinstance(lora_A, torch.nn.Linear) and dropped.dim() > 2:
            # Tokens as rows of one matrix, as F.linear folds them itself, and the sum unfolded once: a gradient that
            # comes non-contiguous (an attention's to_out, on the residual stream of diffusers' Transformer2DModel,
            # whose output is permuted to NCHW) is then made contiguous once for the base layer and lora_B together,
            # not once by each linear's own unfolding. The same matmuls on the same values.
            update = linear_update(module, lora_A, lora_B, dropped.reshape(-1, dropped.shape[-1]))
            summed = result.reshape(update.shape) + (update if scaling == 1 else update * scaling)
            return summed.view(result.shape)
        update = linear_update(module, lora_A, lora_B, dropped) if isinstance(lora_A, torch.nn.Linear) else lora_B(lora_A(dropped))
        return result + (update if scaling == 1 else update * scaling)

    # peft's vanilla merge (LoraLayer.merge and unmerge, the weights in their own dtype)
    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


def linear_update(module: LoraLayer, lora_A: torch.nn.Linear, lora_B: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`lora_B(lora_A(x))`, with the weights the model cast together for this forward where it did (`finetune.models.lora_casts`)."""
    casts = getattr(module, "weight_casts", None)
    down, up = (casts.of(lora_A), casts.of(lora_B)) if casts is not None else (None, None)
    if down is None or up is None:
        return lora_B(lora_A(x))
    return F.linear(F.linear(x, down), up)


def skip_unit_scales(model: torch.nn.Module) -> int:
    """Give each plain LoRA Linear or Conv2d layer of `model` (not a DoRA: peft runs that as its own variant) the
    forward without the multiply by 1, the Linear ones' weights cast together (`finetune.models.lora_casts`). Returns how many
    layers it changed."""
    changed, linear_layers, pairs = 0, [], []
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), (torch.nn.Linear, torch.nn.Conv2d)):
            for adapter in module.lora_A:
                if adapter not in module.lora_variant:
                    module.lora_variant[adapter] = UnitScaleLoRA()
                    changed += 1
                    down, up = module.lora_A[adapter], module.lora_B[adapter]
                    if isinstance(down, torch.nn.Linear) and down.bias is None and up.bias is None:
                        linear_layers.append(module)
                        pairs += [down, up]
    casts = cast_together(model, pairs)
    for module in linear_layers:
        module.weight_casts = casts
    return changed
