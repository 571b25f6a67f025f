"""What a training method is: its data, which parameters train, how a batch becomes a loss, and what is saved.

The training loop (`finetune.training.trainer`) owns everything else: the data loader and its order, precision,
accumulation, checkpoints, logging and validation. A new method is a subclass in its own module, named in
`finetune.methods.METHODS` and among `Recipe.method`'s choices (finetune/config/recipe.py, read without torch), with its
settings a section of finetune/config/methods.py. Three classes here, each building on the one before:
- `TrainingMethod`: what the trainer calls (method vae subclasses it: it trains the autoencoder on pixels).
- `DiffusionMethod`: the denoising objective every other method shares (encode, noise, predict, weigh the
  loss), with the frozen encoders' caches; a subclass gives the model's prediction. DreamBooth and ControlNet.
- `UNetMethod`: a `DiffusionMethod` that trains (part of) the UNet, and the text encoder if asked: LoRA and full
  fine-tuning, and DreamBooth through one of them (its adapter).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from PIL import Image
from torch.utils.data import Dataset

from finetune.captions.captions import tag_warnings, tags_move_in
from finetune.config import Recipe
from finetune.config.training import timestep_range_problem
from finetune.data.batches import item_layout
from finetune.data.cache import EncodingCache, caption_key, model_fingerprint
from finetune.data.images import upright_size
from finetune.data.items import CaptionedImageDataset, collate
from finetune.data.loss_mask import latent_loss_weights
from finetune.data.sources import Example
from finetune.data.views import plan_cover_crop
from finetune.data_check.check import DataReport, checked_examples
from finetune.data_check.train_inputs import data_configs
from finetune.errors import FinetuneError
from finetune.models.encoders import encode_prompts, in_autocast_dtype, latents_from_moments, posterior_moments, text_hidden_states
from finetune.models.loading import BaseModel, unrecorded_target_warning
from finetune.sampling.finite_images import VALIDATION_OVERFLOW
from finetune.sampling.pipelines import build_pipeline, generate_with_settings
from finetune.sampling.samplers import spacing_steps_problem
from finetune.training.device_copy import to_device
from finetune.training.diffusion import POSTERIOR_STREAM, BatchRandomness, NoiseOptions, add_noise, draw_noise, draw_perturbation, per_sample_loss


class TrainingMethod(ABC):
    name: str
    # The trained modules whose outputs another model reads, not the loss: they keep autocast's dtype (not cast to
    # fp32 by accelerate and back; `finetune.distributed.processes.keep_autocast_outputs`). Not a trained text encoder: the UNet
    # reads its states in every cross-attention, whose gradients accelerate's fp32 cast sums in fp32 (on a GPU they
    # leave its final layer norm in fp32 anyway; tests/test_text_encoder_step_casts.py).
    feeding_another_model: tuple[str, ...] = ()
    draws_without_prompts = False  # its validation grid needs no validation.prompts (the VAE's reconstructions)

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.base: BaseModel | None = None
        self.weight_dtype = torch.float32
        self.data_reports: list[DataReport] = []  # printed at the start of training
        self.start_lines: list[str] = []  # what check_data and setup found that a fresh run says once set up (not on resume)
        self.held_out_items: frozenset[int] = frozenset()  # dataset items validation.loss_images keeps out of training
        self.resumed_state: dict | None = None  # a resume's checkpoint_state(), known before setup (`resuming`)
        # The weights the run starts from (lora.init_from, controlnet.pretrained) record no prediction type: taken to be
        # trained for the base's (`note_starting_target`).
        self.target_unrecorded = False

    def check_data(self) -> None:
        """Read and check the training data; runs before any model is loaded, so errors come fast."""
        self.examples, report = checked_examples(data_configs(self.recipe)[0])  # not recipe.data: method vae's has its captions blanked
        self.data_reports = [report]

    def training_items(self) -> list[Example]:
        """The image of each item the training dataset will have, with its source and size (known after
        `check_data`, before any model loads); an image used several times (data.folders repeats) is listed each time."""
        return self.examples

    def setup(self, base: BaseModel, weight_dtype: torch.dtype = torch.float32) -> None:
        self.base, self.weight_dtype = base, weight_dtype
        self.configure_model()

    @abstractmethod
    def configure_model(self) -> None:
        """Attach adapters, set what trains (fp32) and what is frozen (cast to `weight_dtype`)."""

    def training_data(self, accelerator) -> tuple[Dataset, Callable]:
        """(dataset, collate function); items are looked up by (index, epoch) keys, see finetune.data.batches. An override
        keeps its dataset as `training_dataset` too: with the latent cache, `encode_latents` and `loss_weights` render from it
        the views and masks not cached yet that the data loader did not decode."""
        self.training_dataset = CaptionedImageDataset(self.examples, self.recipe.data, self.recipe.seed, self.item_latent_cache(), self.held_out_items)
        return self.training_dataset, collate

    def item_latent_cache(self) -> EncodingCache | None:
        """The latent cache whose keys dataset items carry (see `finetune.data.items.view_entry`), if any."""
        return None

    @abstractmethod
    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """The modules that hold trainable parameters, by name; the trainer wraps them with accelerate."""

    @abstractmethod
    def trained_module_names(self) -> list[str]:
        """The names of `trained_modules`, from the recipe alone: known before the model loads (DeepSpeed's refusals)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.trained_modules().values() for p in module.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups, each with a "name" (for the logs; the trainer takes it out); override
        to give some parameters their own learning rate."""
        return [{"name": self.name, "params": self.trainable_parameters()}]

    @abstractmethod
    def loss(self, modules: dict[str, torch.nn.Module], batch: dict, randomness: BatchRandomness) -> dict[str, torch.Tensor]:
        """{"loss": scalar to minimise, other terms to log}; `modules` are the accelerate-wrapped ones."""

    @abstractmethod
    def save(self, output_dir: Path, modules: dict[str, torch.nn.Module], metadata: dict[str, str]) -> list[Path]:
        """Write the result (from unwrapped `modules`) where creators load it; return the paths written."""

    def hold_weight_limits(self, modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor | float]:
        """Bring the weights in `modules` within the method's limits (lora.max_norm): called after each optimizer
        step, and on the weight average (train.ema_decay) before it samples or saves, as averaging the factors of
        a product apart can leave their product past a limit each step kept. Returns values for TensorBoard, which
        may stay on the device (the trainer reads them at log steps only), and reads none itself."""
        return {}

    def checkpoint_state(self) -> dict:
        """What the method itself keeps across steps besides weights (JSON values), for checkpoints."""
        return {}

    def data_metadata(self) -> dict[str, str]:
        """What the saved files record of the training data beyond its folders and tags (see output_metadata)."""
        return {}

    def start_metadata(self) -> dict[str, str]:
        """What the saved files record of trained weights the run started from (a ControlNet's: see output_metadata), made
        when the run started: a resume keeps that record (its checkpoint's), which a folder moved since could not give."""
        return {}

    def recorded_data(self) -> dict[str, list]:
        """The data besides the training images a checkpoint records (resume_changes.data_record), by kind, so a resume
        says when they changed; asked once the training data is built (DreamBooth's class images are made by then)."""
        masks = [item.mask_digest for item in self.training_items() if item.mask_digest is not None]  # data.loss_mask
        return {"loss masks": masks} if masks else {}

    def resuming(self, checkpoint: Path, state: dict) -> None:
        """Told before `check_data` that the run resumes from `checkpoint` (its trainer state: `state`), see finetune.models.start_weights."""
        self.resumed_state = state.get("method") or {}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore what `checkpoint_state` returned, on resume."""

    def started_as_pretrained(self) -> bool:
        """Whether the weights the run starts from (lora.init_from, controlnet.pretrained) record no prediction type, so
        are taken to predict the base's own target: the step-0 samples then read them so (`BaseModel.predicting_as_pretrained`),
        as they were loaded, not as this run's target. A run from the base alone samples so at step 0 whatever this says."""
        return self.target_unrecorded

    def note_starting_target(self, recorded: dict[str, str], named: str) -> None:
        """As the weights the run starts from load (`named`: "lora.init_from FILE"), with what their run `recorded`: weights
        that record no prediction type are taken to be trained for the base's (`started_as_pretrained`), a start line
        warning where this run trains for another."""
        self.target_unrecorded = not recorded.get("finetune.prediction_type")
        if self.target_unrecorded:
            self.start_lines += unrecorded_target_warning(self.base, named)

    def validation_images(self, modules: dict[str, torch.nn.Module]) -> tuple[list[list[Image.Image]], list[str]]:
        """(rows of images, a label per row) for the validation grid, from the unwrapped modules."""
        settings = self.recipe.validation
        if not settings.all_prompts:
            return [], []
        prompts = [settings.prompt_settings(text) for text in settings.all_prompts]  # each with its own --n, --d, --l, --s, --ss, if any
        rows = generate_with_settings(self.pipeline(modules), prompts, settings.images_per_prompt, self.recipe.data.resolution,
                                      not_finite_cause=VALIDATION_OVERFLOW)  # said, never raised: training goes on
        return rows, settings.all_prompts

    def pipeline(self, modules: dict[str, torch.nn.Module]) -> DiffusionPipeline:
        """An inference pipeline over the current (unwrapped) trained modules."""
        raise NotImplementedError(f"method {self.name} has no inference pipeline")


class DiffusionMethod(TrainingMethod):
    """The latent-diffusion objective: encode, add noise at a random timestep, predict, regress."""

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.latent_cache: EncodingCache | None = None  # set up with the model (train.cache_latents)
        self.text_cache: EncodingCache | None = None

    def setup(self, base: BaseModel, weight_dtype: torch.dtype = torch.float32) -> None:
        super().setup(base, weight_dtype)
        self._set_up_caches(base)
        if self.data_reports:  # the data was read (check_data)
            self.start_lines += tag_warnings([item.caption or "" for item in self.training_items()], self.recipe.data)
        train = self.recipe.train
        self.timestep_range = training_timesteps(train, base.noise_scheduler.config.num_train_timesteps)
        if problem := debiased_zero_snr_problem(train, base):
            raise FinetuneError(problem)
        if problem := validation_steps_problem(self.recipe.validation, base.noise_scheduler):
            raise FinetuneError(problem)

    def _set_up_caches(self, base: BaseModel) -> None:
        """train.cache_latents and cache_text_embeddings: the caches, and start lines saying what they hold and when they won't pay off."""
        train = self.recipe.train
        root = Path(train.cache_dir) if train.cache_dir else None

        def encoding_cache(kind: str, encoder: torch.nn.Module, tokenizer=None) -> EncodingCache:
            return EncodingCache(root / f"{kind}-{model_fingerprint(encoder, tokenizer)}" if root else None)

        self.latent_cache = encoding_cache("latents", base.vae) if train.cache_latents else None
        text_encoder_trains = "text_encoder" in self.trained_modules()  # its embeddings change each step
        self.text_cache = encoding_cache("text", base.text_encoder, base.tokenizer) if train.cache_text_embeddings and not text_encoder_trains else None
        used = ((self.latent_cache, "latents"), (self.text_cache, "text embeddings"))
        self.start_lines += [cache.disk_line(what) for cache, what in used if cache and cache.folder]
        data = self.recipe.data  # the items are read only where a warning may apply (a model set up without check_data has none)
        crops_vary = train.cache_latents and data.crop == "random" and any_crop_room(self.training_items(), data)
        tags_vary = (self.text_cache is not None and (data.shuffle_tags or data.tag_dropout)
                     and any_tags_to_move(self.training_items(), data))
        self.start_lines += unrepeated_cache_warnings(crops_vary, tags_vary)

    def item_latent_cache(self) -> EncodingCache | None:
        return self.latent_cache

    def encode_latents(self, batch: dict, posterior_noise: torch.Tensor) -> torch.Tensor:
        """Latents of the batch's images: from the cache by the views' keys, where only a view not
        cached yet is encoded (decoded by the data loader, or else by the training dataset); a batch
        of pixels (no cache, or a fixed evaluation batch) is encoded as it is."""
        vae = self.base.vae
        if "latent_keys" in batch:

            def encode_views(rows: list[int]) -> torch.Tensor:
                # Pixels the data loader decoded (views likely new), else decoded here.
                pixels = [batch["view_pixels"][i] if batch["view_pixels"][i] is not None else self.training_dataset.render(batch["views"][i]) for i in rows]
                return posterior_moments(vae, torch.stack(pixels)).to(vae.dtype)

            # Kept in the VAE's dtype (half the memory under bf16), exact: its outputs have no more bits. Read as they are:
            # `latents_from_moments` makes fp32 latents of them without an fp32 copy first.
            moments = self.latent_cache.lookup(batch["latent_keys"], encode_views, vae.device)
        else:
            moments = posterior_moments(vae, batch["pixel_values"])
        return latents_from_moments(vae, moments, posterior_noise)

    def loss_weights(self, batch: dict, latent_size: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """Per-latent loss weights (B, 1, h, w) from the batch's loss masks (data.loss_mask), or None.

        Named views' masks come from the latent cache, kept at the latents' size (each 8x8 patch's mean,
        as `latent_loss_weights` takes it): a mask not cached yet is cut here unless the loader did.
        """
        unmasked_weight = self.recipe.data.loss_mask.unmasked_weight
        if "loss_mask" in batch:
            return latent_loss_weights(to_device(batch["loss_mask"], device), latent_size, unmasked_weight)
        if "mask_keys" not in batch:
            return None
        keys = batch["mask_keys"]
        masks = torch.ones(len(keys), 1, *latent_size)
        masked = [i for i, key in enumerate(keys) if key is not None]  # the others have no mask: every pixel trains

        def masks_at_latent_size(rows: list[int]) -> torch.Tensor:
            views = [batch["view_masks"][masked[j]] for j in rows]
            views = [view if view is not None else self.training_dataset.render_mask(batch["views"][masked[j]]) for j, view in zip(rows, views)]
            return F.interpolate(torch.stack(views), size=latent_size, mode="area")

        if masked:
            masks[masked] = self.latent_cache.lookup([keys[i] for i in masked], masks_at_latent_size, torch.device("cpu"))
        return latent_loss_weights(to_device(masks, device), latent_size, unmasked_weight)

    @abstractmethod
    def predict(self, modules, noisy_latents, timesteps, encoder_hidden_states, batch) -> torch.Tensor:
        """The model's prediction (noise or velocity) for a noised batch."""

    def encode_text(self, modules, captions: list[str]) -> torch.Tensor:
        """Through the trained text encoder when the method trains one, else the frozen one (no grad)."""
        chunks = self.recipe.model.max_token_length // 75  # model.max_token_length: chunks of 75 tokens
        if "text_encoder" in modules:
            return text_hidden_states(self.base.tokenizer, modules["text_encoder"], captions, self.base.unet.device, chunks)
        encode = lambda rows: encode_prompts(self.base.tokenizer, self.base.text_encoder, [captions[i] for i in rows], chunks)
        if self.text_cache is None:
            return in_autocast_dtype(encode(range(len(captions))))
        return in_autocast_dtype(self.text_cache.lookup([caption_key(c, chunks) for c in captions], encode, self.base.text_encoder.device))

    def combine_losses(self, per_sample: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Reduce per-sample losses; DreamBooth splits instance and class images here."""
        return {"loss": per_sample.mean()}

    def loss(self, modules, batch, randomness) -> dict[str, torch.Tensor]:
        base, train = self.base, self.recipe.train
        height, width = batch["pixel_values"].shape[-2:] if "pixel_values" in batch else batch["pixel_size"]
        randomness = randomness.for_batch_of(len(batch["captions"]))
        latent_shape = (base.vae.config.latent_channels, height // 8, width // 8)
        latents = self.encode_latents(batch, randomness.normal(latent_shape, POSTERIOR_STREAM))
        encoder_hidden_states = self.encode_text(modules, batch["captions"])
        noise, timesteps = draw_noise(randomness, latent_shape, self.timestep_range, NoiseOptions.of(train))
        perturbation = draw_perturbation(randomness, latent_shape, train.input_perturbation)
        noised = add_noise(
            base.noise_scheduler, latents, to_device(noise, latents.device), to_device(timesteps, latents.device),
            None if perturbation is None else to_device(perturbation, latents.device),
        )  # fmt: skip
        prediction = self.predict(modules, noised.noisy_latents, noised.timesteps, encoder_hidden_states, batch)
        huber_c = train.huber_c if train.loss == "huber" else None
        weights = self.loss_weights(batch, latent_shape[1:], prediction.device)
        per_sample = per_sample_loss(prediction, noised, base.noise_scheduler, train.snr_gamma, huber_c, train.debiased_estimation, weights)
        return self.combine_losses(per_sample, batch)


class UNetMethod(DiffusionMethod):
    """A method that trains (part of) the UNet, and optionally the text encoder at its own rate."""

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        # Whether the text encoder trains too, and at what rate, from the section that says so: the method's own (lora:,
        # full:), or as DreamBooth's adapter dreambooth:.
        settings = getattr(recipe, recipe.text_encoder_section)
        self.train_text_encoder, self.text_encoder_lr = settings.train_text_encoder, settings.text_encoder_lr

    def trained_module_names(self) -> list[str]:
        return ["unet", "text_encoder"] if self.train_text_encoder else ["unet"]

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.base, name) for name in self.trained_module_names()}  # the base's unet, text_encoder

    def parameter_groups(self) -> list[dict]:
        """The UNet's trainable weights, and the text encoder's at their own rate."""
        groups = [{"name": "unet", "params": [p for p in self.base.unet.parameters() if p.requires_grad]}]
        if self.train_text_encoder:
            text_encoder_lr = self.text_encoder_lr or self.recipe.optimizer.lr
            groups.append({"name": "text_encoder", "params": [p for p in self.base.text_encoder.parameters() if p.requires_grad], "lr": text_encoder_lr})
        return groups

    def predict(self, modules, noisy_latents, timesteps, encoder_hidden_states, batch) -> torch.Tensor:
        return modules["unet"](noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

    def pipeline(self, modules) -> DiffusionPipeline:
        pipeline = build_pipeline(self.base, unet=modules["unet"], max_token_length=self.recipe.model.max_token_length, sampler=self.recipe.validation.sampler)
        if "text_encoder" in modules:
            pipeline.text_encoder = modules["text_encoder"]
        return pipeline


def any_crop_room(items: list[Example], data) -> bool:
    """Whether a random crop can move on any item: its image, resized to cover its target, is larger than it."""
    targets = item_layout(items, data).bucket_of or [(data.resolution, data.resolution)] * len(items)
    return any(plan_cover_crop(upright_size(item), target, "center", None)[0] != target for item, target in zip(items, targets))


def any_tags_to_move(items: list[Example], data) -> bool:
    """Whether data.shuffle_tags or tag_dropout can change any item's caption line (`tags_move_in`)."""
    return tags_move_in([item.caption or "" for item in items], data)


def unrepeated_cache_warnings(crops_vary: bool, tags_vary: bool) -> list[str]:
    """A warning line for each cache whose inputs rarely repeat: random crops that move, shuffled or dropped
    tags. Each step then adds entries (kept for the whole run, in memory and train.cache_dir) seldom read back."""
    seldom = "so each step adds new entries to the cache (held in memory for the whole run, and in train.cache_dir) and seldom reads one back"
    lines = []
    if crops_vary:
        lines.append(f"warning: train.cache_latents with data.crop: random: nearly every crop is new, {seldom}: set train.cache_latents: false")
    if tags_vary:
        lines.append(f"warning: train.cache_text_embeddings with data.shuffle_tags or tag_dropout: nearly every caption is new, {seldom}: "
                     "set train.cache_text_embeddings: false")  # fmt: skip
    return lines


def training_timesteps(train, num_train_timesteps: int) -> range:
    """The timesteps training draws from: all the model's, or train.min_timestep..max_timestep."""
    if problem := timestep_range_problem(train, num_train_timesteps):  # said before the data check where the base's scheduler config is at hand
        raise FinetuneError(problem)
    return range(train.min_timestep, num_train_timesteps if train.max_timestep is None else train.max_timestep)


def validation_steps_problem(validation, scheduler) -> str | None:
    """Why a validation prompt's steps cannot be drawn on the base's own "trailing" spacing (a last step at timestep -1:
    `samplers.spacing_steps_problem`), or None. model.zero_terminal_snr's spacing is refused as the recipe loads; a base
    whose scheduler config spaces its steps so is known once it is loaded."""
    for text in validation.all_prompts:
        steps = validation.prompt_settings(text).num_inference_steps
        if problem := spacing_steps_problem(scheduler, steps):
            return f"{f'validation prompt {text!r}' if steps != validation.num_inference_steps else 'validation.num_inference_steps'}: {problem}"
    return None


def debiased_zero_snr_problem(train, base: BaseModel) -> str | None:
    """Why train.debiased_estimation cannot weigh noise prediction on this base's schedule, or None: its weight 1/sqrt(SNR)
    is infinite at SNR 0, the last timestep of a zero-terminal-SNR schedule (the base's scheduler config may ask for one)."""
    scheduler = base.noise_scheduler
    last = min(train.max_timestep or scheduler.config.num_train_timesteps, scheduler.config.num_train_timesteps) - 1
    if not train.debiased_estimation or scheduler.config.prediction_type != "epsilon" or scheduler.alphas_cumprod[last] > 0:
        return None
    return (f"train.debiased_estimation weighs each timestep's loss by 1/sqrt(SNR), and base model {base.source}'s noise schedule has "
            f"SNR 0 at timestep {last} (zero terminal SNR: rescale_betas_zero_snr in its scheduler config), infinite for noise prediction: "
            f"set model.prediction_type: v_prediction, or train.max_timestep: {last}")
