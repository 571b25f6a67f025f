"""A DeepSpeed config file's batch size, accumulation, clipping and precision: the recipe decides them ("auto" in the
shipped configs), and a file that sets one otherwise is one line before anything loads, not a run that silently took the
recipe's batch and accumulation, or held the model in the file's precision beside the recipe's."""

import json
from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.training.trainer import train
from test_deepspeed_checks import CONFIGS


def written(tmp_path, **settings) -> Path:
    """zero2.json with `settings` (a dict for a section: bf16={"enabled": True}) written over it, as a user's copy of it."""
    config = json.loads((CONFIGS / "zero2.json").read_text())
    config.update(settings)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    path.write_text(json.dumps(config))
    return path


def test_a_config_that_sets_what_the_recipe_decides_otherwise_is_refused_before_anything_loads(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as `accelerate launch --use_deepspeed --num_processes 2` sets them
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = make_recipe(model__pretrained=str(tmp_path / "no-such-model"), train__batch_size=2, train__gradient_accumulation_steps=3,
                         train__max_grad_norm=1.0, train__mixed_precision="no")  # fmt: skip
    refused = [
        (dict(bf16={"enabled": True}), 'bf16.enabled is true, where train.mixed_precision makes it false'),
        (dict(gradient_accumulation_steps=4), "gradient_accumulation_steps is 4, where train.gradient_accumulation_steps makes it 3"),
        (dict(train_micro_batch_size_per_gpu=1), "train_micro_batch_size_per_gpu is 1, where train.batch_size makes it 2"),
        (dict(train_batch_size=8), "train_batch_size is 8, where train.batch_size x train.gradient_accumulation_steps x 2 processes makes it 12"),
        (dict(gradient_clipping=0.5), "gradient_clipping is 0.5, where train.max_grad_norm makes it 1.0"),
    ]
    for settings, says in refused:
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path := written(tmp_path, **settings)))
        with pytest.raises(FinetuneError, match=rf'^DeepSpeed config {path}: {says}: the recipe decides it, so set it to "auto"'):
            train(recipe)
    # The same values as the recipe's, or "auto" (the shipped configs), go on to the base model (missing here).
    agreeing = dict(bf16={"enabled": False}, fp16={"enabled": "false"}, gradient_accumulation_steps=3, train_micro_batch_size_per_gpu=2,
                    train_batch_size=12, gradient_clipping=1)  # fmt: skip
    for path in (written(tmp_path, **agreeing), written(tmp_path)):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
        with pytest.raises(FinetuneError, match="no-such-model"):
            train(recipe)
