"""A frozen text encoder's hidden states reach the UNet in autocast's dtype, cast once. CUDA's autocast runs CLIP's final
layer norm in fp32, so the states came out fp32 and each cross-attention's to_k and to_v cast them to bf16 again (32
kernels a step in SD1.5's UNet; docs/benchmarks-gpu.md). On a CPU that layer norm runs in bf16, so these tests make the
text encoder return fp32 states as it does on a GPU. The one cast gives the same values: losses and weights bit-identical."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
import finetune.methods.base as method_base
from finetune.methods.lora import LoRAMethod
from finetune.training.trainer import train


class StateCasts(TorchDispatchMode):
    """How many tensors shaped as the text encoder's hidden states are cast to bf16 (the UNet's casts; not the test's to fp32)."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.casts = width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy and tuple(args[0].shape[-2:]) == (77, self.width) and (kwargs or {}).get("dtype") == torch.bfloat16:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def states_in_fp32_as_on_a_gpu(monkeypatch, seen: list) -> None:
    configure_model = LoRAMethod.configure_model

    def configured(self):
        configure_model(self)
        seen.append(self)

        def fp32_states(module, args, output):
            output["last_hidden_state"] = output["last_hidden_state"].float()
            return output

        self.base.text_encoder.register_forward_hook(fp32_states)

    monkeypatch.setattr(LoRAMethod, "configure_model", configured)


@pytest.mark.parametrize("cached", [False, True])
def test_a_bf16_step_casts_the_frozen_text_states_once(make_recipe, monkeypatch, cached):
    seen, counting = [], None

    def on_step(step: int) -> None:  # the second step, from the end of the first to its own end
        nonlocal counting
        if step == 1:
            counting = StateCasts(seen[0].base.unet.config.cross_attention_dim)
            counting.__enter__()
        elif step == 2:
            counting.__exit__(None, None, None)

    states_in_fp32_as_on_a_gpu(monkeypatch, seen)
    train(make_recipe(train__max_steps=2, train__mixed_precision="bf16", train__cache_text_embeddings=cached), on_step=on_step)
    assert counting.casts == 1  # the tiny UNet's 4 cross-attentions cast them 8 times without it


def test_losses_and_adapter_are_bit_identical_to_the_states_cast_by_each_layer(make_recipe, monkeypatch, tmp_path):
    def run(name: str):
        train_result = train(make_recipe(output_dir=str(tmp_path / name), train__max_steps=3, train__mixed_precision="bf16"))
        return train_result.losses, load_file(tmp_path / name / LORA_WEIGHTS_NAME)

    states_in_fp32_as_on_a_gpu(monkeypatch, [])
    ours = run("ours")
    monkeypatch.setattr(method_base, "in_autocast_dtype", lambda states: states)  # each to_k and to_v casts them, as before
    theirs = run("theirs")
    assert ours[0] == theirs[0]
    assert ours[1].keys() == theirs[1].keys() and all(torch.equal(ours[1][k], theirs[1][k]) for k in ours[1])
