"""What a training method is: which parameters train, how a batch becomes a loss, and what is saved.

The training loop (`finetune.trainer`) owns everything else: data, noise, precision, accumulation,
checkpoints, logging and validation. A new method is a subclass of `TrainingMethod` in its own module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from finetune.config import Recipe
from finetune.models import BaseModel


class TrainingMethod(ABC):
    name: str

    def __init__(self, recipe: Recipe, base: BaseModel, weight_dtype: torch.dtype):
        self.recipe = recipe
        self.base = base
        self.weight_dtype = weight_dtype

    @abstractmethod
    def setup(self) -> None:
        """Attach adapters, freeze what does not train, cast frozen weights to `weight_dtype`."""

    @abstractmethod
    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """The modules that hold trainable parameters, by name; the trainer wraps them with accelerate."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.trained_modules().values() for p in module.parameters() if p.requires_grad]

    @abstractmethod
    def predict(
        self,
        modules: dict[str, torch.nn.Module],
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        batch: dict,
    ) -> torch.Tensor:
        """The model's prediction (noise or velocity) for a noised batch; `modules` are the wrapped ones."""

    def combine_losses(self, per_sample_loss: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Reduce per-sample losses to {"loss": ..., other logged terms}; DreamBooth splits instance/class."""
        return {"loss": per_sample_loss.mean()}

    @abstractmethod
    def save(self, output_dir: Path, modules: dict[str, torch.nn.Module], metadata: dict[str, str]) -> list[Path]:
        """Write the method's result (unwrapped `modules`) where creators load it; return the files written."""

    @abstractmethod
    def pipeline(self, modules: dict[str, torch.nn.Module]) -> DiffusionPipeline:
        """An inference pipeline using the current (unwrapped) trained modules, for validation samples."""
