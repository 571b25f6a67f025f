"""Typed recipes: every section of a recipe, its defaults and its validation (pydantic).

Every knob has a name and a default here; recipe files under `recipes/` document them for users.
Unknown keys are rejected, so a typo never silently trains the wrong thing. Reading a YAML file,
`key=value` overrides and the one-line errors are finetune/recipe_loading.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    # A hub id, a local diffusers folder, or a single .safetensors/.ckpt checkpoint file.
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: Optional[str] = None
    variant: Optional[str] = None
    # For a single-file checkpoint: the diffusers folder or hub id whose configs describe it.
    single_file_config: Optional[str] = None
    # None keeps the scheduler's own prediction type (epsilon for SD1.5, v_prediction for SD2.x-768).
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None
    # Counted as the webui and sd-scripts count it: 1 uses the text encoder's last layer, 2 the one before
    # (what anime bases built on NovelAI's were trained with). Sampling follows the adapter's.
    clip_skip: int = Field(1, ge=1)
    # Not recipe keys: what set `pretrained` and `single_file_config`, for messages (a command's options).
    _key: str = PrivateAttr("model.pretrained")
    _single_file_config_key: str = PrivateAttr("model.single_file_config")

    @classmethod
    def from_option(cls, pretrained: str, single_file_config: str | None = None) -> "ModelConfig":
        """The base model of a command's --base (and --base-config) options."""
        config = cls(pretrained=pretrained, single_file_config=single_file_config)
        config._key, config._single_file_config_key = "--base", "--base-config"
        return config


class BucketConfig(Section):
    """`data.bucketing`: train each image near its own aspect ratio (see finetune/buckets.py)."""

    # Off: every image is resized and cropped to resolution x resolution, as without this section.
    enabled: bool = False
    # Bucket sides are multiples of this; keep it 64 for SD (smaller models need 8 x their UNet's downsampling).
    step: int = 64
    # Shortest and longest bucket side; None: resolution / 2 and resolution x 2 (rounded to step).
    min_side: Optional[int] = None
    max_side: Optional[int] = None

    @field_validator("step")
    @classmethod
    def _step_multiple_of_8(cls, value: int) -> int:
        if value <= 0 or value % 8 != 0:
            raise ValueError("must be a positive multiple of 8 (the VAE downsamples by 8)")
        return value


class FolderConfig(Section):
    """One entry of `data.folders`: a subfolder of data.image_dir with its own repeats and caption template."""

    path: str  # relative to data.image_dir (or absolute); "." is image_dir itself
    # Times each image of this folder is used per epoch: 1 means no repeat, 3 means three times.
    repeats: int = 1
    # The prompt: "{caption}" is replaced by the image's own caption ("a photo of {caption}"); a template
    # without "{caption}" is the prompt of every image in the folder, and its captions are not read.
    template: Optional[str] = None

    @field_validator("repeats")
    @classmethod
    def _at_least_once(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 (1 means no repeat; remove the folder to leave it out)")
        return value

    @field_validator("template")
    @classmethod
    def _only_the_caption_placeholder(cls, value: Optional[str]) -> Optional[str]:
        # "{captions}" would make a fixed prompt of the whole folder, its captions unread.
        unknown = sorted(set(re.findall(r"\{[^{}]*\}", value or "")) - {"{caption}"})
        if unknown:
            raise ValueError(f"{unknown[0]} is not a placeholder: the template's one placeholder is {{caption}}")
        return value


class DataConfig(Section):
    # Either a folder of images with captions, or a `datasets` dataset (hub name, or a local path).
    image_dir: Optional[str] = None
    # Not a recipe key: the key that set image_dir, for messages (a DreamBooth concept's instance_dir).
    _image_dir_key: str = PrivateAttr("data.image_dir")
    # Not a recipe key: what else a missing caption may be fixed with (DreamBooth concepts have their own).
    _caption_alternative: str = PrivateAttr("set data.caption to one prompt for all images")
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None
    dataset_split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    # One prompt for every image; when set, captions are not read.
    caption: Optional[str] = None
    resolution: int = 512
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    # Share of training captions replaced by "" so classifier-free guidance keeps working.
    caption_dropout: float = 0.0
    # Comma-separated tags ("sks, dog, grass") are shuffled per image and epoch, the first keep_tokens
    # staying in place (a trigger word first), so the model does not learn one tag order.
    shuffle_tags: bool = False
    keep_tokens: int = 0
    # Images whose shorter side is below this are an error (default: half the resolution).
    min_image_size: Optional[int] = None
    # Images that would stop the run (unreadable, truncated, too small, no caption) are skipped and
    # listed instead; default: training stops before it starts and names the first one.
    skip_bad_images: bool = False
    bucketing: BucketConfig = BucketConfig()
    # Subfolders of image_dir with their own repeats and prompt templates; empty: image_dir alone, once.
    folders: list[FolderConfig] = []
    num_workers: int = 0

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, value: int) -> int:
        if value <= 0 or value % 8 != 0:
            raise ValueError("must be a positive multiple of 8 (the VAE downsamples by 8)")
        return value

    @field_validator("caption_dropout")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be between 0 and 1")
        return value

    @field_validator("keep_tokens")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value

    @model_validator(mode="after")
    def _buckets_and_folders_fit(self) -> "DataConfig":
        buckets = self.bucketing
        if buckets.enabled:
            for key, value in (("resolution", self.resolution), ("bucketing.min_side", buckets.min_side), ("bucketing.max_side", buckets.max_side)):
                if value is not None and value % buckets.step != 0:
                    raise ValueError(f"data.{key} ({value}) must be a multiple of data.bucketing.step ({buckets.step})")
            if buckets.min_side is not None and buckets.min_side > self.resolution:
                raise ValueError(f"data.bucketing.min_side ({buckets.min_side}) must be at most data.resolution ({self.resolution})")
            if buckets.max_side is not None and buckets.max_side < self.resolution:
                raise ValueError(f"data.bucketing.max_side ({buckets.max_side}) must be at least data.resolution ({self.resolution})")
        if self.folders and self.image_dir is None:
            raise ValueError("data.folders are subfolders of data.image_dir: set data.image_dir (a dataset has no folders)")
        entries = [(os.path.normpath(folder.path), folder.template) for folder in self.folders]
        twice = next((folder.path for folder, entry in zip(self.folders, entries) if entries.count(entry) > 1), None)
        if twice is not None:  # (with another template it is another set of prompts for the same images)
            raise ValueError(f"data.folders lists '{twice}' twice with the same template: list it once and raise its repeats")
        if self.keep_tokens and not self.shuffle_tags:
            raise ValueError("data.keep_tokens keeps the first tags in place while data.shuffle_tags shuffles the rest: set data.shuffle_tags: true")
        return self



class LoRAConfig(Section):
    rank: int = Field(16, ge=1)
    # The LoRA update is scaled by alpha / rank; saved with the weights so strength is preserved.
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # rsLoRA (Kalajdzievski 2023): scale by alpha / sqrt(rank) instead of alpha / rank, so higher ranks
    # keep learning at one learning rate. Saved in the metadata; every loader here and diffusers honour it.
    use_rslora: bool = False
    # Names of UNet submodules to adapt: attention projections by default; add "proj_in", "proj_out",
    # "ff.net.0.proj", "ff.net.2", "conv1", "conv2" for feed-forward and conv layers.
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    # Also a LoRA on the text encoder's attention projections (method lora; DreamBooth has its own switch).
    # It learns new words' meanings faster; text embeddings are then not cached.
    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = None  # None: the same as optimizer.lr; sd-scripts users often halve it


class FullConfig(Section):
    """`method: full`: every UNet weight trains (and the text encoder, if asked)."""

    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = None  # None: the same as optimizer.lr


class VAEConfig(Section):
    """`method: vae`: train the autoencoder itself (pretraining a base model from scratch)."""

    # Weight of the KL term that keeps latents near N(0, 1), as in the latent diffusion paper's KL-f8.
    kl_weight: float = 1.0e-6
    # L1 reconstruction is sharper than L2 for edges; both are summed with these weights.
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    # Pixels far from the image's median colour weigh up to 1 + salience_weight times more in the
    # reconstruction loss, so a small object's colour is not outvoted by its background (0: plain mean).
    salience_weight: float = 0.0
    # Weight of the perceptual term (0: off) and the toy-world classifier file whose features define it.
    perceptual_weight: float = 0.0
    perceptual_network: Optional[str] = None  # None: the shipped finetune/assets/toyworld_perceptual.safetensors


class ClassImageGeneration(Section):
    """How missing class images are generated with the frozen base model (DreamBooth prior preservation)."""

    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    batch_size: int = Field(4, ge=1)
    seed: int = 0
    negative_prompt: Optional[str] = None


class Concept(Section):
    """One subject to learn: its images, the prompt that names it, and the class it belongs to."""

    instance_dir: str
    # With a rare identifier, e.g. "a photo of sks dog"; not needed with use_captions (it would be unused).
    instance_prompt: Optional[str] = None
    # Read each image's .txt/metadata caption instead of instance_prompt.
    use_captions: bool = False
    # e.g. "a photo of a dog"; required with prior preservation. A list of prompts ("a photo of a dog
    # on grass", "a photo of a small dog", ...) spreads the prior over the prompts you will use:
    # generated class image k comes from prompt k mod len(list) and trains with it.
    class_prompt: Union[str, list[str], None] = None
    # Folder of class images; missing ones are generated there. Default: <output_dir>/class_images/<n>.
    class_dir: Optional[str] = None

    @model_validator(mode="after")
    def _a_prompt_or_captions(self) -> "Concept":
        if not self.use_captions and not self.instance_prompt:
            raise ValueError("set instance_prompt (e.g. 'a photo of sks dog'), or use_captions: true to train with each image's caption")
        return self

    @field_validator("class_prompt")
    @classmethod
    def _no_empty_prompts(cls, value):
        if isinstance(value, list) and (not value or not all(p.strip() for p in value)):
            raise ValueError("class_prompt: list one or more non-empty prompts")
        return value

    @property
    def class_prompts(self) -> list[str]:
        if self.class_prompt is None:
            return []
        return [self.class_prompt] if isinstance(self.class_prompt, str) else list(self.class_prompt)


class DreamBoothConfig(Section):
    """`method: dreambooth` (Ruiz et al., 2023): learn subjects while preserving the class prior."""

    concepts: list[Concept]
    adapter: Literal["full", "lora"] = "full"  # lora uses the `lora:` section's settings
    prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(100, ge=0)  # per concept
    class_generation: ClassImageGeneration = ClassImageGeneration()
    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = None  # None: the same as optimizer.lr

    @field_validator("concepts")
    @classmethod
    def _at_least_one(cls, value: list) -> list:
        if not value:
            raise ValueError("list at least one concept (instance_dir and instance_prompt)")
        return value


class ControlNetConfig(Section):
    """`method: controlnet` (Zhang et al., 2023): a zero-initialised trainable copy of the UNet encoder
    steers the frozen UNet with a conditioning image (edges, a mask, a depth-like map)."""

    # An existing diffusers ControlNet folder to continue from; None: copy the UNet's encoder.
    pretrained: Optional[str] = None
    # Datasets: the column holding the conditioning image (folders: metadata.jsonl conditioning_file_name).
    conditioning_column: str = "conditioning_image"
    # Share of training captions replaced by "" (0.5 in the ControlNet paper: learn to read the image).
    empty_prompt_share: float = 0.5
    # Strength of the control in validation samples (training always uses 1.0).
    conditioning_scale: float = 1.0
    # Add only the mid-block residual to the UNet; the down-block zero convs stay zero and frozen.
    only_mid_control: bool = False
    # The paper's sd_locked=False: also train the UNet's decoder (up blocks, conv_norm_out, conv_out).
    unlock_unet_decoder: bool = False
    # Conditioning images for validation rows, paired with validation.prompts (one of them may have
    # length 1 and is then used for every row). Empty: the first training examples' conditioning images.
    validation_conditions: list[str] = []

    @field_validator("empty_prompt_share")
    @classmethod
    def _share(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be between 0 and 1")
        return value


class TrainConfig(Section):
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(1000, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # Channels-last (NHWC) memory format for the UNet, VAE and ControlNet: the layout tensor-core and
    # oneDNN convolutions prefer, so no transposes around every conv. Same math, same loss.
    channels_last: bool = False
    max_grad_norm: Optional[float] = 1.0
    # Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's value, None disables it.
    snr_gamma: Optional[float] = None
    # Offset noise (Guttenberg 2023) helps very dark/bright images; 0.05-0.1 is typical.
    noise_offset: float = 0.0
    # huber: the scheduled pseudo-Huber loss (Khrapov et al. 2024), less pulled by a few odd images;
    # huber_c is its threshold at high noise (it rises to 1, i.e. MSE, at low noise).
    loss: Literal["mse", "huber"] = "mse"
    huber_c: float = Field(0.1, gt=0, le=1)
    # Train on timesteps min_timestep <= t < max_timestep only (None: up to the model's 1000).
    min_timestep: int = Field(0, ge=0)
    max_timestep: Optional[int] = Field(None, ge=1)
    allow_tf32: bool = True
    # Keep an exponential moving average of the trained weights (finetune/ema.py) and sample and save
    # it instead of the last step's weights; 0.999-0.9999 for full fine-tunes. None: off.
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)
    # Compute frozen encoders' outputs once per distinct input (see finetune/cache.py): VAE posteriors
    # keyed by the image's content and view (crop, flip, size), text hidden states by caption. The
    # same loss as uncached (in bf16 to rounding); a cached view is not decoded again.
    cache_latents: bool = False
    cache_text_embeddings: bool = False  # ignored when the text encoder trains
    cache_dir: Optional[str] = None  # None: in memory for this run; a folder: on disk, reused by later runs

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false

    @model_validator(mode="after")
    def _cache_dir_caches_something(self) -> "TrainConfig":
        if self.cache_dir and not (self.cache_latents or self.cache_text_embeddings):
            raise ValueError("train.cache_dir keeps cached encodings, but nothing is cached: set train.cache_latents (or cache_text_embeddings) to true, or remove cache_dir")
        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ValueError(f"train.min_timestep ({self.min_timestep}) must be below train.max_timestep ({self.max_timestep})")
        return self


class OptimizerConfig(Section):
    # adamw8bit, paged_adamw8bit and lion8bit come from bitsandbytes (8-bit states for large tensors);
    # adafactor keeps factored second moments only (the smallest state); prodigy finds its own step size.
    name: Literal["adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "adafactor", "prodigy"] = "adamw"
    lr: float = 1e-4  # prodigy: a multiplier of the step size it finds, near 1.0
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0

    @model_validator(mode="after")
    def _prodigy_multiplier(self) -> "OptimizerConfig":
        if self.name == "prodigy" and self.lr < 0.1:  # 1e-4, as for AdamW, would leave it all but still
            raise ValueError(f"optimizer.lr with prodigy multiplies the step size it finds: set it near 1.0 (got {self.lr:g})")
        return self


class ValidationConfig(Section):
    prompts: list[str] = []
    every_n_steps: int = Field(0, ge=0)  # 0: only at the end of training
    at_start: bool = True  # also sample before the first step, for a before/after comparison
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    negative_prompt: Optional[str] = None  # e.g. "blurry, low quality"; the same for every prompt
    images_per_prompt: int = Field(2, ge=1)
    seed: int = 0


class CheckpointConfig(Section):
    every_n_steps: int = Field(500, ge=0)  # 0: only at the end (and on Ctrl-C)
    keep_last: int = Field(3, ge=0)  # 0: keep every checkpoint
    # Each checkpoint also holds what the run saves at its end, as of that step (the LoRA file, the ControlNet
    # or the pipeline folder), to compare steps in `finetune sample` or the demo; false saves the disk.
    save_outputs: bool = True


class LoggingConfig(Section):
    every_n_steps: int = Field(10, ge=1)
    tensorboard: bool = True


class Recipe(Section):
    method: Literal["lora", "full", "vae", "dreambooth", "controlnet"] = "lora"
    seed: int = 42
    output_dir: str = "outputs/run"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    dreambooth: Optional[DreamBoothConfig] = None
    controlnet: ControlNetConfig = ControlNetConfig()  # used by method controlnet only
    lora: LoRAConfig = LoRAConfig()
    full: FullConfig = FullConfig()
    vae: VAEConfig = VAEConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    validation: ValidationConfig = ValidationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _data_sources_fit_the_method(self) -> "Recipe":
        sources = [self.data.image_dir, self.data.dataset]
        if self.method == "dreambooth":
            if self.dreambooth is None:
                raise ValueError("method dreambooth needs a dreambooth: section with concepts")
            if any(sources):
                raise ValueError("method dreambooth reads dreambooth.concepts; remove data.image_dir/data.dataset")
            if self.lora.train_text_encoder:
                raise ValueError("method dreambooth trains the text encoder with dreambooth.train_text_encoder; remove lora.train_text_encoder")
            for i, concept in enumerate(self.dreambooth.concepts):
                if self.dreambooth.prior_preservation and not concept.class_prompt:
                    raise ValueError(
                        f"dreambooth.concepts[{i}] has no class_prompt, which prior preservation needs "
                        "(e.g. 'a photo of a dog'); set it or dreambooth.prior_preservation: false"
                    )
        elif sum(source is not None for source in sources) != 1:
            raise ValueError("set exactly one of data.image_dir (a folder) or data.dataset (a datasets name or path)")
        trains_text_encoder = self.full.train_text_encoder if self.method == "full" else (
            self.dreambooth is not None and self.dreambooth.adapter == "full" and self.dreambooth.train_text_encoder)
        if self.model.clip_skip > 1 and trains_text_encoder:  # its skipped layers would be saved untrained, or not at all
            raise ValueError("model.clip_skip above 1 leaves the text encoder's last layers out: train it with a LoRA, or set clip_skip to 1")
        if self.optimizer.scheduler != "constant" and self.optimizer.warmup_steps >= self.train.max_steps:
            raise ValueError(
                f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) must be below train.max_steps ({self.train.max_steps}): "
                "the learning rate would never reach optimizer.lr"
            )
        if self.method == "controlnet":
            if self.data.caption_dropout:
                raise ValueError("method controlnet empties captions with controlnet.empty_prompt_share; set data.caption_dropout to 0")
            conditions, prompts = len(self.controlnet.validation_conditions), len(self.validation.prompts)
            if conditions and not prompts:
                raise ValueError("controlnet.validation_conditions needs validation.prompts (one prompt serves every image; '' for none)")
            if conditions > 1 and prompts > 1 and conditions != prompts:
                raise ValueError(
                    f"controlnet.validation_conditions has {conditions} images for {prompts} validation.prompts: "
                    "give one image per prompt, or one image (or one prompt) for all"
                )
        return self

    def fingerprint(self) -> str:
        """A short hash of every setting, recorded in saved files so a result can be traced to its recipe."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]
