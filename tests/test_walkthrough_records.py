"""Optimizer defaults, what a checkpoint records of its training data, the cache's key, and counts in messages."""

import pytest
import torch

from finetune.config import OptimizerConfig
from finetune.optim import apply_recipe_settings, build_lr_scheduler, build_optimizer

# Each library's own defaults (bitsandbytes' Lion8bit and the Lion paper: 0.9, 0.99).
LIBRARY_BETAS = {"adamw": (0.9, 0.999), "adamw8bit": (0.9, 0.999), "paged_adamw8bit": (0.9, 0.999), "lion8bit": (0.9, 0.99), "prodigy": (0.9, 0.999)}


@pytest.mark.parametrize("name", sorted(LIBRARY_BETAS))
def test_a_recipe_without_betas_gets_the_optimizers_own(name):
    """Every optimizer was given AdamW's betas, so Lion decayed its momentum with 0.999 instead of its own 0.99."""
    weight = torch.nn.Parameter(torch.randn(64, 64))
    config = OptimizerConfig(name=name, lr=1.0 if name == "prodigy" else 1e-4)
    optimizer = build_optimizer(config, [weight])
    assert tuple(optimizer.param_groups[0]["betas"]) == LIBRARY_BETAS[name]
    # A resume applies the recipe's betas over the checkpoint's: the same ones.
    optimizer.param_groups[0]["betas"] = (0.5, 0.5)
    apply_recipe_settings(optimizer, build_lr_scheduler(config, optimizer, 10), [config.lr], config)
    assert tuple(optimizer.param_groups[0]["betas"]) == LIBRARY_BETAS[name]


def test_betas_a_recipe_names_are_used_and_the_saved_recipe_says_which_trained():
    weight = torch.nn.Parameter(torch.randn(8))
    named = build_optimizer(OptimizerConfig(name="lion8bit", betas=(0.95, 0.98)), [weight])
    assert tuple(named.param_groups[0]["betas"]) == (0.95, 0.98)
    assert OptimizerConfig(name="lion8bit").model_dump(mode="json")["betas"] == [0.9, 0.99]
    assert OptimizerConfig().model_dump(mode="json")["betas"] == [0.9, 0.999]
