"""Typed recipes: every section of a recipe, its defaults and its validation (pydantic).

Every knob has a name and a default here; recipe files under `recipes/` document them for users.
Unknown keys are rejected, so a typo never silently trains the wrong thing.

- `base.py`: `Section`, what every section is;
- `data.py`: the `data:` section (folders, buckets);
- `methods.py`: the sections of the methods (`lora:`, `full:`, `vae:`, `dreambooth:`, `controlnet:`);
- `training.py`: the `train:` and `optimizer:` sections;
- `validation.py`: the `validation:` section (its grids' prompts, how and when they are drawn);
- `recipe.py`: the other sections and `Recipe`, which checks that the sections fit together.

Around the schema: `recipe_loading.py` reads a YAML file and `key=value` overrides, `recipe_keys.py` turns a validation
error into one line naming the key, `recipe_paths.py` asks about a relative data path that names two folders,
`recipe_warnings.py` says the settings that load but do nothing, and `run_recipe.py` keeps the recipe as run.
"""

from finetune.config.base import Section
from finetune.config.data import BucketConfig, DataConfig, FolderConfig, LossMaskConfig
from finetune.config.methods import ClassImageGeneration, Concept, ControlNetConfig, DreamBoothConfig, FullConfig, LoRAConfig, VAEConfig
from finetune.config.recipe import SINGLE_FILE_SUFFIXES, CheckpointConfig, LoggingConfig, ModelConfig, Recipe, WandBConfig
from finetune.config.training import OptimizerConfig, TrainConfig
from finetune.config.validation import ValidationConfig

__all__ = [
    "SINGLE_FILE_SUFFIXES", "BucketConfig", "CheckpointConfig", "ClassImageGeneration", "Concept", "ControlNetConfig", "DataConfig", "DreamBoothConfig",
    "FolderConfig", "FullConfig", "LoRAConfig", "LoggingConfig", "LossMaskConfig", "ModelConfig", "OptimizerConfig", "Recipe", "Section",
    "TrainConfig", "VAEConfig", "ValidationConfig", "WandBConfig",
]  # fmt: skip
