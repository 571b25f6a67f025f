"""What an optimizer step logs of its loss: each term's mean over all of the step's micro-batches (gradient
accumulation) and processes, weighted by rows as the gradients are.

The loss and its terms (DreamBooth's instance and class losses, the VAE's l1, l2, kl) cover the same images:
a term taken from the last micro-batch alone would not add up to the loss logged beside it.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator


class StepLosses:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, losses: dict[str, torch.Tensor], weight: float) -> None:
        """One micro-batch's terms, each weighted by `weight` (its share of the step's rows on this process)."""
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float() * weight

    def reduced(self, accelerator: Accelerator, names: list[str]) -> dict[str, float]:
        """Collective: the terms `names`, averaged over the processes."""
        if not names:
            return {}
        values = accelerator.reduce(torch.stack([self.sums[name] for name in names]), reduction="mean")
        return dict(zip(names, values.tolist()))

    def loss(self, accelerator: Accelerator) -> float:
        return self.reduced(accelerator, ["loss"])["loss"]

    def terms(self, accelerator: Accelerator) -> dict[str, float]:
        """Collective: every term but the loss."""
        return self.reduced(accelerator, [name for name in self.sums if name != "loss"])

    def clear(self) -> None:
        self.sums.clear()
