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
