"""A trained text encoder keeps accelerate's fp32 outputs under bf16, unlike the ControlNet (test_controlnet_step_casts).

On a CPU a text-encoder LoRA's hidden states leave its bf16 final layer norm in bf16; accelerate casts them to fp32, and
their gradient back to bf16 (2 kernels a step, batch x 77 x width each; `tests/step_census.py --train-text-encoder lora`).
That is no round trip to drop: the UNet reads the states in each cross-attention's to_k and to_v (32 layers in SD1.5), and
autograd sums those layers' gradients in the states' dtype, fp32 with the cast and bf16 without it, so the text encoder's
gradients would change (the tiny model's by ~0.2% of their norm). On a GPU autocast runs the layer norm in fp32 and the
states come out fp32 already (torch's autocast lists: layer_norm is fp32 on CUDA, not on the CPU): no cast to drop there
either. A text encoder trained whole (fp32 weights, DreamBooth's or full's switch) returns fp32 states on both: no cast."""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from finetune.methods.lora import LoRAMethod
from finetune.training.trainer import train
from numerics import bit_identical_on_cpu


def first_step(make_recipe, tmp_path, monkeypatch, name: str) -> tuple[list[torch.Tensor], torch.dtype]:
    """The gradients of each parameter group (UNet, text encoder) at the first optimizer step of a bf16 run with a
    text-encoder LoRA, and the dtype the UNet reads the text encoder's hidden states in."""
    grads, read = [], []

    def before_step(optimizer, args, kwargs):
        if not grads:
            grads.extend(torch.cat([p.grad.flatten() for p in group["params"]]) for group in optimizer.param_groups)

    def unet_reads(module, args, kwargs):
        read.append((args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]).dtype)

    configure_model = LoRAMethod.configure_model

    def configured(self):  # the UNet is the method's once configured
        configure_model(self)
        self.base.unet.register_forward_pre_hook(unet_reads, with_kwargs=True)

    # Unclipped: a norm shared by both would carry a change of the text encoder's gradients into the UNet's.
    recipe = make_recipe(output_dir=str(tmp_path / name), lora__train_text_encoder=True, train__max_steps=1,
                         train__mixed_precision="bf16", train__max_grad_norm=None)
    hook = register_optimizer_step_pre_hook(before_step)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(LoRAMethod, "configure_model", configured)
            train(recipe)
    finally:
        hook.remove()
    return grads, read[0]


@bit_identical_on_cpu  # on a GPU the states are fp32 either way, and both runs alike
def test_the_unet_reads_the_text_encoders_states_in_fp32_and_sums_their_gradients_so(make_recipe, tmp_path, monkeypatch):
    (unet, text_encoder), read = first_step(make_recipe, tmp_path, monkeypatch, "as_trained")
    assert read == torch.float32  # accelerate's cast: the UNet layers' gradients of the states are summed in fp32

    # Were the text encoder listed with the ControlNet (its forward of before `prepare`, no output cast):
    monkeypatch.setattr(LoRAMethod, "feeding_another_model", ("text_encoder",))
    (unet_without, text_encoder_without), read_without = first_step(make_recipe, tmp_path, monkeypatch, "without_the_cast")
    assert read_without == torch.bfloat16
    assert torch.equal(unet, unet_without)  # the same forward: the states' values are bf16's either way
    assert not torch.equal(text_encoder, text_encoder_without), "the text encoder's gradients no longer depend on the cast"
