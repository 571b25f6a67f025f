"""The training loop's own operators: a loss weighed by a factor of exactly 1 (one process, no accumulation, full
batches; DreamBooth's default prior_loss_weight) is not multiplied by it. Multiplying by 1 changes no bit, but each
multiply is a kernel launch on a GPU, and the loss's another in the backward (docs/benchmarks-gpu.md)."""

from __future__ import annotations

import traceback

import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.methods.dreambooth import DreamBoothMethod
import finetune.training.step_losses as step_losses
from finetune.training.trainer import train
import finetune.training.training_run as training_run
from operation_counts import CountOperations


DISPATCH_FILES = ("torch/_tensor.py", "torch/_compile.py", "torch/_dynamo/eval_frame.py", "torch/utils/_python_dispatch.py", "torch/_ops.py", "torch/overrides.py")


class MultipliesByOne(TorchDispatchMode):
    """The lines of finetune's code that multiplied or divided a tensor by a number equal to 1 (in the forward: a backward
    operator's stack is the backward call's, where diffusers' divisions by 1.0 would be named by the line calling it)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        backward = torch._C._current_autograd_node() is not None
        if not backward and func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.div) and any(not isinstance(a, torch.Tensor) and a == 1 for a in args):
            # The line that asked for it: torch's own code (clip_grad_norm_ multiplying by a max_norm of 1) is torch's, its
            # operator methods (Tensor.__rtruediv__) are the caller's.
            caller = [f for f in traceback.extract_stack() if not f.filename.endswith(DISPATCH_FILES) and f.filename != __file__][-1]
            if "/finetune/" in caller.filename and "site-packages" not in caller.filename:  # not diffusers' own divisions by 1
                self.lines.append(f"{caller.filename}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


def test_a_step_of_one_process_multiplies_no_loss_by_one(make_recipe):
    counting = MultipliesByOne()

    def on_step(step: int) -> None:  # the second step, from the end of the first to its own end
        counting.__enter__() if step == 1 else counting.__exit__(None, None, None) if step == 2 else None

    train(make_recipe(train__max_steps=3), on_step=on_step)
    assert counting.lines == [], counting.lines  # the loss by its share, the running sums by their weight


def test_skipping_the_multiplies_leaves_every_loss_and_weight_bit_identical(make_recipe, monkeypatch, tmp_path):
    ours = train(make_recipe(train__max_steps=3, output_dir=str(tmp_path / "ours")))
    multiplying = lambda value, weight: value * weight  # noqa: E731 (what the loop did)
    for module in (training_run, step_losses):
        monkeypatch.setattr(module, "weighted", multiplying)
    theirs = train(make_recipe(train__max_steps=3, output_dir=str(tmp_path / "theirs")))
    assert ours.losses == theirs.losses
    weights = [load_file(folder / "pytorch_lora_weights.safetensors") for folder in (tmp_path / "ours", tmp_path / "theirs")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_dreambooth_adds_its_class_loss_unweighted_at_a_prior_loss_weight_of_1(make_recipe, image_folder):
    concept = {"instance_dir": str(image_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape"}
    per_sample = torch.tensor([1.0, 3.0, 10.0, 21.0], requires_grad=True)  # instances first, then their class images
    for prior_loss_weight, multiplies in ((1.0, 0), (0.5, 1)):
        recipe = make_recipe(method="dreambooth", data__image_dir=None, dreambooth={"concepts": [concept], "prior_loss_weight": prior_loss_weight})
        method = DreamBoothMethod(recipe)
        with CountOperations() as counted:
            loss = method.combine_losses(per_sample, {"num_instance": 2})["loss"]
        assert counted.counts[torch.ops.aten.mul] == multiplies
        assert loss.item() == 2.0 + prior_loss_weight * 15.5


def test_the_running_losses_add_no_term_to_zero_and_weigh_the_loss_once():
    """StepLosses began each sum at 0.0 (an add of the first term to 0) and weighed the loss twice (for its running sum
    and for the step's): on a GPU a kernel launch each. Now a term is multiplied once where its weight is not 1, and
    added from a sum's second term on; the sums are the same bits."""
    from finetune.training.step_losses import StepLosses

    micro_batches = [{"loss": torch.tensor(0.7 + i), "prior": torch.tensor(0.3 * i + 0.1)} for i in range(2)]
    running = StepLosses()
    with CountOperations() as counted:
        running.add(micro_batches[0], 1.0)  # one micro-batch of a full step: nothing to compute
    assert +counted.kernels == {}, counted.kernels

    running = StepLosses()
    with CountOperations() as counted:
        for terms in micro_batches:  # two micro-batches, each half of the step
            running.add(terms, 0.5)
    assert +counted.kernels == {torch.ops.aten.mul: 4, torch.ops.aten.add: 3}, counted.kernels  # 2 terms x 2; the sums' second terms
    as_added = {name: (0.0 + micro_batches[0][name] * 0.5) + micro_batches[1][name] * 0.5 for name in ("loss", "prior")}
    assert all(torch.equal(running.sums[name], as_added[name]) for name in as_added)
    assert torch.equal(running.step_sum, as_added["loss"])
