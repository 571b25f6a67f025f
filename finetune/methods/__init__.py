"""Training methods, by the name a recipe gives in `method:`."""

from finetune.methods.base import TrainingMethod
from finetune.methods.controlnet import ControlNetMethod
from finetune.methods.dreambooth import DreamBoothMethod
from finetune.methods.full import FullMethod
from finetune.methods.lora import LoRAMethod
from finetune.methods.vae import VAEMethod

METHODS: dict[str, type[TrainingMethod]] = {method.name: method for method in (LoRAMethod, FullMethod, VAEMethod, DreamBoothMethod, ControlNetMethod)}

__all__ = ["METHODS", "TrainingMethod"]
