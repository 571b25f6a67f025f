import warnings

import pytest
import torch

from finetune.config import OptimizerConfig
from finetune.optim.optimizers import build_optimizer, step_size


@pytest.mark.parametrize("name,states", [("adamw8bit", ("state1", "state2")), ("paged_adamw8bit", ("state1", "state2")), ("lion8bit", ("state1",))])
def test_8bit_optimizers_keep_large_tensor_states_in_8_bits_and_small_ones_in_32(name, states):
    large = torch.nn.Parameter(torch.randn(128, 128))  # >= 4096 elements: quantised states
    small = torch.nn.Parameter(torch.randn(16))  # bitsandbytes keeps small tensors in fp32
    optimizer = build_optimizer(OptimizerConfig(name=name, lr=1e-3), [large, small])
    assert type(optimizer).__module__.startswith("bitsandbytes")
    (large.square().sum() + small.square().sum()).backward()
    before = large.detach().clone()
    optimizer.step()
    for state in states:
        assert optimizer.state[large][state].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32
    assert not torch.equal(large.detach(), before)


def test_paged_optimizer_on_cpu_is_said_once_in_our_words(capsys):
    """bitsandbytes said "Paged optimizers are not supported on CPU" as a Python warning with its source line, from
    every process at the first step; the run says it once (the main process) as its other warnings read."""
    parameter = torch.nn.Parameter(torch.randn(128, 128))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = build_optimizer(OptimizerConfig(name="paged_adamw8bit", lr=1e-3), [parameter])
        for _ in range(2):
            parameter.square().sum().backward()
            optimizer.step()
    assert [str(w.message) for w in caught if "Paged" in str(w.message)] == []
    assert capsys.readouterr().out == ("warning: optimizer.name=paged_adamw8bit: paging needs a CUDA GPU, so on CPU the 8-bit states are "
                                       "kept unpaged, as adamw8bit keeps them: name adamw8bit for the same training without this warning\n")


def test_parameter_groups_keep_their_own_learning_rate():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(OptimizerConfig(lr=1e-3), [{"params": [a]}, {"params": [b], "lr": 5e-5}])
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-5]


def test_adamw_is_fused_and_steps_like_the_per_tensor_loop():
    """One fused kernel for all tensors (torch's CPU default is a Python loop over them): same update."""
    torch.manual_seed(0)
    weights = [torch.randn(16, 48), torch.randn(48, 16), torch.randn(7)]
    gradients = [torch.randn_like(w) for w in weights]
    results = []
    for fused in (True, False):
        parameters = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = build_optimizer(OptimizerConfig(lr=1e-3), parameters) if fused else torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
        assert optimizer.defaults["fused"] is (True if fused else None)
        for _ in range(3):
            for parameter, gradient in zip(parameters, gradients):
                parameter.grad = gradient.clone()
            optimizer.step()
        results.append(parameters)
    for fused, loop, start in zip(*results, weights):
        assert not torch.equal(fused, start) and torch.allclose(fused, loop, atol=1e-7)


def _descend(optimizer, parameter, target, steps):
    losses = []
    for _ in range(steps):
        loss = (parameter - target).square().mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_adafactor_keeps_a_row_and_a_column_per_matrix_and_descends():
    torch.manual_seed(0)
    weight, target = torch.nn.Parameter(torch.zeros(64, 32)), torch.randn(64, 32)
    optimizer = build_optimizer(OptimizerConfig(name="adafactor", lr=1e-2, weight_decay=0.0), [weight])
    losses = _descend(optimizer, weight, target, 50)
    state = optimizer.state[weight]
    assert state["exp_avg_sq_row"].shape == (64,) and state["exp_avg_sq_col"].shape == (32,) and "exp_avg" not in state
    assert losses[-1] < 0.5 * losses[0]


def test_adafactor_on_one_flat_tensor_moves_the_weights_otherwise_than_on_each_weight():
    """Why DeepSpeed refuses it (finetune.distributed.deepspeed_checks): ZeRO hands the optimizer each process's shard of
    the weights as one flat tensor, which Adafactor neither factors nor clips weight by weight. AdamW moves them alike."""
    torch.manual_seed(0)
    weights = [torch.randn(16, 8), torch.randn(8) * 10]
    gradients = [torch.randn(16, 8), torch.randn(8) * 0.01]

    def stepped(name: str, flat: bool) -> torch.Tensor:
        values = [torch.cat([w.flatten() for w in weights])] if flat else [w.clone() for w in weights]
        parameters = [torch.nn.Parameter(v) for v in values]
        optimizer = build_optimizer(OptimizerConfig(name=name, lr=1e-2), parameters)
        grads = [torch.cat([g.flatten() for g in gradients])] if flat else gradients
        for _ in range(3):
            for parameter, gradient in zip(parameters, grads):
                parameter.grad = gradient.clone()
            optimizer.step()
        return torch.cat([p.detach().flatten() for p in parameters])

    start = torch.cat([w.flatten() for w in weights])
    for name, alike in (("adamw", True), ("adafactor", False)):
        whole, flat = stepped(name, flat=False), stepped(name, flat=True)
        assert not torch.equal(whole, start)
        assert torch.allclose(whole, flat, atol=1e-6) == alike, name


def test_prodigy_finds_its_own_step_size_from_a_multiplier_of_one(capsys):
    torch.manual_seed(0)
    weight, target = torch.nn.Parameter(torch.zeros(64, 32)), torch.randn(64, 32)
    optimizer = build_optimizer(OptimizerConfig(name="prodigy", lr=1.0), [weight])
    assert capsys.readouterr().out == ""  # prodigyopt's own print is kept off the console
    optimizer = build_optimizer(OptimizerConfig(name="prodigy", lr=1.0, weight_decay=0.0), [weight])
    losses = _descend(optimizer, weight, target, 100)
    assert optimizer.param_groups[0]["d"] > 1e3 * optimizer.param_groups[0]["d0"]  # it grew the step from 1e-6
    assert losses[-1] < 0.1 * losses[0]
    # The progress bar and TensorBoard show the step it applies (d x lr), not the multiplier 1.0.
    assert step_size(optimizer) == optimizer.param_groups[0]["d"] != 1.0
    assert step_size(build_optimizer(OptimizerConfig(lr=3e-4), [weight])) == 3e-4


def test_a_step_fp16_loss_scaling_skips_does_not_advance_the_learning_rate_schedule(make_recipe, tmp_path, monkeypatch):
    """GradScaler skips an optimizer step whose gradients overflowed; the warm-up waits for it, as
    accelerate's own prepared schedulers do. (fp16 needs a GPU: the skip is simulated at step 2.)"""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from finetune.training.trainer import train

    def learning_rates(skipped_steps: set[int], name: str) -> list[float]:
        logged, finished = [], [0]
        monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append(values["train/lr"]))
        monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: finished[0] + 1 in skipped_steps))
        recipe = make_recipe(output_dir=str(tmp_path / name), train__max_steps=5, optimizer__scheduler="constant_with_warmup", optimizer__warmup_steps=4, logging__every_n_steps=1)
        train(recipe, on_step=lambda step: finished.__setitem__(0, step))
        return logged

    plain, skipping = learning_rates(set(), "plain"), learning_rates({2}, "skipping")
    assert plain[0] < plain[1] < plain[2] < plain[3]  # warming up
    assert skipping == [plain[0], plain[0], plain[1], plain[2], plain[3]]
