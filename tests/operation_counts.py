"""Counting the operators a piece of code dispatches: on a GPU each one not a view is a kernel launch, the cost of a
launch-bound step (docs/benchmarks-gpu.md)."""

import collections

import torch

from torch.utils._python_dispatch import TorchDispatchMode


class CountOperations(TorchDispatchMode):
    """Within `with CountOperations() as counted:`, `counted.counts[torch.ops.aten.mul]` is how many times it ran;
    `counted.kernels` counts the operators that are not views (`_unsafe_view`, a view without autograd's aliasing, among
    the views): on a GPU, the launches."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.kernels = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket] += 1
        if not func.is_view and func.overloadpacket is not torch.ops.aten._unsafe_view:
            self.kernels[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))
