"""A LoRA's weights cast to autocast's precision together, once per training forward, not one by one.

Under bf16/fp16 autocast each fp32 LoRA weight is cast to half precision where its layer uses it, and its gradient cast
back to fp32 in the backward: two kernel launches per weight and step (512 for SD1.5's 128 attention LoRAs, a sixth
of the cached LoRA step's kernels), and an autograd node each. Here the plain LoRA Linear layers of a model
(`finetune.models.lora_unit_scale.UnitScaleLoRA`) take their weights from one cast of them all (`torch._foreach_copy_`, a few
launches) made at the model's first LoRA layer in each forward that records gradients, and their gradients go back to
fp32 in one foreach copy too. The same roundings as autocast's casts, forward and backward: the same bits.

Not where autocast's casts are fused or recomputed: a compiled forward (inductor fuses them), gradient checkpointing
(its recomputed forward must make what the first made), nor without autocast or gradients (inference, validation).
"""

from __future__ import annotations

import torch


class CastTogether(torch.autograd.Function):
    """`weights` cast to `dtype` with one foreach copy; their gradients back to each weight's dtype with another."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused cast's gradient stays None, not zeros to cast
        ctx.dtypes = [weight.dtype for weight in weights]
        casts = [torch.empty_like(weight, dtype=dtype) for weight in weights]
        torch._foreach_copy_(casts, list(weights))
        return tuple(casts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        present = [i for i, grad in enumerate(grads) if grad is not None]
        cast_back: list[torch.Tensor | None] = [None] * len(grads)
        for i in present:
            cast_back[i] = torch.empty_like(grads[i], dtype=ctx.dtypes[i])
        if present:
            torch._foreach_copy_([cast_back[i] for i in present], [grads[i] for i in present])
        return (None, *cast_back)


class WeightCasts:
    """A model's LoRA Linear layers' weights, cast together in each of its training forwards (see the module)."""

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module]):
        self.model = model
        self.layers = layers  # peft's lora_A and lora_B Linear layers, in pairs
        # The weights' casts for the forward running, keyed by the layer itself (a Module hashes by identity): an id(layer)
        # key was sound only because self.layers keeps every layer alive (a freed layer's id may be reused).
        self.casts: dict[torch.nn.Module, torch.Tensor] | None = None
        self.new_forward = False

    def started(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self.casts, self.new_forward = None, True

    def ended(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self.casts, self.new_forward = None, False

    def of(self, layer: torch.nn.Linear) -> torch.Tensor | None:
        """`layer`'s weight in this forward's autocast dtype, or None where autocast casts it itself."""
        if self.new_forward:
            self.new_forward = False
            self.casts = self._cast_all()
        return None if self.casts is None else self.casts.get(layer)

    def _cast_all(self) -> dict[torch.nn.Module, torch.Tensor] | None:
        weights = [layer.weight for layer in self.layers]
        device = weights[0].device.type
        if (torch.compiler.is_compiling() or not torch.is_grad_enabled() or not torch.is_autocast_enabled(device)
                or getattr(self.model, "is_gradient_checkpointing", False)):  # fmt: skip
            return None
        dtype = torch.get_autocast_dtype(device)
        if any(weight.dtype != torch.float32 or weight.device.type != device for weight in weights):  # DeepSpeed's copies, or split over devices
            return None
        return dict(zip(self.layers, CastTogether.apply(dtype, *weights)))


def cast_together(model: torch.nn.Module, layers: list[torch.nn.Module]) -> WeightCasts | None:
    """Cast the weights of `layers` (Linear, without bias) together in each training forward of `model`; the layers read
    their casts with `WeightCasts.of`."""
    if not layers:
        return None
    casts = WeightCasts(model, layers)
    model.register_forward_pre_hook(casts.started)
    model.register_forward_hook(casts.ended)
    return casts
