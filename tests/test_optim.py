import torch

from finetune.config import OptimizerConfig
from finetune.optim import build_optimizer


def test_adamw8bit_keeps_large_tensor_states_in_8_bits_and_small_ones_in_32():
    large = torch.nn.Parameter(torch.randn(128, 128))  # >= 4096 elements: quantised states
    small = torch.nn.Parameter(torch.randn(16))  # bitsandbytes keeps small tensors in fp32
    optimizer = build_optimizer(OptimizerConfig(name="adamw8bit", lr=1e-3), [large, small])
    (large.square().sum() + small.square().sum()).backward()
    before = large.detach().clone()
    optimizer.step()
    assert optimizer.state[large]["state1"].dtype == torch.uint8
    assert optimizer.state[large]["state2"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32
    assert not torch.equal(large.detach(), before)


def test_parameter_groups_keep_their_own_learning_rate():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(OptimizerConfig(lr=1e-3), [{"params": [a]}, {"params": [b], "lr": 5e-5}])
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-5]
