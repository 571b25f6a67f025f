"""The training step's LoRA layers without peft's multiply by a scale of 1 (`finetune.models.lora_unit_scale`): the same
loss and gradients to the bit as peft's own forward, fp32 and under bf16 autocast, with two operators fewer per
layer (the multiply and its gradient) where alpha = rank, and one gradient copy fewer per attention output
projection (a Linear's tokens as one matrix)."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import LoraLayer

from finetune.config import LoRAConfig
from finetune.methods.lora import add_lora
from finetune.models.lora_unit_scale import UnitScaleLoRA
from finetune.models.tiny_model import build_tiny_pipeline
from operation_counts import CountOperations


def lora_unet(alpha: float, weight_dtype: torch.dtype):
    unet = build_tiny_pipeline(seed=3).unet
    add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"], weight_dtype, LoRAConfig(rank=4, alpha=alpha))
    generator = torch.Generator().manual_seed(0)
    for parameter in unet.parameters():
        if parameter.requires_grad:  # B starts at zero: give the LoRA an output and gradients everywhere
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    inputs = (torch.randn(2, unet.config.in_channels, 16, 16, generator=generator), torch.tensor([10, 700]),
              torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator))  # fmt: skip
    return unet, inputs


def step(unet, inputs, mixed_precision: bool, unit_scale_skipped: bool):
    layers = [module for module in unet.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        layer.lora_variant.clear()
        if unit_scale_skipped:
            layer.lora_variant["default"] = UnitScaleLoRA()
    unet.zero_grad(set_to_none=True)
    with CountOperations() as operations:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision):
            loss = unet(*inputs).sample.float().pow(2).mean()
        loss.backward()
    return loss.item(), [p.grad.clone() for p in unet.parameters() if p.requires_grad], operations.kernels, len(layers)


@pytest.mark.parametrize("mixed_precision", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("alpha", [4, 8], ids=["scale-1", "scale-2"])
def test_loss_and_gradients_are_peft_plain_forwards_to_the_bit(mixed_precision, alpha):
    unet, inputs = lora_unet(alpha, torch.bfloat16 if mixed_precision else torch.float32)
    layers = [module for module in unet.modules() if isinstance(module, LoraLayer)]
    assert layers and all(isinstance(layer.lora_variant.get("default"), UnitScaleLoRA) for layer in layers)  # as add_lora leaves them
    ours, peft_plain = step(unet, inputs, mixed_precision, True), step(unet, inputs, mixed_precision, False)
    assert ours[0] == peft_plain[0]
    assert len(ours[1]) == len(peft_plain[1]) and all(torch.equal(a, b) for a, b in zip(ours[1], peft_plain[1]))
    fewer, more = peft_plain[2] - ours[2], ours[2] - peft_plain[2]
    # Each to_out's gradient comes non-contiguous (Transformer2DModel permutes its output to NCHW): copied once for
    # the base layer and lora_B together, not once by each. And at alpha = rank one multiply forward and one backward
    # fewer per layer. Under autocast the Linear LoRAs' weights are cast together (finetune.models.lora_casts), not one by one:
    # a foreach copy forward and one backward for a cast per weight each way (each still allocated). Nothing else.
    to_outs = sum(name.endswith("to_out.0") for name, module in unet.named_modules() if isinstance(module, LoraLayer))
    cast = 2 * sum(isinstance(layer.lora_A["default"], torch.nn.Linear) for layer in layers) if mixed_precision else 0  # A and B
    assert to_outs == 8 and more == ({torch.ops.aten.empty_like: 2 * cast, torch.ops.aten._foreach_copy_: 2} if cast else {}), more
    assert fewer == {torch.ops.aten.clone: to_outs, **({torch.ops.aten.mul: 2 * ours[3]} if alpha == 4 else {}),
                     **({torch.ops.aten._to_copy: 2 * cast} if cast else {})}, fewer  # fmt: skip


def test_a_dora_keeps_peft_s_own_variant_and_merging_matches_peft():
    unet = build_tiny_pipeline(seed=3).unet
    add_lora(unet, ["to_q"], torch.float32, LoRAConfig(rank=4, alpha=8, use_dora=True))
    assert not any(isinstance(variant, UnitScaleLoRA) for m in unet.modules() if isinstance(m, LoraLayer) for variant in m.lora_variant.values())
    unet, _ = lora_unet(8, torch.float32)
    layer = next(m for m in unet.modules() if isinstance(m, LoraLayer))
    weight = layer.get_base_layer().weight.detach().clone()
    expected = weight + layer.get_delta_weight("default")
    layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, expected)
    layer.unmerge()
    layer.merge()
    assert torch.equal(layer.get_base_layer().weight, expected)
