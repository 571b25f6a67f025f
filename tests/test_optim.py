import pytest
import torch

from finetune.config import OptimizerConfig
from finetune.optim import build_optimizer


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
