"""Typed recipes: every section of a recipe, its defaults and its validation (pydantic).

Every knob has a name and a default here; recipe files under `recipes/` document them for users.
Unknown keys are rejected, so a typo never silently trains the wrong thing. Reading a YAML file,
`key=value` overrides and the one-line errors are finetune/config/recipe_loading.py.

- `base.py`: `Section`, what every section is;
- `data.py`: the `data:` section (folders, buckets);
- `methods.py`: the sections of the methods (`lora:`, `full:`, `vae:`, `dreambooth:`, `controlnet:`);
- `training.py`: the `train:` and `optimizer:` sections;
- `recipe.py`: the other sections and `Recipe`, which checks that the sections fit together.
"""

from finetune.config.base import Section
from finetune.config.data import BucketConfig, DataConfig, FolderConfig, LossMaskConfig
from finetune.config.methods import ClassImageGeneration, Concept, ControlNetConfig, DreamBoothConfig, FullConfig, LoRAConfig, VAEConfig
from finetune.config.recipe import SINGLE_FILE_SUFFIXES, CheckpointConfig, LoggingConfig, ModelConfig, Recipe, ValidationConfig
from finetune.config.training import OptimizerConfig, TrainConfig

__all__ = [
    "SINGLE_FILE_SUFFIXES", "BucketConfig", "CheckpointConfig", "ClassImageGeneration", "Concept", "ControlNetConfig", "DataConfig", "DreamBoothConfig",
    "FolderConfig", "FullConfig", "LoRAConfig", "LoggingConfig", "LossMaskConfig", "ModelConfig", "OptimizerConfig", "Recipe", "Section",
    "TrainConfig", "VAEConfig", "ValidationConfig",
]  # fmt: skip
