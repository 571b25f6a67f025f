"""Load the pretrained parts of Stable Diffusion and freeze the ones that do not train.

A base model is named the way creators name it: a hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5"),
a local diffusers folder, or one `.safetensors`/`.ckpt` file from a model site. Whatever the source, the
result is the same `BaseModel` bundle, and a source that is not there is one clear line, not a traceback.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models.base_folder import SAFE_LOADER_PROTOCOL, files_ending, objects_refused_message, pickle_protocol, unreadable_protocol_message
from finetune.models.encoders import skip_last_layers
from finetune.models.model_source import BaseLocation, located_folder, location_of, with_weights



@dataclass
class BaseModel:
    """The five parts of a Stable Diffusion pipeline, as the trainer uses them."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler  # training's: model.prediction_type and zero_terminal_snr may have changed it
    config: ModelConfig  # where the parts came from (to load one again)
    # What the base model itself was trained for: its scheduler's target, noise schedule and spacing.
    pretrained_schedule: dict = field(default_factory=lambda: dict(PRETRAINED_SCHEDULE_DEFAULTS))
    location: BaseLocation | None = None  # where the parts were found: a part loaded again is read from there
    reading_as_pretrained: bool = False  # inside `predicting_as_pretrained`: pipelines read prompts as the base did too

    @property
    def pretrained_prediction_type(self) -> str:
        return self.pretrained_schedule["prediction_type"]

    @property
    def source(self) -> str:
        return self.config.pretrained

    @contextmanager
    def predicting_as_pretrained(self):
        """Pipelines built inside sample as the base itself was trained (e.g. the untrained step 0 of a
        run that trains v-prediction on an epsilon base), not for what training targets; and read prompts as it
        did, in CLIP's one chunk, not in model.max_token_length's (`finetune.sampling.pipelines.build_pipeline`)."""
        trained_for = {key: self.noise_scheduler.config[key] for key in self.pretrained_schedule}
        self.noise_scheduler.register_to_config(**self.pretrained_schedule)
        self.reading_as_pretrained = True
        try:
            yield
        finally:
            self.noise_scheduler.register_to_config(**trained_for)
            self.reading_as_pretrained = False


def unrecorded_target_warning(base: BaseModel, named: str) -> list[str]:
    """Starting weights (`named`: "lora.init_from FILE", "controlnet.pretrained FOLDER") that record no prediction type
    (from elsewhere: a diffusers file, a hub ControlNet, one of sd-scripts' without ss_v_parameterization) are taken to be
    trained for the base's, as sample reads them; where this run trains another (model.prediction_type) they start from
    what they did not learn. A warning, not a refusal, as that is assumed, not recorded. Their step-0 samples show them as
    loaded, read as the base's target (the method's `started_as_pretrained`); later ones as this run's."""
    pretrained, trained = base.pretrained_prediction_type, base.noise_scheduler.config.prediction_type
    if pretrained == trained:
        return []
    return [f"warning: {named} records no prediction type and is taken to be trained for the base's {pretrained}, this run trains for "
            f"{trained} (model.prediction_type): it starts from what it did not learn (its step-0 samples are read as {pretrained}, the "
            f"later ones as {trained}); remove model.prediction_type if it was trained for {pretrained}"]  # fmt: skip


def freeze(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """No gradients, eval mode (no dropout), and optionally cast to the frozen weights' dtype."""
    module.requires_grad_(False)
    module.eval()
    if dtype is not None and module.dtype != dtype:
        module.to(dtype=dtype)
    return module


def load_base_model(config: ModelConfig, weight_dtype: torch.dtype = torch.float32, location: BaseLocation | None = None) -> BaseModel:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler; freeze VAE and text encoder.
    `location`: the run's lookup of `config` (`finetune.models.model_source.locate_base`), else it is looked up here."""
    # A hub id's weights are fetched here, once: the parts loaded again later (at_source_precision) are read from them.
    location = with_weights(location_of(config, location))
    parts = load_parts(config, ["tokenizer", "text_encoder", "vae", "unet", "scheduler_config"], location)
    # Training always adds noise the DDPM way; the model's own config says which betas and target.
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler_config"])
    pretrained_schedule = {key: noise_scheduler.config.get(key, default) for key, default in PRETRAINED_SCHEDULE_DEFAULTS.items()}
    if config.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    if config.zero_terminal_snr:
        noise_scheduler = zero_terminal_snr_schedule(noise_scheduler)

    if config.clip_skip > 1:
        skip_last_layers(parts["text_encoder"], config.clip_skip)
    freeze(parts["vae"], weight_dtype)
    freeze(parts["text_encoder"], weight_dtype)
    parts["unet"].train()
    return BaseModel(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"], noise_scheduler, config, pretrained_schedule, location)


def zero_terminal_snr_schedule(scheduler: DDPMScheduler) -> DDPMScheduler:
    """The schedule rescaled so its last timestep is pure noise (Lin et al. 2024), sampled from that last
    timestep ("trailing" spacing): images can then be as dark or bright as the data, not mid-grey on average.
    With signal-to-noise 0 there is nothing to predict the noise from: it takes v-prediction."""
    if scheduler.config.prediction_type != "v_prediction":
        raise FinetuneError("model.zero_terminal_snr needs v-prediction (at the last timestep the input is pure noise): set model.prediction_type: v_prediction")
    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


# The scheduler settings that say what a model was trained for, as diffusers defaults them.
PRETRAINED_SCHEDULE_DEFAULTS = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False, "timestep_spacing": "leading"}


def load_parts(config: ModelConfig, names: list[str], location: BaseLocation | None = None) -> dict:
    """The named parts of the base model ("tokenizer", "text_encoder", "vae", "unet", "scheduler_config"),
    always fp32 in memory (an fp16 file is upcast); the trainer casts frozen parts as the recipe asks. `location`:
    where `config` was found, if it was looked up already."""
    folder = located_folder(config, location)
    if folder is None:
        pipeline = _load_single_file(config)
        return {name: pipeline.scheduler.config if name == "scheduler_config" else getattr(pipeline, name) for name in names}
    variant = dict(variant=config.variant) if config.variant else saved_variant(folder)
    loaders = {
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32, **variant),
        "vae": lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, **variant),
        "unet": lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32, **variant),
        "scheduler_config": lambda: DDPMScheduler.load_config(folder, subfolder="scheduler"),
    }
    return {name: loaders[name]() for name in names}


def saved_variant(folder: Path) -> dict[str, str]:
    """The variant of a local pipeline folder saved with only one variant's weights (save_pretrained(variant="fp16")
    writes unet/diffusion_pytorch_model.fp16.safetensors and no plain file): {"variant": "fp16"}, else {}.
    Without it diffusers looks for the plain file and stops, naming a .bin. Suffixes in any letter case: a disk that
    ignores case serves diffusion_pytorch_model.fp16.SafeTensors by its lowercase name (one telling case apart is said
    to rename it before: `base_folder.misnamed_weights`)."""
    unet, stem = folder / "unet", "diffusion_pytorch_model."
    after_stem = [file.name[len(stem) :] for file in files_ending(unet, "") if file.name.startswith(stem)]  # fp16.SafeTensors, ...
    if any(rest.lower().startswith("safetensors") for rest in after_stem) or files_ending(unet, ".bin"):  # the plain file, or its shards' index
        return {}
    variants = {rest.split(".")[0] for rest in after_stem if rest.lower().endswith(".safetensors")}  # (none is the plain file here)
    return {"variant": variants.pop()} if len(variants) == 1 else {}


def at_source_precision(base: BaseModel, names: list[str]) -> dict[str, torch.nn.Module]:
    """The named parts as the source has them: those the run holds in bf16/fp16 are loaded again (a
    bf16 round trip would cost a saved VAE or text encoder 8 bits of mantissa)."""
    # (and a text encoder without its last layers, model.clip_skip: the saved one is whole)
    reduced = [name for name in names if getattr(base, name).dtype != torch.float32 or (name == "text_encoder" and base.config.clip_skip > 1)]
    reloaded = {name: freeze(module) for name, module in load_parts(base.config, reduced, base.location).items()} if reduced else {}
    return {name: reloaded.get(name, getattr(base, name)) for name in names}


@contextmanager
def lowercase_suffix(path: Path):
    """`path` as diffusers' single-file loader can read it: by a lowercase suffix, which tells it a safetensors file from a
    pickle (it read model.SafeTensors as a pickle, and finetune told the user to rename it). The file itself where its
    suffix is lowercase, or where the disk ignores case (the lowercase name is the same file); else a link by that name
    in a temporary folder, for the load alone (a file copied from Windows, loaded where it is, as it is)."""
    lowered = path.with_suffix(path.suffix.lower())
    if lowered == path or (lowered.exists() and os.path.samefile(lowered, path)):
        yield lowered
        return
    with tempfile.TemporaryDirectory(prefix="finetune-base-") as folder:
        link = Path(folder) / lowered.name
        try:
            link.symlink_to(os.path.abspath(path))
        except OSError as err:  # (a system without links, where no disk ignores case)
            raise FinetuneError(f"base model file {path} ends in {path.suffix}, and diffusers reads a single file by its suffix in lowercase "
                                f"(a link by that name could not be made: {err.strerror or err}): rename it to end in {lowered.suffix}") from None
        yield link


def _load_single_file(config: ModelConfig) -> StableDiffusionPipeline:
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    kwargs = {}
    if config.single_file_config:
        kwargs["config"] = config.single_file_config
    config_key = config._single_file_config_key
    try:
        with lowercase_suffix(Path(config.pretrained).expanduser()) as readable:
            return StableDiffusionPipeline.from_single_file(str(readable), **kwargs)
    except OSError as err:
        if (refused := pickled_object_refused(err)) is not None:  # a .ckpt holding more than tensors: not damaged, and not unpickled
            raise FinetuneError(objects_refused_message(f"base model file {config.pretrained}", refused)) from None
        if (protocol := pickle_protocol(Path(config.pretrained))) is not None and protocol > SAFE_LOADER_PROTOCOL:  # whole, not damaged
            raise FinetuneError(unreadable_protocol_message(f"base model file {config.pretrained}", protocol)) from None
        if str(err).startswith("Unable to load weights"):  # the file itself (a .ckpt cut short, or no model): no config would help
            raise FinetuneError(f"base model file {config.pretrained} cannot be read as a checkpoint (damaged, or not a model file): download it again") from None
        raise FinetuneError(
            f"could not read base model file {config.pretrained}: {str(err).splitlines()[0]} "
            f"(offline, set {config_key} to a local diffusers folder with the matching configs)"
        ) from None
    except SingleFileComponentError as err:  # a file of one part only (a ControlNet, VAE or UNet) given as the whole model
        raise FinetuneError(
            f"base model file {config.pretrained} is not a whole Stable Diffusion checkpoint (diffusers: {_first_sentence(str(err))}): "
            f"a ControlNet, VAE or UNet-only file is no base model; set {config._key} to a file holding UNet, VAE and text encoder, or to a diffusers folder"
        ) from None
    except ValueError as err:  # a config folder that is not there, or describes another architecture
        raise FinetuneError(
            f"could not load base model file {config.pretrained} with {config_key} {config.single_file_config}: "
            f"{_first_sentence(str(err))} (give {config_key} the diffusers folder or hub id of the model this file was made from)"
        ) from None


def pickled_object_refused(err: BaseException) -> str | None:
    """The object torch.load(weights_only=True) refused to unpickle, where that is why `err` (diffusers' "Unable to load
    weights", raised from it) was raised: a .ckpt holding a training run's objects (a Lightning callback) beside its
    weights, or made to run code as it loads, in a format `objects_refused_in` cannot look into before loading (torch's
    legacy one). Said as damaged, with "download it again", which gave it once more."""
    import pickle

    while err is not None:
        # (an unpickling error of no GLOBAL is a file that is no pickle, or one cut short: damaged)
        if isinstance(err, pickle.UnpicklingError) and (named := re.search(r"GLOBAL ([\w.]+)", str(err))):
            return named.group(1)
        err = err.__cause__ or err.__context__
    return None


def _first_sentence(text: str) -> str:
    """diffusers' first sentence, whole: what follows is advice for its own API (ignore_mismatched_sizes), no use here."""
    words = " ".join(text.split())  # on one line (it also leaves two spaces where a part's name belongs)
    return re.split(r"(?<=[.!?])\s", words, maxsplit=1)[0]
