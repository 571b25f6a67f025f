"""Recipe settings that load but do nothing, said in one `warning:` line each when the recipe loads.

They are not errors: the shipped recipes name them, and switching a feature off for one run
(`dreambooth.prior_preservation=false` on the command line) should not mean deleting its settings.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from finetune.config import Recipe
from finetune.console import warn
from finetune.sampling.prompt_options import webui_syntax_notes

# What only prior preservation reads: the class images, how they are made and how much their loss weighs.
CLASS_SETTINGS = ("prior_loss_weight", "num_class_images", "class_generation")
CONCEPT_CLASS_SETTINGS = ("class_prompt", "class_dir")


def print_unused_settings(raw: dict[str, Any], recipe: Recipe) -> None:
    """Print a warning line for each group of settings that `raw` gives and `recipe` will not use."""
    for line in unused_settings(raw, recipe):
        _warn(line)


def print_empty_recipe(path) -> None:
    """An empty recipe with overrides: every setting not on the command line is its default, which may surprise."""
    _warn(f"recipe {path} is empty (or only comments): every setting not given on the command line is its default")


def _warn(line: str) -> None:
    warn(line, file=sys.stderr)  # said as the recipe loads, before training's lines on stdout


def unused_settings(raw: dict[str, Any], recipe: Recipe) -> list[str]:
    """One line per group of given settings that do nothing with the recipe's other settings."""
    return _dreambooth_unused(raw, recipe) + _switched_off(recipe) + _webui_prompt_syntax(recipe) + _subject_never_sampled(recipe)


def _webui_prompt_syntax(recipe: Recipe) -> list[str]:
    """The webui's "(words:1.3)" weighting and "<lora:name:0.8>" tags in validation prompts: read as words."""
    validation = recipe.validation
    return [f"validation.prompts: {note}" for note in webui_syntax_notes([validation.prompt_settings(text) for text in validation.all_prompts])]


def _switched_off(recipe: Recipe) -> list[str]:
    """Settings of a feature whose switch is off: bucket sizes without bucketing, sampling without prompts."""
    lines = []
    unused = [f"data.bucketing.{key}" for key in recipe.data.bucketing.changed(("step", "min_side", "max_side"))]
    if unused and not recipe.data.bucketing.enabled:
        lines.append(f"{', '.join(unused)} {'do' if len(unused) > 1 else 'does'} nothing with bucketing off: set data.bucketing.enabled: true to use them")
    own = getattr(recipe, recipe.method) if recipe.method in ("lora", "full", "dreambooth") else None
    if recipe.train.cache_text_embeddings and own is not None and own.train_text_encoder:
        lines.append(f"train.cache_text_embeddings does nothing while the text encoder trains ({recipe.method}.train_text_encoder): "
                     "its embeddings change at every step and are encoded anew: set cache_text_embeddings: false")  # fmt: skip
    validation = recipe.validation
    if not validation.all_prompts and not recipe.samples_unset_prompts:  # prompts: null samples the training captions
        keys = ("num_inference_steps", "guidance_scale", "negative_prompt", "images_per_prompt", "seed", "sampler")
        if recipe.method != "vae" and not validation.loss_images:  # the VAE's grids and the held-out loss are due on these too
            keys += ("every_n_steps", "every_n_epochs", "at_start")
        unused = [f"validation.{key}" for key in validation.changed(keys)]
        if unused:
            lines.append(f"{', '.join(unused)} {'do' if len(unused) > 1 else 'does'} nothing without validation.prompts (nothing is sampled): "
                         "add prompts to sample them")  # fmt: skip
    return lines


def _dreambooth_unused(raw: dict[str, Any], recipe: Recipe) -> list[str]:
    section = raw.get("dreambooth")
    if recipe.method != "dreambooth" or not isinstance(section, dict):
        return []
    lines = []
    concepts = [c for c in section.get("concepts") or [] if isinstance(c, dict)]
    if not recipe.dreambooth.prior_preservation:  # a null is no setting of the user's (the shipped class_dir: null)
        unused = [f"dreambooth.{key}" for key in CLASS_SETTINGS if section.get(key) is not None]
        unused += [f"dreambooth.concepts.{i}.{key}" for i, c in enumerate(concepts) for key in CONCEPT_CLASS_SETTINGS if c.get(key) is not None]
        if unused:
            lines.append(f"dreambooth.prior_preservation is false, so {', '.join(unused)} {'do' if len(unused) > 1 else 'does'} nothing "
                         "(no class images are made or trained): set prior_preservation: true to use them")  # fmt: skip
    elif recipe.dreambooth.prior_loss_weight == 0:  # the class half of every batch is encoded and predicted, then weighs nothing
        lines.append("dreambooth.prior_loss_weight is 0, so the class images are made and trained for nothing: set "
                     "dreambooth.prior_preservation: false to go without them, or a weight above 0 (1.0 in the DreamBooth paper)")  # fmt: skip
    captioned = [f"dreambooth.concepts.{i}.instance_prompt" for i, c in enumerate(concepts) if c.get("use_captions") is True and c.get("instance_prompt")]
    if captioned:
        lines.append(f"{', '.join(captioned)} {'are' if len(captioned) > 1 else 'is'} unused with use_captions: true "
                     "(each image's caption is its prompt): set use_captions: false to train with it")  # fmt: skip
    return lines


def _subject_never_sampled(recipe: Recipe) -> list[str]:
    """A concept whose identifier no validation prompt names: instance_prompt 'a photo of zwx cat' set on the command line
    with the recipe's prompts ('a photo of sks dog in a bucket') left as they were sampled grids that cannot show the
    subject, unsaid. The identifier is the instance prompt's words that no class prompt has (a concept without class
    prompts, or captioned per image, has none to tell)."""
    if recipe.method != "dreambooth" or not recipe.validation.all_prompts:
        return []
    prompts = [recipe.validation.prompt_settings(text).prompt for text in recipe.validation.all_prompts]
    said = set().union(*map(_words, prompts))
    listed = ", ".join(f"'{prompt}'" for prompt in prompts[:3]) + (f" and {len(prompts) - 3} more" if len(prompts) > 3 else "")
    lines = []
    for i, concept in enumerate(recipe.dreambooth.concepts):
        if concept.use_captions or not concept.instance_prompt or not concept.class_prompts:
            continue
        class_words = set().union(*map(_words, concept.class_prompts))
        identifier = [word for word in re.findall(r"[\w']+", concept.instance_prompt.lower()) if word not in class_words]
        if identifier and not said & set(identifier):
            lines.append(f"validation.prompts: none of {listed} names dreambooth.concepts.{i}'s subject ('{' '.join(identifier)}', the words of its "
                         f"instance_prompt that no class prompt has): the grids cannot show it; add one such as '{concept.instance_prompt}', "
                         "or set validation.prompts: null to sample the instance and class prompts")  # fmt: skip
    return lines


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w']+", text.lower()))
