"""The recipe schema's keys as a recipe writes them (`train.max_steps`), and pydantic's validation errors turned into one
line that names the key and what to do: the closest valid key for a typo, the section a key belongs to, the name for
another trainer's setting (sd-scripts' `learning_rate`: `optimizer.lr`). Loading recipes is `finetune.config.recipe_loading`."""

from __future__ import annotations

import datetime
import difflib
import re
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.config import Recipe


def describe_validation_error(err: ValidationError) -> str:
    """Turn pydantic's report into one line: the dotted key, what is wrong, and what to do."""
    first = err.errors()[0]
    location = [str(part) for part in first["loc"] if not isinstance(part, int)]  # the schema's names
    path = [str(part) for part in first["loc"]]  # with list indexes, as the user writes overrides
    dotted = ".".join(path)
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(location[:-1])
        close = difflib.get_close_matches(location[-1], valid, n=1, cutoff=0.5)
        listed = _list_taking(location[:-1], location[-1])
        if OTHER_TRAINERS_NAMES.get(location[-1], "").startswith("none: "):  # a setting this trainer needs no key for (sd-scripts' v2)
            hint = f" (none is needed here: {OTHER_TRAINERS_NAMES[location[-1]].removeprefix('none: ')})"
        elif location[-1] in OTHER_TRAINERS_NAMES:
            hint = f" (here it is '{OTHER_TRAINERS_NAMES[location[-1]]}')"
        elif listed:  # dreambooth.class_prompt, as diffusers' script has it: each concept has its own
            hint = f" (each entry of '{'.'.join(path[:-1] + [listed])}' has its own: '{'.'.join(path[:-1] + [listed, '0', location[-1]])}')"
        elif location[-1] == "enabled" and location[:-1] and (section := _section_at(location[:-1])) is not None:  # a switch only data.bucketing has
            hint = f" ({'.'.join(path[:-1])} has no switch: {section.switched_by})" if section.switched_by else f" (valid keys: {', '.join(valid)})"
        elif elsewhere := [key for key in _dotted_keys(Recipe) if key.split(".")[-1] == location[-1]]:  # train.lr for optimizer.lr
            hint = f" (it belongs to another section: {', '.join(repr(key) for key in elsewhere[:-1])}{' or ' if elsewhere[1:] else ''}{elsewhere[-1]!r})"
        else:
            hint = f" (did you mean '{'.'.join(path[:-1] + close)}'?)" if close else f" (valid keys: {', '.join(valid)})"
        return f"unknown key '{dotted}'{hint}"
    if first["type"] == "missing":
        return f"missing required key '{dotted}'"
    if first["input"] is None and dotted and (first["type"].endswith("_type") or first["type"] == "literal_error"):
        # `output_dir:` with nothing after it, or `output_dir=$OUT` with OUT unset: pydantic's "Input should be a valid string (got None)"
        field = field_at(location)
        default = "" if field is None or field.is_required() else f", or leave the key out for its default ({_as_yaml(field.get_default(call_default_factory=True))})"
        return f"key '{dotted}' has no value (null, or nothing after its : or =): give it one{default}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("bool_parsing", "bool_type"):  # pydantic's "Input should be a valid boolean, unable to interpret input"
        message = "is a switch: write true or false"
    if not dotted:
        return message
    received = first.get("input")
    shown = "" if isinstance(received, dict) else f" (got {received!r})"
    if first["type"] == "list_type" and isinstance(received, str):  # `prompts: a cat` in a file, `validation.prompts=a cat` on the command line
        shown += f"; a list is written in brackets: {path[-1]}: [\"first\", \"second\"] in a recipe, {dotted}='[\"first\", \"second\"]' on the command line"
    if first["type"] == "string_type":  # `image_dir: 2024`, `caption: yes`: YAML read a number, date or boolean
        shown += _quoting_hint(received)
    if first["type"] == "literal_error" and (spelled := choice_meant(location, received)) is not None:
        shown += f"; here it is written '{spelled}'"  # sd-scripts' optimizer_type AdamW8bit, its loss_type l2
    return f"key '{dotted}': {message}{shown}"


def _quoting_hint(received: Any) -> str:
    """How to keep text that YAML read as another type: quote it."""
    if isinstance(received, bool):  # its spelling (yes, on, true) is lost
        return "; YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote the text"
    if isinstance(received, (int, float, datetime.date)):
        return f'; YAML reads it as a {"date" if isinstance(received, datetime.date) else "number"}: quote it ("{received}")'
    return ""


# sd-scripts' and diffusers' names for settings, which people type from habit.
OTHER_TRAINERS_NAMES = {
    "learning_rate": "optimizer.lr", "lr_scheduler": "optimizer.scheduler", "lr_warmup_steps": "optimizer.warmup_steps",
    "network_dim": "lora.rank", "network_alpha": "lora.alpha", "rank": "lora.rank", "max_train_steps": "train.max_steps",
    "max_train_epochs": "train.max_epochs", "train_batch_size": "train.batch_size", "output_dir": "output_dir",
    "pretrained_model_name_or_path": "model.pretrained", "train_data_dir": "data.image_dir", "caption_extension": "none: a .txt or .caption file beside each image is read as its caption, the .txt where both are",
    "save_every_n_steps": "checkpoint.every_n_steps", "save_every_n_epochs": "checkpoint.every_n_epochs", "min_snr_gamma": "train.snr_gamma",
    "enable_bucket": "data.bucketing.enabled", "shuffle_caption": "data.shuffle_tags", "caption_tag_dropout_rate": "data.tag_dropout",
    # The data section's (sd-scripts', SimpleTuner's, diffusers'): close spellings here mean other things
    # (flip_aug read as shuffle_tags, caption_prefix as data.caption, which replaces every caption).
    "caption_dropout_rate": "data.caption_dropout", "caption_dropout_probability": "data.caption_dropout", "flip_aug": "data.random_flip",
    "random_crop": "data.crop: random", "center_crop": "data.crop: center", "resolution": "data.resolution", "minimum_image_size": "data.min_image_size",
    "bucket_no_upscale": "data.bucketing.no_upscale", "min_bucket_reso": "data.bucketing.min_side", "max_bucket_reso": "data.bucketing.max_side",
    "bucket_reso_steps": "data.bucketing.step", "num_repeats": "data.folders: [{path: ., repeats: 10}]", "dataset_repeats": "data.folders: [{path: ., repeats: 10}]",
    "caption_prefix": 'data.folders: [{path: ., template: "sks, {caption}"}]', "caption_suffix": 'data.folders: [{path: ., template: "{caption}, sks"}]',
    "max_token_length": "model.max_token_length", "dataset_name": "data.dataset", "crop_style": "data.crop: center or random",
    "caption_strategy": "a .txt or .caption file beside each image, a metadata.jsonl, or data.caption", "prepend_instance_prompt": 'data.folders: [{path: ., template: "sks, {caption}"}]',
    "scale_weight_norms": "lora.max_norm", "v_parameterization": "model.prediction_type: v_prediction", "instance_data_dir": "dreambooth.concepts.0.instance_dir",
    "use_8bit_adam": "optimizer.name: adamw8bit", "with_prior_preservation": "dreambooth.prior_preservation",
    # The objective, the LoRA, the schedule, checkpoints and sampling, as sd-scripts, diffusers' scripts and SimpleTuner
    # name them (each else met "valid keys: ..." or a wrong guess: use_ema was "did you mean 'seed'?").
    "ip_noise_gamma": "train.input_perturbation", "debiased_estimation_loss": "train.debiased_estimation", "loss_type": "train.loss",
    "use_ema": "train.ema_decay: 0.999", "num_train_epochs": "train.max_epochs", "cache_text_encoder_outputs": "train.cache_text_embeddings",
    "network_module": "method: lora", "network_weights": "lora.init_from", "network_dropout": "lora.dropout", "lora_dropout": "lora.dropout",
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "conv_dim": "lora.conv_rank", "dora_wd": "lora.use_dora",
    "network_args": "lora.conv_rank, lora.conv_alpha and lora.use_dora (its conv_dim, conv_alpha and dora_wd)",
    "network_train_unet_only": "lora.train_text_encoder: false", "unet_lr": "optimizer.lr", "optimizer_type": "optimizer.name",
    "adam_weight_decay": "optimizer.weight_decay", "adam_epsilon": "optimizer.eps", "adam_beta1": "optimizer.betas: [beta1, beta2]",
    "adam_beta2": "optimizer.betas: [beta1, beta2]", "checkpointing_steps": "checkpoint.every_n_steps", "checkpoints_total_limit": "checkpoint.keep_last",
    "save_last_n_epochs": "checkpoint.keep_last", "save_last_n_steps": "checkpoint.keep_last, a count of checkpoints, not of steps",
    "save_state": "checkpoint.every_n_steps: every checkpoint holds the training state", "resume": "the command line's --resume latest",
    "sample_every_n_steps": "validation.every_n_steps", "sample_every_n_epochs": "validation.every_n_epochs", "sample_at_first": "validation.at_start",
    "validation_steps": "validation.every_n_steps", "validation_epochs": "validation.every_n_epochs", "num_validation_images": "validation.images_per_prompt",
    "sample_prompts": 'validation.prompts: ["a prompt --n its negative", ...]', "validation_prompt": 'validation.prompts: ["a prompt", ...]',
    "dataloader_num_workers": "data.num_workers", "max_data_loader_n_workers": "data.num_workers",
    "report_to": "logging.tensorboard: true, and logging.wandb.enabled: true for wandb", "log_with": "logging.tensorboard: true, and logging.wandb.enabled: true for wandb",
    "tracker_project_name": "logging.wandb.project", "tracker_run_name": "logging.wandb.run_name", "lr_scheduler_num_cycles": "optimizer.num_cycles", "lr_num_cycles": "optimizer.num_cycles",
    "optimizer_args": "optimizer.weight_decay, optimizer.betas and optimizer.eps", "reg_data_dir": "dreambooth.concepts.0.class_dir",
    "cache_latents_to_disk": "train.cache_latents with train.cache_dir", "logging_dir": "output_dir's logs/, where every run logs",
    "v2": "none: an SD2.x base is known from its configs (model.pretrained)",
}  # fmt: skip


# Other trainers' values for a choice, where more than its spelling differs (sd-scripts' loss_type l2).
OTHER_TRAINERS_CHOICES = {"train.loss": {"l2": "mse"}, "train.mixed_precision": {"fp32": "no"}}


def choice_meant(location: list[str], received: Any) -> str | None:
    """The one choice of a Literal field that `received` spells otherwise (AdamW8bit, PagedAdamW8bit: in another case, without
    its underscores), or names as another trainer does (l2 for mse); None where no choice is meant."""
    field = field_at(location)
    if field is None or not isinstance(received, str):
        return None
    if (named := OTHER_TRAINERS_CHOICES.get(".".join(location), {}).get(received.lower())) is not None:
        return named
    choices = [arg for member in (field.annotation, *typing.get_args(field.annotation)) if typing.get_origin(member) is typing.Literal
               for arg in typing.get_args(member) if isinstance(arg, str)]  # fmt: skip

    def bare(text: str) -> str:
        return re.sub(r"[\s_-]", "", text.lower())

    meant = [choice for choice in choices if bare(choice) == bare(received)]
    return meant[0] if len(meant) == 1 else None


def _valid_keys(section_path: list[str]) -> list[str]:
    model = _section_at(section_path)
    return [] if model is None else list(model.model_fields)


def _section_at(section_path: list[str]) -> type[BaseModel] | None:
    """The section class at a dotted path of section names (list indexes left out): Recipe for [], None for no section."""
    model: type[BaseModel] | None = Recipe
    for name in section_path:
        model = section_type(model.model_fields[name].annotation)
        if model is None:
            return None
    return model


def recipe_key_named(name: str) -> str | None:
    """The one recipe key `name` stands for (max_steps, another trainer's max_train_steps: train.max_steps), or None."""
    if re.fullmatch(r"[a-z0-9_.]+", OTHER_TRAINERS_NAMES.get(name, "")):  # not advice such as "a .txt beside each image"
        return OTHER_TRAINERS_NAMES[name]
    keys = _dotted_keys(Recipe)
    if name in keys:  # seed, a top-level key, not validation.seed
        return name
    named = [key for key in keys if key.split(".")[-1] == name]
    return named[0] if len(named) == 1 else None


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of `model` and its sections, as a recipe writes them (not those of list entries: concepts, folders)."""
    keys = []
    for name, field in model.model_fields.items():
        section = None if typing.get_origin(field.annotation) is list else section_type(field.annotation)
        keys += _dotted_keys(section, f"{prefix}{name}.") if section is not None else [prefix + name]
    return keys


def _as_yaml(value: Any) -> str:
    """A value as a recipe writes it (false, not Python's False)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def field_at(location: list[str]):
    """The schema's field at a dotted location (list indexes left out), or None."""
    model: type[BaseModel] | None = Recipe
    for name in location[:-1]:
        model = section_type(model.model_fields[name].annotation) if model is not None and name in model.model_fields else None
    return model.model_fields.get(location[-1]) if model is not None else None


def _list_taking(section_path: list[str], key: str) -> str | None:
    """The field of this section that lists sections taking `key` (dreambooth.concepts for class_prompt), or None."""
    model: type[BaseModel] = Recipe
    for name in section_path:
        model = section_type(model.model_fields[name].annotation)
        if model is None:
            return None
    for name, field in model.model_fields.items():
        listed = section_type(field.annotation) if typing.get_origin(field.annotation) is list else None
        if listed is not None and key in listed.model_fields:
            return name
    return None


def section_type(annotation) -> type[BaseModel] | None:
    """The section class in a field's annotation: X, Optional[X] or list[X]."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
