"""What a training run reads: its data folders and its base model. `finetune train` checks they are there before
torch and diffusers load (seconds), so a mistyped path is said at once; `train()` checks them again, with the
images themselves, for callers that do not come through the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from finetune.config import DataConfig, FolderConfig, LossMaskConfig, Recipe
from finetune.config.training import timestep_range_problem
from finetune.data.epoch_uses import expand_together
from finetune.data.sources import check_folders_exist, folder_images, refuse_a_folder_without_images
from finetune.data_check.class_folders_inside import RUNS_OWN
from finetune.dreambooth.class_image_plans import checked_own_class_images, class_folder, own_class_images
from finetune.errors import FinetuneError
from finetune.models.base_folder import read_config
from finetune.models.model_source import BaseLocation, locate_base, location_of


def data_configs(recipe: Recipe) -> list[DataConfig]:
    """What training reads: `data`, or for DreamBooth each concept's folder with its prompt."""
    if recipe.method == "vae":  # it trains on the images alone: their captions are not read, and an uncaptioned image is no error
        return [recipe.data.model_copy(update={"caption": ""})]
    if recipe.method != "dreambooth":
        return [recipe.data]
    configs, settings = [], recipe.dreambooth
    class_dirs = tuple((f"dreambooth.concepts.{index}.class_dir" if concept.class_dir else RUNS_OWN, str(class_folder(recipe, index)))
                       for index, concept in enumerate(settings.concepts if settings.prior_preservation else []))
    for index, concept in enumerate(settings.concepts):
        caption = None if concept.use_captions else concept.instance_prompt
        update = {"image_dir": concept.instance_dir, "caption": caption, **({} if concept.loss_mask else {"loss_mask": LossMaskConfig()})}
        config = recipe.data.model_copy(update=update)
        config._image_dir_key = f"dreambooth.concepts.{index}.instance_dir"
        config._caption_alternative = f"set dreambooth.concepts.{index}.use_captions: false to train with its instance_prompt"
        config._repeats = concept.repeats
        config._class_dirs = class_dirs
        configs.append(config)
    return configs


def check_inputs_exist(recipe: Recipe) -> BaseLocation:
    """The recipe's data folders are there and hold images, and its base model is there (a hub id: its configs, from the cache or downloaded now;
    its weights download as it loads, after the data check); returns where the base is, for `train()` to load it
    from without looking it up again."""
    for config in data_configs(recipe):
        if config.image_dir:  # a `datasets` dataset is opened by the data check
            check_folders_hold_images(config)
    located = locate_base(recipe.model)
    check_timesteps(recipe, located)
    return located


# method vae's perceptual term's classifier where vae.perceptual_network names none.
SHIPPED_PERCEPTUAL_NETWORK = Path(__file__).resolve().parents[1] / "assets" / "toyworld_perceptual.safetensors"


def perceptual_network_file(recipe: Recipe) -> Path | None:
    """The classifier file of method vae's perceptual term, where vae.perceptual_weight turns it on; a folder or a file that
    is not there is one line. No torch: `finetune train` says it before its data check decodes every image."""
    settings = recipe.vae
    if not settings.perceptual_weight:
        return None
    path = Path(settings.perceptual_network) if settings.perceptual_network else SHIPPED_PERCEPTUAL_NETWORK
    if path.is_dir():
        raise FinetuneError(f"vae.perceptual_network {path} is a folder: give the classifier's .safetensors file")
    if not path.is_file():
        raise FinetuneError(f"vae.perceptual_network {path} not found: train one with python -m finetune.toyworld.classifier --seed 1 --out {path}")
    return path


def not_a_classifier(path: Path, problem: str) -> FinetuneError:
    """The refusal of a vae.perceptual_network that is no toy-world classifier file, `problem` saying why: `finetune train`
    makes it from the file's header (finetune/cli/run_refusals.py), method vae as it loads the file."""
    return FinetuneError(f"vae.perceptual_network {path} is not a toy-world classifier file ({problem}): train one with python -m finetune.toyworld.classifier")


def check_data_first(recipe: Recipe, resume_from: Path | None = None) -> None:
    """The data check `train()` makes (its images decoded: a corrupt, tiny or uncaptioned one stops in one line), made by
    `finetune train` before torch and the model stack load, some 20 s; within `checks_kept` train() takes its result. A
    DreamBooth run's class images a user brought are checked too (those it generates are checked once made). Then whether
    the images left to train (`resume_from`'s held-out ones kept out) fill one batch, as train() refuses it once torch,
    accelerate and diffusers have loaded. The images' results (a ControlNet's conditioning images', a DreamBooth run's class
    images' too) are kept in the check's record, for the next check to take those of unchanged files
    (finetune/data_check/check_record.py)."""
    from finetune.data_check.check_record import recipe_record

    if recipe.method == "controlnet":
        from finetune.controlnet.conditioning_records import data_folder_record
        from finetune.controlnet.pairs import checked_pairs

        data_folder_record(recipe.data)  # a record make-conditions could not have written: before the images are decoded, as train() says it
        record = recipe_record(recipe, make_folder=True)  # the pairs' files unchanged since the last check are not decoded again
        pairs, report = checked_pairs(recipe, record)
        record.save()  # once it passed: a run that fails its check leaves no record in a new output_dir (the lock removes that)
        check_batches_filled(recipe, [pair.image for pair in pairs], [report], resume_from)
        return
    if recipe.method == "vae":
        perceptual_network_file(recipe)  # as VAEMethod.check_data says it: before the images are read
    from finetune.data_check.check import checked_report

    record = recipe_record(recipe, make_folder=True)  # the images unchanged since the last check are not decoded again
    reports = [checked_report(config, record) for config in data_configs(recipe)]
    if recipe.method == "dreambooth" and recipe.dreambooth.prior_preservation:
        for index in range(len(recipe.dreambooth.concepts)):
            folder = class_folder(recipe, index)
            checked_own_class_images(recipe, index, folder, own_class_images(folder, recipe.dreambooth.num_class_images), record)
    record.save()  # once it passed: a run that fails its check leaves no record in a new output_dir (the lock removes that)
    items = [example for examples in expand_together([report.usable for report in reports]) for example in examples]  # as the methods list them
    check_batches_filled(recipe, items, reports, resume_from)


def check_batches_filled(recipe: Recipe, items: list, reports: list, resume_from: Path | None) -> None:
    """train()'s refusal of too few images to fill one global batch (or of a DreamBooth concept held out whole), from the
    data check's items (repeats counted) as the method lists them, with the images validation.loss_images holds out (a
    resume's: its checkpoint's) and the launch's processes."""
    from finetune.data.buckets import too_few_to_batch
    from finetune.distributed.process_env import launched_processes
    from finetune.training.held_out import concept_held_out_whole, held_out_for_run, held_out_sources

    trained = held_out_for_run(items, recipe.validation.loss_images, recipe.seed, resume_from).trained
    sources = [item.source for item in items]
    short = too_few_to_batch(len(trained), recipe, launched_processes(), len(sources))
    if short := short or concept_held_out_whole(reports, held_out_sources(sources, trained), recipe):
        raise FinetuneError(short)


def check_folders_hold_images(config: DataConfig) -> None:
    """`check_folders_exist`, and each folder holds images training reads: `finetune train` says an empty one before torch
    loads, as reading the examples says it (`refuse_a_folder_without_images`)."""
    check_folders_exist(config)
    for settings in config.folders or [FolderConfig(path=".")]:
        if not folder_images(Path(config.image_dir) / settings.path):
            refuse_a_folder_without_images(Path(config.image_dir) / settings.path, config, settings)


def check_base_and_data(recipe: Recipe, check_data: Callable[[], None], base: BaseLocation | None = None) -> BaseLocation:
    """`train()`'s checks of what it reads, cheapest first: the base's files (a local one's configs and weights'
    headers, a hub id's configs alone) take a moment and the data check decodes every image (minutes for a large set),
    so a typo in model.pretrained is said first; a hub id's weights download as the base loads, after the data check.
    `base`: the command's lookup of the base (a hub id's costs a cache search or a request each time), used as it is;
    returns the base's location."""
    located = location_of(recipe.model, base)
    check_timesteps(recipe, located)
    check_data()
    return located


def check_timesteps(recipe: Recipe, located: BaseLocation) -> None:
    """train.min_timestep and max_timestep against the base's training timesteps, from its scheduler config (a local folder's, a
    hub id's fetched configs, a single file's local model.single_file_config): it was refused once the base had loaded, after the
    data check. A single file without configs is read with diffusers' own for SD1.x or SD2.x, each of 1000 timesteps; with a hub
    id's configs, loading says it."""
    if not (recipe.train.min_timestep or recipe.train.max_timestep is not None):
        return
    configs = recipe.model.single_file_config
    folder = located.folder or (Path(configs).expanduser() if configs and Path(configs).expanduser().is_dir() else None)
    scheduler = folder / "scheduler" / "scheduler_config.json" if folder else None
    if scheduler is not None and scheduler.is_file():
        timesteps = read_config(scheduler, recipe.model.pretrained).get("num_train_timesteps", 1000)  # diffusers' default
    elif located.folder is None and not configs:
        timesteps = 1000
    else:
        return
    if isinstance(timesteps, int) and (problem := timestep_range_problem(recipe.train, timesteps)):
        raise FinetuneError(problem)
