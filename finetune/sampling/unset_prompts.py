"""What the validation grids sample where `validation.prompts` is left unset (null): prompts about what trains.

A recipe's example prompts ("a photo of a cat sitting on a windowsill") show nothing of a creator's images, and
diffusers' example scripts and sd-scripts sample only the prompts they are given. Unset, a LoRA or full fine-tune
samples the first few distinct captions of its training set, as they are written (neither shuffled nor dropped: the
caption a held-out image is scored with), and a DreamBooth run its concepts' instance prompts and, with prior
preservation, each concept's first class prompt (the subject, and the class the prior keeps). A ControlNet samples its
first pairs' captions, each with its own conditioning image (as SimpleTuner validates from dataset images), each pair once:
its rows differ by their conditioning images, one caption for every image (data.caption) too. Known once the data is
checked; said in one line at the run's start and by `finetune check-data`. Captions kept out of shared files
(checkpoint.record_caption_tags: false) are not sampled: a grid's labels show its prompts (SimpleTuner's validation from
dataset images warns of the same).
"""

from __future__ import annotations

from pathlib import Path

CAPTION_PROMPTS = 2  # the grid's rows taken from captions: as many prompts as the shipped LoRA recipe listed before
METHODS = ("lora", "full", "dreambooth", "controlnet")  # those whose grids draw prompts (vae's draws none)


def dreambooth_prompts(recipe) -> list[str]:
    """Each concept's instance prompt (one captioned per image has none), then with prior preservation its first class prompt."""
    prompts = []
    for concept in recipe.dreambooth.concepts:
        own = [concept.instance_prompt] if concept.instance_prompt and not concept.use_captions else []
        prior = concept.class_prompts[:1] if recipe.dreambooth.prior_preservation else []
        prompts += [text for text in own + prior if _reads_as_a_prompt(text) and text not in prompts]
    return prompts


def unset_prompt_rows(recipe) -> int:
    """At most how many rows the unset prompts give the grid, known as the recipe loads (its bound on the grid's size)."""
    if recipe.method == "dreambooth":
        return len(dreambooth_prompts(recipe)) or CAPTION_PROMPTS
    return CAPTION_PROMPTS


def unset_prompts(recipe, items) -> list[str]:
    """The prompts `validation.prompts: null` stands for, given the checked training items (`training_items()`)."""
    if recipe.method == "dreambooth" and (prompts := dreambooth_prompts(recipe)):
        return prompts
    return [caption for _, caption in _caption_picks(recipe, items)]


def unset_prompt_items(recipe, items) -> list[int]:
    """The indices into `items` of those whose captions `unset_prompts` gives, in its order: a ControlNet's grid pairs
    each with its own conditioning image."""
    return [index for index, _ in _caption_picks(recipe, items)]


def _caption_picks(recipe, items) -> list[tuple[int, str]]:
    """(index into `items`, caption) of the first CAPTION_PROMPTS items whose captions read as prompts, each caption once
    (a ControlNet's: each pair once); none where the captions are kept out of shared files."""
    if not recipe.checkpoint.record_caption_tags:  # captions kept out of shared files: a grid's labels (the model card's copy) would show them
        return []
    from finetune.captions.captions import scored_caption  # not at the top: finetune.config imports this module, and captions imports it

    picks, seen = [], set()
    for index, item in enumerate(items):
        caption = scored_caption(item.caption, recipe.data, recipe.seed, index) if item.caption else ""
        key = item.source if recipe.method == "controlnet" else caption  # data.folders repeats list a pair several times in a row
        if caption.strip() and _reads_as_a_prompt(caption) and key not in seen:
            picks.append((index, caption))
            seen.add(key)
            if len(picks) == CAPTION_PROMPTS:
                break
    return picks


def unset_prompts_line(recipe, prompts: list[str], items) -> str:
    """The run's line at its start saying what the grids sample in place of validation.prompts (`unset_prompts` of `items`)."""
    shown = ", ".join(f"'{_shortened(text)}'" for text in prompts)
    if not prompts and not recipe.checkpoint.record_caption_tags:
        return ("validation prompts: none (validation.prompts unset, and checkpoint.record_caption_tags: false keeps the captions out of shared "
                "files, which a grid's labels would show): no grid is sampled; list validation.prompts to sample one")  # fmt: skip
    if not prompts:
        return ("validation prompts: none (validation.prompts unset, and the training set has no captions): no grid is sampled; "
                "list validation.prompts to sample one")  # fmt: skip
    if recipe.method == "dreambooth" and prompts == dreambooth_prompts(recipe):
        return f"validation prompts: the instance and class prompts of dreambooth.concepts (validation.prompts unset): {shown}"
    count = f"{len(prompts)} caption{'s' if len(prompts) > 1 else ''}"
    if recipe.method == "controlnet":
        pairs = [_pair_name(items[index].source) for index in unset_prompt_items(recipe, items)]
        shown = ", ".join(f"'{_shortened(text)}' ({pair})" for text, pair in zip(prompts, pairs))
        return f"validation prompts: {count} of the training set, each with its image's conditioning image (validation.prompts unset): {shown}"
    return f"validation prompts: {count} of the training set (validation.prompts unset): {shown}"


def fill_unset_prompts(recipe, items) -> str | None:
    """Give `recipe.validation` the prompts its unset `prompts` stand for; the line saying so, or None where they were set."""
    if recipe.method not in METHODS or not recipe.validation.prompts_unset:
        return None
    prompts = unset_prompts(recipe, items)
    recipe.validation.fill_unset_prompts(prompts)
    return unset_prompts_line(recipe, prompts, items)


def _reads_as_a_prompt(text: str) -> bool:
    # " --" starts one of sd-scripts' options in a validation prompt ("--n blurry"): a caption holding it would not sample as written.
    return " --" not in f" {text}"


def _pair_name(source: str) -> str:
    """A pair by its image: the file's name, or a dataset's row ("row 3")."""
    from finetune.captions.captions import dataset_of_row

    return f"row {source.rpartition(' row ')[2]}" if dataset_of_row(source) is not None else Path(source).name


def _shortened(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
