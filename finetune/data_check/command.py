"""`finetune check-data`: the report of each data source a recipe (or --image-dir) names, as training
reads them (finetune/data_check/check.py checks), and whether training would start."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from finetune.captions.captions import tag_warnings
from finetune.config import DataConfig, ModelConfig, Recipe
from finetune.config.recipe_keys import describe_validation_error
from finetune.config.recipe_loading import load_recipe, looks_like_override
from finetune.console import warnings_said
from finetune.counts import counted
from finetune.data.buckets import too_few_to_batch
from finetune.data.epoch_uses import expand_together
from finetune.data.sources import read_examples
from finetune.data_check.check import FATAL, SKIP_HINT, WARNING, DataReport, data_label, inspect_examples
from finetune.data_check.check_record import recipe_record
from finetune.data_check.train_inputs import data_configs
from finetune.errors import FinetuneError
from finetune.models.native_resolution import far_from_native_line
from finetune.sampling.unset_prompts import fill_unset_prompts
from finetune.training.held_out import concept_held_out_whole, held_out_for_check, held_out_sources
from finetune.training.wandb_checks import wandb_problem


def configs_from_args(args, recipe: Recipe | None) -> list[DataConfig]:
    if args.recipe is None and args.overrides:
        raise FinetuneError("check-data: key=value overrides need a recipe first, e.g. finetune check-data recipes/lora.yaml data.image_dir=x")
    if args.recipe is None and args.image_dir is None:
        raise FinetuneError("check-data needs a recipe or --image-dir: e.g. finetune check-data --image-dir my_photos")
    configs = data_configs(recipe) if recipe is not None else [DataConfig()]
    update = {}
    if args.image_dir is not None:
        update.update(image_dir=args.image_dir, dataset=None)
    if args.resolution is not None:
        update["resolution"] = args.resolution
    if not update:
        return configs
    revised = []
    for config in configs:
        raw = {**config.model_dump(), **update}
        try:
            revised.append(DataConfig.model_validate(raw))
        except ValidationError as err:
            message = describe_validation_error(err)
            for key, option in (("resolution", "--resolution"), ("image_dir", "--image-dir")):
                message = message.replace(f"key '{key}'", option)  # the option the user typed
            raise FinetuneError(f"check-data: {message}") from None
        revised[-1]._image_dir_key = "--image-dir" if args.image_dir is not None else config._image_dir_key
        revised[-1]._caption_alternative = config._caption_alternative
        revised[-1]._repeats = config._repeats
        revised[-1]._class_dirs = config._class_dirs
    return revised


def caption_lines(model: ModelConfig, captions: dict[str, str], shuffled: bool = False) -> list[str]:
    """The warnings training gives at its start about the captions (finetune/captions/tokens.py), given here; the
    tokens are counted where the base model's tokenizer is at hand (a diffusers folder, or the hub), else a line says so."""
    from finetune.captions.tokens import caption_warnings, load_tokenizer  # transformers: only with a recipe

    try:
        tokenizer, uncounted = load_tokenizer(model), []
    except Exception:  # not found, offline, a single file: the model's own load says what is wrong, if anything
        tokenizer = None
        uncounted = [f"captions: not counted in tokens, {model.pretrained}'s tokenizer is not at hand (training counts them once the model loads)"]
    return uncounted + [f"warning: {line}" for line in caption_warnings(tokenizer, captions, model.max_token_length, shuffled)]


def run_check_data_command(args) -> int:
    """Print the report of each data source; exit status 1 when training would stop on it."""
    fatal, warnings, said_before = 0, 0, warnings_said()
    if args.recipe and looks_like_override(args.recipe) and not Path(args.recipe).is_file():  # argparse took an override for the recipe
        args.recipe, args.overrides = None, [args.recipe, *args.overrides]
    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
    reports = []
    configs = configs_from_args(args, recipe)
    record = recipe_record(recipe, make_folder=False) if recipe is not None else None  # read where it is; written where its folder is
    for config in configs:
        if recipe is not None and recipe.method == "controlnet":
            from finetune.controlnet.pairs import inspect_pairs  # it builds on this module

            reports.append(inspect_pairs(recipe.model_copy(update={"data": config}), record)[1])
        else:
            reports.append(inspect_examples(read_examples(config), config, data_label(config), record))
    items = [example for examples in expand_together([report.usable for report in reports]) for example in examples]  # as the trainer counts
    sources = [example.source for example in items]
    # The same images a new run holds out (the split depends on the seed and the images' pixels only), or a resume of output_dir's run.
    split, resumed = held_out_for_check(items, recipe.validation.loss_images, recipe.seed, Path(recipe.output_dir)) if recipe is not None else (None, "")
    trained, held = (split.trained, split.scored) if split is not None else (range(len(sources)), [])
    held_sources = held_out_sources(sources, trained)
    class_image_lines = []  # a class folder's "none yet, N to generate", class prompts that make no class image; a ControlNet's validation conditions unlike its data
    if recipe is not None and recipe.method == "dreambooth":
        from finetune.dreambooth.class_image_plans import inspect_class_images  # a DreamBooth recipe's alone

        class_reports, class_image_lines = inspect_class_images(recipe, record)
        reports += class_reports
    if record is not None:
        record.save()
    said_once(reports)
    if recipe is not None and (problem := base_model_problem(recipe)):
        print(f"fatal: {problem}")
        fatal += 1
    elif recipe is not None and (line := far_from_native_line(configs[0].resolution, recipe.model.pretrained, recipe.model.single_file_config)):
        print(f"warning: {line}")
        warnings += 1
    if recipe is not None and (problem := wandb_problem(recipe.logging.wandb.enabled)):  # as finetune train says it, before its data check
        print(f"fatal: {problem}")
        fatal += 1
    for report in reports:
        for line in report.lines(held_out=held_sources):
            print(line)
        fatal += len(report.of_level(FATAL)) or (0 if report.usable else 1)  # all skipped: nothing to train
        warnings += len(report.of_level(WARNING))
    if recipe is not None and recipe.method == "controlnet":
        from finetune.controlnet.pairs import validation_conditions_warnings  # it builds on this module

        class_image_lines += validation_conditions_warnings(recipe)  # said beside them, as training's start says both
    for line in class_image_lines:
        print(line)
        warnings += line.startswith("warning")
    for line in split.lines if split is not None else []:  # what --resume latest says of its checkpoint's held-out images
        print(line)
        warnings += line.startswith("warning")
    if recipe is not None:
        for line in caption_lines(recipe.model, {e.source: e.caption for report in reports for e in report.usable}, recipe.data.shuffle_tags):
            print(line)
            warnings += line.startswith("warning")
        for line in tag_warnings([e.caption or "" for report in reports for e in report.usable], recipe.data):  # as training's start says them
            print(line)
            warnings += 1
        if line := fill_unset_prompts(recipe, items):  # validation.prompts: null: which captions the grids will sample, or why none
            print(line)
    short = None
    if recipe is not None and not fatal:
        if held:
            print(f"held out: {counted(len(held), 'image')} for the validation loss (validation.loss_images){resumed}, leaving {len(trained)} of the {len(sources)} "
                  "uses per epoch to train")  # fmt: skip
        short = too_few_to_batch(len(trained), recipe, 1, len(sources)) or concept_held_out_whole(reports, held_sources, recipe)
        if recipe.method == "controlnet" and not short:
            from finetune.controlnet.pairs import validation_conditions_problem  # it builds on this module

            short = validation_conditions_problem(recipe)
        if recipe.lora.init_from and not short:
            from finetune.models.init_from_record import text_encoder_switch

            short = init_from_problem(recipe.lora, *text_encoder_switch(recipe), model=recipe.model)
    if short:
        print(f"result: training would stop: {short}")
        return 1
    if fatal:
        # Skipping images fixes only problems of single images, not one of the whole dataset.
        per_image = any(finding.source != report.label for report in reports for finding in report.of_level(FATAL))
        print(f"result: training would stop: {counted(fatal, 'fatal problem')}; fix {'it' if fatal == 1 else 'them'}" + (f", {SKIP_HINT}" if per_image else ""))
        return 1
    warnings += warnings_said() - said_before  # said as `warning: ...` outside the report: the recipe's, a class folder's
    print("result: ready to train" + (f" ({counted(warnings, 'warning')})" if warnings else ""))
    return 0


def base_model_problem(recipe: Recipe) -> str | None:
    """Why training would stop on the recipe's base model before reading any image, for a local one (a path not there,
    from this folder: a recipe run from another folder than the one its relative paths start from; a folder that is no
    pipeline), or on its lora.target_modules against that base's UNet: said as a fatal problem, as check-data said "ready to
    train" of a run that stops on it. A hub id is looked up offline (HF_HUB_OFFLINE=1) alone, in the local cache as training
    looks it up then (a hub id not there was "ready to train"); online it is left to training, which fetches it (check-data
    downloads nothing)."""
    from finetune.models.model_source import downloads_off, locate_base, looks_like_hub_id
    from finetune.models.unet_layer_names import check_unet_targets_first

    model = recipe.model
    if looks_like_hub_id(model.pretrained) and not Path(model.pretrained).expanduser().exists() and not downloads_off():
        return None
    try:
        base = locate_base(model)  # what `finetune train` checks first; a local base's configs and weights' headers, no torch
        if recipe.trains_lora:  # train's check before its data check (finetune/cli/run_refusals.py), from the UNet weights' header
            check_unet_targets_first(recipe.lora.target_modules, base)
    except FinetuneError as err:
        return str(err)
    return None


def said_once(reports: list[DataReport]) -> None:
    """Leave out of each report the findings an earlier one says in the same words: DreamBooth concepts that share an
    instance_dir (two prompts for one subject) each read it and found its problems, said and counted once per concept.
    Training's start summary leaves them out alike (DreamBoothMethod.check_data)."""
    said: set[tuple[str, str]] = set()
    for report in reports:
        report.findings = [finding for finding in report.findings if (finding.level, finding.message) not in said]
        report.skipped = [finding for finding in report.skipped if (finding.level, finding.message) not in said]
        said |= {(finding.level, finding.message) for finding in report.findings + report.skipped}


def init_from_problem(settings, trains_text_encoder: bool = False, text_encoder_switch: str = "lora.train_text_encoder",
                      model: ModelConfig | None = None) -> str | None:
    """Why the `lora` settings' init_from would stop the run as it starts (not there, a pickle, a LyCORIS or SDXL file, NaN
    weights, a DoRA without lora.use_dora, a rank other than lora.rank's, layers its targets leave out, a LoRA of another
    base than `model`'s), or None. Its path and header first, without torch; only a file they pass is loaded, with torch
    (its tensors' values are checked, NaN or infinite ones in bf16 too, which numpy cannot read), and checked as training
    checks it before the model loads (`read_checked`, `init_from_base_problem`: the same lines)."""
    from finetune.sampling.adapter_records import initial_lora_file

    try:
        initial_lora_file(settings.init_from)
        from finetune.methods.lora_init import read_checked  # torch; it builds on this module

        read_checked(settings, trains_text_encoder, text_encoder_switch)
        if model is not None:
            from finetune.formats.lora_base_fit import init_from_base_problem

            return init_from_base_problem(settings.init_from, model)
    except FinetuneError as err:
        return str(err)
    return None
