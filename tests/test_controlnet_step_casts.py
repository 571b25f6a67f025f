"""A ControlNet step under bf16 casts none of its residuals. accelerate casts a prepared model's half-precision outputs to
fp32: the ControlNet's residuals (activation-sized, 13 in SD1.5) were cast up and back to bf16 for the UNet, forward and
backward, each a kernel moving a whole activation on a GPU (docs/benchmarks-gpu.md). Without those casts the losses and
the trained weights are bit-identical to a run with them, in bf16 and fp32."""

from __future__ import annotations

import pytest
import torch
from controlnet_helpers import Capture, controlnet_recipe
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.checkpoints.run_files import CONTROLNET_DIR
from finetune.training.trainer import train
import finetune.training.trainer as trainer
from numerics import bit_identical_on_cpu


class CastShapes(TorchDispatchMode):
    """The shape of each tensor cast to another dtype (`_to_copy`), forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_a_bf16_controlnet_step_casts_none_of_its_residuals(make_recipe, pairs_folder, monkeypatch):
    capture, counting, residual_shapes = Capture(monkeypatch), CastShapes(), set()

    def residuals_read(module, args, kwargs):  # the UNet's inputs from the ControlNet, as the step hands them over
        residual_shapes.update(tuple(r.shape) for r in [*kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]])

    def on_step(step: int) -> None:  # the second step, from the end of the first to its own end
        if step == 1:
            capture.method.base.unet.register_forward_pre_hook(residuals_read, with_kwargs=True)
            counting.__enter__()
        elif step == 2:
            counting.__exit__(None, None, None)

    train(controlnet_recipe(make_recipe, pairs_folder, train__max_steps=3, train__mixed_precision="bf16"), on_step=on_step)
    assert len(residual_shapes) >= 3 and counting.shapes  # the tiny UNet's block sizes; autocast casts its weights
    residual_casts = [shape for shape in counting.shapes if shape in residual_shapes]
    assert residual_casts == [], f"{len(residual_casts)} casts of residual-sized tensors"


@bit_identical_on_cpu
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_losses_and_weights_are_bit_identical_to_a_run_that_casts_the_residuals(make_recipe, pairs_folder, monkeypatch, tmp_path, precision):
    def run(name: str):
        recipe = controlnet_recipe(make_recipe, pairs_folder, output_dir=str(tmp_path / name), train__max_steps=3, train__mixed_precision=precision)
        return train(recipe).losses, load_file(tmp_path / name / CONTROLNET_DIR / "diffusion_pytorch_model.safetensors")

    ours = run("ours")
    monkeypatch.setattr(trainer, "keep_autocast_outputs", lambda accelerator, module: None)  # accelerate's fp32 outputs, as before
    theirs = run("theirs")
    assert ours[0] == theirs[0]
    assert ours[1].keys() == theirs[1].keys() and all(torch.equal(ours[1][k], theirs[1][k]) for k in ours[1])
