"""What the run reports of its loss: each optimizer step's loss (progress bar, TrainResult), and for
TensorBoard each term's mean over the steps since the last log (logging.every_n_steps), over all of their
micro-batches (gradient accumulation) and processes, weighted by rows as the gradients are.

The loss and its terms (DreamBooth's instance and class losses, the VAE's l1, l2, kl) cover the same images:
a term taken from the last micro-batch alone would not add up to the loss logged beside it. And a diffusion
loss swings with each batch's timesteps: the last step alone of every tenth would be a noisy sample of the curve.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator


class StepLosses:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}  # since the last log
        self.steps = 0  # optimizer steps in those sums
        self.step_sum: torch.Tensor | float = 0.0  # this step's loss so far

    def add(self, losses: dict[str, torch.Tensor], weight: float) -> None:
        """One micro-batch's terms, each weighted by `weight` (its share of the step's rows on this process)."""
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float() * weight
        self.step_sum = self.step_sum + losses["loss"].detach().float() * weight

    def end_step(self, accelerator: Accelerator) -> float:
        """Collective: the step's loss, averaged over the processes."""
        loss = accelerator.reduce(self.step_sum, reduction="mean").item()
        self.step_sum, self.steps = 0.0, self.steps + 1
        return loss

    def since_last_log(self, accelerator: Accelerator) -> dict[str, float]:
        """Collective: each term's mean over the steps since the last call and over the processes."""
        names = list(self.sums)
        values = accelerator.reduce(torch.stack([self.sums[name] for name in names]), reduction="mean") / self.steps
        self.sums, self.steps = {}, 0
        return dict(zip(names, values.tolist()))
