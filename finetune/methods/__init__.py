"""Training methods, by the name a recipe gives in `method:`."""

from finetune.methods.base import TrainingMethod
from finetune.methods.lora import LoRAMethod

METHODS: dict[str, type[TrainingMethod]] = {
    LoRAMethod.name: LoRAMethod,
}

__all__ = ["METHODS", "TrainingMethod"]
