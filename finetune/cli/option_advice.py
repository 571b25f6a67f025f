"""What an option that is no option of `finetune train` or `check-data` most likely means (`--max_train_steps 100`,
`--gradient_checkpointing`, as diffusers' and sd-scripts' scripts take their settings): the recipe override to give instead."""

from __future__ import annotations

import argparse
import difflib
import re
import shlex
from pathlib import Path


# Options of diffusers' scripts that finetune needs no setting for: what to say instead of a key.
NOT_NEEDED = {
    "enable_xformers_memory_efficient_attention": "finetune's attention already runs through PyTorch's scaled-dot-product attention (SDPA), "
                                                  "which does what xformers did: leave the option out",
}  # fmt: skip


ADVICE = "recipe keys are given as key=value after the recipe"

# `accelerate launch`'s options that are no recipe key (train.mixed_precision and gradient_accumulation_steps are), typed after
# the command they launch (`accelerate launch -m finetune train RECIPE --num_processes 2`), where accelerate hands them to it:
# whether each takes a value.
ACCELERATE_LAUNCH_OPTIONS = {
    "multi_gpu": False, "cpu": False, "use_deepspeed": False, "quiet": False, "num_processes": True, "num_machines": True,
    "machine_rank": True, "main_process_ip": True, "main_process_port": True, "config_file": True, "deepspeed_config_file": True,
    "dynamo_backend": True, "gpu_ids": True, "zero_stage": True,
}  # fmt: skip


# What --report_to (--log_with) TRACKER turns on here.
TRACKER_SWITCHES = {"tensorboard": "logging.tensorboard=true", "wandb": "logging.wandb.enabled=true",
                    "all": "logging.tensorboard=true logging.wandb.enabled=true"}  # fmt: skip


def override_for(options: list[str], method: str | None, command: str = "train") -> str:
    """How to give the options that are no options of the command (`--max_steps 3 --learning_rate=1e-4`, the first of
    them first in `options`) as the recipe overrides they most likely mean, all in one line: a command copied from
    sd-scripts has several, and one said at a time took a try each. A key several sections have (train_text_encoder) is
    the recipe's method's. `accelerate launch`'s own options (`--num_processes 2`) are said to go before `-m finetune`
    (for `command` train; check-data runs in one process)."""
    overrides, unknown, notes, launch = [], [], [], []
    for start in (index for index, item in enumerate(options) if item.startswith("--")):
        name = _name(options[start])
        if name in NOT_NEEDED:
            notes.append(NOT_NEEDED[name])
        elif name in ACCELERATE_LAUNCH_OPTIONS:
            takes_value = ACCELERATE_LAUNCH_OPTIONS[name] and "=" not in options[start] and options[start + 1:] and not options[start + 1].startswith("-")
            launch.append(shlex.join(options[start:start + 2] if takes_value else options[start:start + 1]))
        elif (override := _override(options[start:], method)) is not None:
            overrides.append(override)
        elif (instead := _said_otherwise(name)) is not None:
            notes.append(instead)
        else:
            unknown.append(options[start].partition("=")[0])
    said = [f"{ADVICE}: {' '.join(overrides)}"] if overrides else []
    if unknown and said:
        said.append(f"{' and '.join(unknown)} {'names no key' if len(unknown) == 1 else 'name none'}: -h lists the command's options")
    elif unknown:
        said.append(f"{ADVICE} (train.max_steps=100); -h lists the command's options")
    if launch:
        them = "it" if len(launch) == 1 else "them"
        where = f"give {them} before -m finetune" if command == "train" else f"{command} runs in one process, leave {them} out; training takes {them}"
        notes.append(f"{' '.join(launch)} {'is' if len(launch) == 1 else 'are'} accelerate launch's: {where} "
                     f"(accelerate launch {' '.join(launch)} -m finetune train RECIPE)")
    return "; ".join(said + notes)


def _said_otherwise(name: str) -> str | None:
    """What another trainer's option that no single override gives is here (recipe_keys.OTHER_TRAINERS_NAMES: sd-scripts'
    --v2, --logging_dir, --optimizer_args), as a recipe error names it; None for a name it does not know. Such options were
    told the generic 'key=value (train.max_steps=100)', as if no key were known."""
    from finetune.config.recipe_keys import OTHER_TRAINERS_NAMES

    meant = OTHER_TRAINERS_NAMES.get(name)
    if meant is None:
        return None
    if meant.startswith("none: "):
        return f"--{name} needs no setting here: {meant.removeprefix('none: ')}; leave it out"
    return f"--{name}: here it is {meant}"


def _name(option: str) -> str:
    """An option's name as a recipe key spells it: --learning-rate=1e-4 is learning_rate."""
    return option.removeprefix("--").partition("=")[0].replace("-", "_")


def _override(option: list[str], method: str | None) -> str | None:
    """The override one option (`option[0]`, the items after it following) most likely means, its value kept, quoted as a
    shell needs it (a folder with spaces), or None. A switch (`--gradient_checkpointing`, store_true in diffusers' scripts)
    takes no value, so the next item is not its value and the override is key=true."""
    from finetune.config.recipe_keys import OTHER_TRAINERS_NAMES, choice_meant, recipe_key_named

    name, (_, equals, value) = _name(option[0]), option[0].partition("=")
    if name in ("report_to", "log_with"):  # diffusers' --report_to wandb: the tracker is its value, each one a switch here
        value = value if equals else option[1] if option[1:] and not option[1].startswith("-") else ""
        return TRACKER_SWITCHES.get(value.lower())  # another tracker (comet_ml): said as the recipe key names it
    setting = re.fullmatch(r"([a-z0-9_.]+): ([a-z0-9_.]+)", OTHER_TRAINERS_NAMES.get(name, ""))  # use_8bit_adam: optimizer.name: adamw8bit; use_ema
    if setting is not None:
        return f"{setting[1]}={setting[2]}"
    key = recipe_key_named(name) or (recipe_key_named(f"{method}.{name}") if method else None)
    if key is None:
        return None
    if _is_switch(key):
        switched_on = not equals or value.lower() == "true"
        # the shipped recipes cache text embeddings, which a trained text encoder cannot use (a warning says so)
        also = " train.cache_text_embeddings=false" if switched_on and name == "train_text_encoder" else ""
        return f"{key}={value if equals else 'true'}{also}"
    if not equals:
        value = option[1] if option[1:] and not option[1].startswith("-") else "VALUE"
    if key == "data.resolution" and (sides := re.fullmatch(r"(\d+),(\d+)", value)) and sides[1] == sides[2]:
        value = sides[1]  # sd-scripts' --resolution 512,512 (width,height): a square's side is one number here
    value = choice_meant(key.split("."), value) or value  # sd-scripts' --optimizer_type AdamW8bit: adamw8bit
    return shlex.quote(f"{key}={value}")


# diffusers' pipelines' and scripts' names for the options of `sample`, `eval`, `merge` and the demo (as a creator types them
# from habit), where the option's own name with hyphens is not the one.
OTHER_SCRIPTS_OPTIONS = {
    "num_inference_steps": "--steps", "guidance_scale": "--guidance", "cfg": "--guidance", "cfg_scale": "--guidance",
    "num_images_per_prompt": "--num-images", "output_dir": "--out", "outdir": "--out", "pretrained_model_name_or_path": "--base",
    "height": "--resolution", "width": "--resolution", "H": "--resolution", "W": "--resolution", "ckpt": "--base",
}  # fmt: skip


def options_meant(command: argparse.ArgumentParser, extra: list[str]) -> str:
    """For options the command does not know (`sample --num_images 2 --guidance_scale 5`), and a path given without its
    option (`sample outputs/lora`): the command's options they most likely mean, as `: did you mean --num-images for
    --num_images, ...?`, or "" where none is near."""
    options = [option for action in command._actions for option in action.option_strings if option.startswith("--")]
    # `sample outputs/lora`: an adapter given without its option
    paths = [item for item in extra if not item.startswith("-") and "--lora" in options and Path(item).exists()]
    meant = []
    for item in (item for item in extra if item.startswith("--")):
        typed = item.partition("=")[0]
        hyphenated = typed.replace("_", "-")
        guess = OTHER_SCRIPTS_OPTIONS.get(typed[2:]) or (hyphenated if hyphenated in options else None)
        guess = guess or next(iter(difflib.get_close_matches(hyphenated, options, n=1, cutoff=0.75)), None)
        if guess in options:
            meant.append(f"{guess} for {typed}")
    said = [f"did you mean {', '.join(meant)}?"] if meant else []
    said += [f"give {path} with its option: --lora for a LoRA (file or run folder), --controlnet for a ControlNet" for path in paths]
    return f": {'; '.join(said)}" if said else ""


def spaced_override(overrides: list[str]) -> str | None:
    """What to write for an override typed with a space beside its `=` (`data.image_dir = photos`, `lr= 1e-4`), which the
    shell passes as two or three items, each an override of its own ("'data.image_dir' must look like key=value"), or None."""
    for index, (item, following) in enumerate(zip(overrides, overrides[1:])):
        if following == "=":  # key = value
            parts = overrides[index : index + 3]
        elif "=" not in item and following.startswith("="):  # key =value
            parts = [item, following]
        elif item.endswith("=") and item.count("=") == 1 and "=" not in following:  # key= value (key= alone, then key=value: an empty value)
            parts = [item, following]
        else:
            continue
        key, _, value = "".join(parts).partition("=")
        if key and value:
            return f"override '{' '.join(parts)}' has a space beside its '=', so the shell splits it: write {shlex.quote(f'{key}={value}')}"
    return None


def _is_switch(key: str) -> bool:
    """Whether the recipe key (dotted; a list entry's index, as in dreambooth.concepts.0.instance_dir, skipped) takes
    true or false."""
    from finetune.config.recipe_loading import _annotation_at

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
