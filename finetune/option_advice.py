"""What an option that is no option of `finetune train` or `check-data` most likely means (`--max_train_steps 100`,
`--gradient_checkpointing`, as diffusers' and sd-scripts' scripts take their settings): the recipe override to give instead."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


# Options of diffusers' scripts that finetune needs no setting for: what to say instead of a key.
NOT_NEEDED = {
    "enable_xformers_memory_efficient_attention": "finetune's attention already runs through PyTorch's scaled-dot-product attention (SDPA), "
                                                  "which does what xformers did: leave the option out",
}  # fmt: skip


def override_for(option: list[str], method: str | None) -> str:
    """How to give an option that is no option of the command (`--max_steps 3`, `--learning_rate=1e-4`) as the
    recipe override it most likely means, its value kept. A switch (`--gradient_checkpointing`, store_true in diffusers'
    scripts) takes no value, so the next item is not its value and the override is key=true. A key several sections
    have (train_text_encoder) is the recipe's method's."""
    from finetune.recipe_loading import OTHER_TRAINERS_NAMES, recipe_key_named

    name, equals, value = option[0].removeprefix("--").partition("=")
    name = name.replace("-", "_")
    if name in NOT_NEEDED:
        return NOT_NEEDED[name]
    setting = re.fullmatch(r"([a-z0-9_.]+): ([a-z0-9_]+)", OTHER_TRAINERS_NAMES.get(name, ""))  # use_8bit_adam: optimizer.name: adamw8bit
    if setting is not None:
        return f"recipe keys are given as key=value after the recipe: {setting[1]}={setting[2]}"
    key = recipe_key_named(name) or (recipe_key_named(f"{method}.{name}") if method else None)
    if key is not None and _is_switch(key):
        switched_on = not equals or value.lower() == "true"
        # the shipped recipes cache text embeddings, which a trained text encoder cannot use (a warning says so)
        also = " train.cache_text_embeddings=false" if switched_on and name == "train_text_encoder" else ""
        return f"recipe keys are given as key=value after the recipe: {key}={value if equals else 'true'}{also}"
    if not equals:
        value = option[1] if option[1:] and not option[1].startswith("-") else "VALUE"
    if key is not None:
        return f"recipe keys are given as key=value after the recipe: {key}={value}"
    return "recipe keys are given as key=value after the recipe (train.max_steps=100); -h lists the command's options"


def _is_switch(key: str) -> bool:
    """Whether the recipe key (dotted; a list entry's index, as in dreambooth.concepts.0.instance_dir, skipped) takes
    true or false."""
    from finetune.recipe_loading import _annotation_at

    return _annotation_at(key.split(".")) is bool


def recipe_method(args: argparse.Namespace, extra: list[str]) -> str | None:
    """The method the command's recipe and overrides name (a recipe without `method:` is lora's), or None where the recipe
    cannot be read: which section's train_text_encoder an option means. Errors in the recipe are load_recipe's to say."""
    import yaml

    for override in reversed([*args.overrides, *extra]):
        key, equals, value = override.partition("=")
        if equals and key.strip() == "method":
            return value.strip()
    if not getattr(args, "recipe", None):  # check-data without a recipe: the defaults
        return "lora"
    try:
        raw = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    method = raw.get("method", "lora") if isinstance(raw, dict) else None
    return method if isinstance(method, str) else None
