"""The refusals train() makes before its model loads (finetune/training/trainer.py), made again by `finetune train` before its data
check decodes every image (minutes for a large folder): there they came only once every image had been decoded. Each is made
here from what is known at the start (the recipe, the launch's environment, the resumed checkpoint's JSON and file names,
the headers and configs of the files the run starts from), without torch where torch is not what the answer needs. train()
keeps its own, for callers that do not come through the command (the benchmark, tests)."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.checkpoints.earlier_run import check_run_folder_writable
from finetune.config import Recipe
from finetune.distributed.process_env import deepspeed_requested, launched_processes, several_processes
from finetune.dreambooth.class_image_plans import check_class_folders
from finetune.errors import FinetuneError
from finetune.models.model_source import BaseLocation
from finetune.models.single_file_configs import check_original_config
from finetune.models.unet_layer_names import check_unet_targets_first
from finetune.optim.packages import check_optimizer_installed, warn_bitsandbytes_missing
from finetune.training.wandb_checks import check_wandb


def check_run_first(recipe: Recipe, resume_from: Path | None, base: BaseLocation) -> None:
    """What `finetune train` refuses of the run itself before its data check (its files were checked before: starting_files);
    `base`: the command's lookup of the base model."""
    check_output_folders_first(recipe)
    check_class_folders(recipe)  # as DreamBooth's check_data says it, before its images are read
    if base.folder is None:  # a single file: loaded as its kind's hub configs say, which its .yaml may contradict
        check_original_config(Path(recipe.model.pretrained).expanduser(), recipe.model)
    check_perceptual_network_first(recipe)
    check_optimizer_installed(recipe.optimizer)
    check_wandb(recipe.logging.wandb.enabled)  # wandb missing, or no API key: its prompt would hold the run once the model had loaded
    check_launch_settings_first(recipe)
    check_deepspeed_first(recipe, resume_from)
    if recipe.trains_lora:
        check_unet_targets_first(recipe.lora.target_modules, base)  # the UNet weights' header: no torch
    if resume_from is not None:
        check_resume_first(recipe, resume_from)
    else:  # a resume reads no starting weights: its checkpoint holds them (finetune.models.start_weights)
        check_controlnet_target_first(recipe, base)
        check_lora_init_from_first(recipe, base)
    warn_bitsandbytes_missing(recipe.optimizer)  # no refusal: the fallback to AdamW, said after them (a refused run needs no warning)


def check_perceptual_network_first(recipe: Recipe) -> None:
    """Method vae's vae.perceptual_network that is no toy-world classifier file (another model's weights, no safetensors file,
    a classifier of other attribute vocabularies), which VAEMethod.check_data says as it loads it (torch), after the command's
    data check. Told from its header alone: a classifier's tensors are the shipped one's, by name and shape (one architecture,
    `ToyWorldClassifier()`), and its vocabularies the world's."""
    from finetune.data_check.train_inputs import SHIPPED_PERCEPTUAL_NETWORK, not_a_classifier, perceptual_network_file

    if recipe.method != "vae" or (path := perceptual_network_file(recipe)) is None:
        return
    problem = classifier_header_problem(path, SHIPPED_PERCEPTUAL_NETWORK)
    if problem:
        raise not_a_classifier(path, problem)


def classifier_header_problem(path: Path, shipped: Path) -> str | None:
    """Why safetensors file `path` cannot load as the toy-world classifier `shipped` is, from both headers; None where it can."""
    import json

    from safetensors import SafetensorError, safe_open

    from finetune.counts import counted
    from finetune.toyworld.world import ATTRIBUTES

    def header(file: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
        with safe_open(str(file), "np") as opened:  # "np": "pt" imports torch
            return {name: opened.get_slice(name).get_shape() for name in opened.keys()}, dict(opened.metadata() or {})

    try:
        tensors, metadata = header(path)
    except (SafetensorError, OSError) as err:
        return str(err).splitlines()[0][:120]
    expected, _ = header(shipped)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        return f"{counted(len(missing), 'tensor')} of a classifier's missing, {counted(len(unexpected), 'tensor')} not a classifier's, e.g. {(unexpected or missing)[0]}"
    if reshaped := sorted(name for name in tensors if tensors[name] != expected[name]):
        return f"{counted(len(reshaped), 'tensor')} of another shape than a classifier's, e.g. {reshaped[0]} {tuple(tensors[reshaped[0]])}"
    try:
        attributes = json.loads(metadata.get("attributes", "null"))
    except ValueError:
        return "its attributes record is no JSON"
    if attributes is not None and attributes != {key: list(values) for key, values in ATTRIBUTES.items()}:
        return "trained for other attribute vocabularies; retrain it"
    return None


def check_launch_settings_first(recipe: Recipe) -> None:
    """train.mixed_precision and accelerate's compile options this machine cannot run (fp16 on a CPU, bf16 emulated on an old
    GPU, inductor's dynamic shapes on a CPU: `distributed.launch_problem`). Whether there is a GPU is torch's to say, so torch
    is imported here, 3.5 s to 6 s before train() would import it (python -X importtime on a 2-core machine, idle and
    loaded), but only where the answer needs it: with train.mixed_precision no and no --dynamo_backend,
    launch_problem refuses nothing. A run that passes loses nothing (train() imports torch anyway); one whose data check fails
    says so those seconds later, where a refusal after the data check came minutes late on a large folder."""
    if recipe.train.mixed_precision == "no" and os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() == "no":
        return
    from finetune.distributed.processes import launch_problem

    if problem := launch_problem(recipe.train.mixed_precision):
        raise FinetuneError(problem)


def check_deepspeed_first(recipe: Recipe, resume_from: Path | None) -> None:
    """Under DeepSpeed, its refusals (`deepspeed_checks.check_deepspeed_launch`: two trained models, lora.max_norm, adafactor,
    an optimizer offload does not run, a config file setting what the recipe decides, a checkpoint of another ZeRO stage or
    number of processes). They need accelerate's DeepSpeed plugin to read the config as the run will (it fills in its
    environment's settings and defaults), and the method's trained models: torch and the methods are imported here, only
    under DeepSpeed, whose runs import them seconds later anyway; a copy of the plugin's reading without torch would drift
    from it."""
    if not deepspeed_requested():
        return
    from finetune.distributed.deepspeed_checks import check_deepspeed_launch
    from finetune.methods import METHODS
    from finetune.models.start_weights import without_starting_weights

    trained = METHODS[recipe.method](without_starting_weights(recipe)).trained_module_names()  # from the recipe alone
    check_deepspeed_launch(recipe, trained, resume_from)


def check_resume_first(recipe: Recipe, resume_from: Path) -> None:
    """A checkpoint another engine wrote (here without DeepSpeed: under it, its ZeRO stage decides), one of other trained weights
    or optimizer groups than the recipe's, and a finished run's, with nothing left to train (as train() says it: with several
    processes that waits until they have joined, where a kill cut its end's saves short)."""
    from finetune.checkpoints.resume_checks import check_resumable, check_same_engine
    from finetune.checkpoints.run_files import read_state
    from finetune.training.run_end import resume_limit

    if not deepspeed_requested():
        check_same_engine(resume_from, read_state(resume_from).get("processes"), None, launched_processes())
    check_resumable(resume_from, None if several_processes() else resume_limit(resume_from, recipe.train.max_steps), recipe.flat_settings())


def check_controlnet_target_first(recipe: Recipe, base: BaseLocation) -> None:
    """A controlnet.pretrained whose run trained for another prediction type than this run trains for (its finetune_metadata.json
    against model.prediction_type, else the base's scheduler config), which ControlNetMethod refuses once the base has loaded.
    A hub id's ControlNet records none."""
    pretrained = recipe.controlnet.pretrained
    if recipe.method != "controlnet" or pretrained is None or not Path(pretrained).expanduser().is_dir():
        return
    from finetune.data_check.starting_files import controlnet_to_load
    from finetune.sampling.adapter_records import saved_model_metadata

    from finetune.models.init_from_record import check_same_target

    recorded = saved_model_metadata(Path(controlnet_to_load(pretrained))).get("finetune.prediction_type")
    check_same_target("controlnet.pretrained", pretrained, recorded, run_prediction_type(recipe, base))


def check_lora_init_from_first(recipe: Recipe, base: BaseLocation) -> None:
    """A lora.init_from whose run recorded another clip skip or prediction type than this run's (its header, as ours),
    which the LoRA method refuses once the base has loaded (its prediction type); then its ranks and layers against the
    recipe's (lora.rank, target_modules, the text encoder's switch), as the method reads the file. Those need its tensors read
    (NaN ones refused too): torch is imported here, only for a run that starts from a LoRA file, seconds before train()
    would import it, where the method's refusal came after every image was decoded. Then its fit to the base (widths and
    depths: `finetune.formats.lora_base_fit`), which the method said once the base had loaded."""
    if not recipe.lora.init_from:
        return
    from finetune.models.init_from_record import check_recorded_alike, text_encoder_switch
    from finetune.sampling.adapter_records import lora_record

    check_recorded_alike(lora_record(recipe.lora.init_from), recipe.lora.init_from, recipe.model.clip_skip, run_prediction_type(recipe, base))
    from finetune.methods.lora_init import read_checked

    read_checked(recipe.lora, *text_encoder_switch(recipe))
    from finetune.formats.lora_base_fit import init_from_base_problem

    if problem := init_from_base_problem(recipe.lora.init_from, recipe.model):
        raise FinetuneError(problem)


def run_prediction_type(recipe: Recipe, base: BaseLocation) -> str | None:
    """What the run trains its model to predict, as loading the base decides it (finetune.models.loading.load_base_model):
    model.prediction_type, else the base's scheduler config's (diffusers' default, epsilon, where it names none): a single
    file's is its configs folder's, or the cached hub configs' it is read with (`cached_prediction_type`); None where only
    loading can say (those configs not in the cache)."""
    if recipe.model.prediction_type is not None:
        return recipe.model.prediction_type
    configs = recipe.model.single_file_config
    if base.folder is None and not (configs and Path(configs).expanduser().exists()):  # (a hub id's configs, or none given)
        from finetune.models.single_file_configs import cached_prediction_type

        return cached_prediction_type(Path(recipe.model.pretrained).expanduser(), configs)
    scheduler = (base.folder or Path(configs).expanduser()) / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        return None
    from finetune.models.base_folder import read_config

    return read_config(scheduler, recipe.model.pretrained).get("prediction_type", "epsilon")


def check_output_folders_first(recipe: Recipe) -> None:
    """output_dir's samples/ and logs/, where this run writes there, as its checkpoints/ is (guard_earlier_run): a grid not
    written was a warning mid-run, TensorBoard's writer a traceback once the model had loaded."""
    output_dir = Path(recipe.output_dir)
    # Prompts [] (the key left out) and no prompts file draw no grid (null draws the data's captions'); loss masks' preview is saved there too.
    if recipe.validation.prompts != [] or recipe.validation.prompts_file is not None or recipe.data.loss_mask.source != "none":
        check_run_folder_writable(output_dir, "samples", "writes its sample images")
    if recipe.logging.tensorboard:
        check_run_folder_writable(output_dir, "logs", "writes its TensorBoard logs")
