"""A resume under DeepSpeed with the optimizer offloaded to CPU (DeepSpeed's CPU Adam; the shipped zero2_offload.json
and zero3_offload.json) continues the uninterrupted run's curve bit for bit. The CPU Adam keeps Adam's bias-correction powers outside its checkpoint and a
fresh one computes them otherwise (finetune/checkpoints/cpu_adam_steps.py): without the replay the masters differed by 1.2e-7 after
the first resumed step, and by more after each next."""

import pytest
import torch
from conftest import build_recipe
from safetensors.torch import load_file
from test_distributed import deepspeed, launch, wait, write

from finetune.checkpoints.cpu_adam_steps import continue_step_powers

STEPS = 4


@pytest.mark.slow  # a launch of two runs per stage, about a minute each (and the CPU Adam's build on first use)
@pytest.mark.parametrize("stage", [2, 3])
def test_an_offloaded_resume_steps_to_the_uninterrupted_runs_masters(stage, tiny_model, image_folder, tmp_path):
    """A full fine-tune in bf16 (fp32 masters in CPU memory), and the same resumed from its checkpoint-2: each step's
    masters after the resume are the uninterrupted run's, bit for bit (step 3 is where 0.999^3 rounds apart)."""
    settings = dict(method="full", train__batch_size=1, train__max_steps=STEPS, train__mixed_precision="bf16", optimizer__lr=1e-3,
                    checkpoint__every_n_steps=2)  # fmt: skip
    whole, resumed = (write(build_recipe(tiny_model, image_folder, tmp_path / name, **settings), tmp_path / f"{name}.yaml") for name in ("whole", "resumed"))
    wait(launch(deepspeed(f"zero{stage}_offload.json"), "--weights", whole, "--weights", "--resume", tmp_path / "whole" / "checkpoints" / "checkpoint-2", resumed))
    for step in range(3, STEPS + 1):
        got, expected = load_file(tmp_path / "resumed" / f"masters-{step}.safetensors"), load_file(tmp_path / "whole" / f"masters-{step}.safetensors")
        assert got.keys() == expected.keys()
        worst = max((got[name] - expected[name]).abs().max().item() for name in expected)
        assert worst == 0, f"step {step}: the resumed run's masters differ by up to {worst}"


@pytest.mark.slow  # DeepSpeed's CPU Adam compiles for over a minute on first use
def test_a_cpu_adam_loaded_from_its_state_steps_as_the_one_that_saved_it():
    """The replay alone, without ZeRO: a CPU Adam that loads another's state after 2 steps makes that one's third step."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    def adam(weight):
        return DeepSpeedCPUAdam([weight], lr=1e-3, betas=(0.9, 0.999), adamw_mode=True)

    gradients = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    start = torch.randn(64, generator=torch.Generator().manual_seed(1))
    whole, halfway = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    uninterrupted, first = adam(whole), adam(halfway)
    for step, gradient in enumerate(gradients):
        whole.grad = gradient.clone()
        uninterrupted.step()
        if step < 2:
            halfway.grad = gradient.clone()
            first.step()
    resumed_weight = torch.nn.Parameter(halfway.detach().clone())
    resumed = adam(resumed_weight)
    resumed.load_state_dict(first.state_dict())
    continue_step_powers(resumed)
    resumed_weight.grad = gradients[2].clone()
    resumed.step()
    assert torch.equal(resumed_weight, whole)
