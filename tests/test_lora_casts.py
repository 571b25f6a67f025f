"""A LoRA's weights cast to autocast's precision together in a training forward (`finetune.models.lora_casts`): the loss and
every gradient those of autocast's casts one weight at a time, to the bit; where autocast's casts stay (gradient
checkpointing's recomputed forward, inference), they are autocast's own."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import LoraLayer

from test_lora_unit_scale import lora_unet
from operation_counts import CountOperations


def training_step(unet, inputs, together: bool):
    """Loss, gradients and operators of a bf16-autocast forward and backward; `together`: the weights cast together."""
    layers = [module for module in unet.modules() if isinstance(module, LoraLayer)]
    casts = next(layer.weight_casts for layer in layers if getattr(layer, "weight_casts", None) is not None)
    for layer in layers:
        if hasattr(layer, "weight_casts"):
            layer.weight_casts = casts if together else None
    unet.zero_grad(set_to_none=True)
    with CountOperations() as operations:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = unet(*inputs).sample.float().pow(2).mean()
        loss.backward()
    return loss.item(), [p.grad.clone() for p in unet.parameters() if p.requires_grad], operations.kernels


def test_the_weights_cast_together_train_as_those_cast_one_by_one():
    unet, inputs = lora_unet(4, torch.bfloat16)
    together, one_by_one = training_step(unet, inputs, True), training_step(unet, inputs, False)
    assert together[0] == one_by_one[0] and all(torch.equal(a, b) for a, b in zip(together[1], one_by_one[1]))
    assert together[2][torch.ops.aten._foreach_copy_] == 2  # forward, backward
    linear_weights = 2 * sum(isinstance(m.lora_A["default"], torch.nn.Linear) for m in unet.modules() if isinstance(m, LoraLayer))
    assert one_by_one[2][torch.ops.aten._to_copy] - together[2][torch.ops.aten._to_copy] == 2 * linear_weights


@pytest.mark.parametrize("forward", ["checkpointed", "inference"])
def test_autocast_casts_each_weight_where_a_forward_is_recomputed_or_records_no_gradients(forward):
    unet, inputs = lora_unet(4, torch.bfloat16)
    if forward == "checkpointed":  # the recomputed forward must make what the first made
        unet.enable_gradient_checkpointing()
        together, one_by_one = training_step(unet, inputs, True), training_step(unet, inputs, False)
        assert together[0] == one_by_one[0] and all(torch.equal(a, b) for a, b in zip(together[1], one_by_one[1]))
        assert torch.ops.aten._foreach_copy_ not in together[2]
        return
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), CountOperations() as operations:
        unet(*inputs)
    assert torch.ops.aten._foreach_copy_ not in operations.kernels
