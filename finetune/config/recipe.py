"""The recipe: the base model, validation, checkpoint and logging sections, and `Recipe`, which holds every section
(the training and optimizer sections are finetune/config/training.py's) and checks that they fit together."""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal, Optional

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from finetune.config.base import Section, UserPath
from finetune.config.data import DataConfig
from finetune.config.methods import ControlNetConfig, DreamBoothConfig, FullConfig, LoRAConfig, VAEConfig
from finetune.config.training import DENOISING_SETTINGS, OptimizerConfig, TrainConfig
from finetune.config.validation import ValidationConfig
from finetune.data.image_bounds import class_batch_problem, grid_problem
from finetune.errors import FinetuneError
from finetune.models.init_from_record import text_encoder_switch
from finetune.sampling.samplers import KARRAS_ON_ZERO_TERMINAL_SNR, steps_problem, trailing_steps_problem
from finetune.sampling.unset_prompts import METHODS as UNSET_PROMPT_METHODS, unset_prompt_rows


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # a model.pretrained of one file (the webui's layout), not a folder or hub id


class ModelConfig(Section):
    # A hub id, a local diffusers folder, or a single .safetensors/.ckpt checkpoint file.
    pretrained: UserPath = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: Optional[str] = None
    variant: Optional[str] = None
    # For a single-file checkpoint: the diffusers folder or hub id whose configs describe it.
    single_file_config: Optional[UserPath] = None
    # None keeps the scheduler's own prediction type (epsilon for SD1.5, v_prediction for SD2.x-768).
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None
    # Counted as the webui and sd-scripts count it: 1 uses the text encoder's last layer, 2 the one before
    # (what anime bases built on NovelAI's were trained with). Sampling follows the adapter's.
    clip_skip: int = Field(1, ge=1)
    # Rescale the noise schedule so its last timestep is pure noise, and sample from there (Lin et al. 2024;
    # sd-scripts' zero_terminal_snr): the model learns images as dark or bright as the data. Needs
    # v-prediction. Outputs record it and sample, eval, merge and the demo follow.
    zero_terminal_snr: bool = False
    # Caption tokens the text encoder reads in training, as sd-scripts' max_token_length: 75 (CLIP's own,
    # the rest is cut), or 150 / 225 in chunks of 75 for long tag lists (a short caption padded to as many). Sampling
    # reads any prompt whole, and a short one in as many chunks as training read (outputs record the setting).
    max_token_length: Literal[75, 150, 225] = 75
    # Not recipe keys: what set `pretrained` and `single_file_config`, for messages (a command's options).
    _key: str = PrivateAttr("model.pretrained")
    _single_file_config_key: str = PrivateAttr("model.single_file_config")

    @model_validator(mode="after")
    def _zero_terminal_snr_predicts_v(self) -> "ModelConfig":
        # Else refused once the base had loaded, after the data check. A base's own epsilon: finetune.models.model_source.
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("model.zero_terminal_snr needs v-prediction (at the last timestep the input is pure noise), and model.prediction_type "
                             "is epsilon: set it to v_prediction")  # fmt: skip
        return self

    @classmethod
    def from_option(cls, pretrained: str, single_file_config: str | None = None) -> "ModelConfig":
        """The base model of a command's --base (and --base-config) options."""
        for option, value in (("--base", pretrained), ("--base-config", single_file_config)):
            if value is not None and not value.strip():  # else pydantic's report of the field, a traceback here
                raise FinetuneError(f"{option} is empty: give a hub id, a diffusers folder or a .safetensors file" if option == "--base" else
                                    f"{option} is empty: give the diffusers folder or hub id whose configs describe the --base file, or leave it out")  # fmt: skip
        config = cls(pretrained=pretrained, single_file_config=single_file_config)
        config._key, config._single_file_config_key = "--base", "--base-config"
        return config


class CheckpointConfig(Section):
    every_n_steps: int = Field(500, ge=0)  # 0: only at the end (and on Ctrl-C)
    every_n_epochs: int = Field(0, ge=0)  # also at the end of every Nth epoch (sd-scripts' save_every_n_epochs); 0: off
    keep_last: int = Field(3, ge=0)  # 0: keep every checkpoint
    # Each checkpoint also holds what the run saves at its end, as of that step (the LoRA file, the ControlNet
    # or the pipeline folder), to compare steps in `finetune sample` or the demo; false saves the disk.
    save_outputs: bool = True
    # Saved outputs record each folder's caption tags with their counts (sd-scripts' ss_tag_frequency, which
    # LoRA tools offer as trigger words); false leaves the captions out of files you may share.
    record_caption_tags: bool = True


# Characters W&B refuses in a project's name (its server answers "invalid project name" only once the run starts).
WANDB_PROJECT_REFUSES = "/\\#?%:"


class WandBConfig(Section):
    """`logging.wandb`: the run followed in Weights & Biases too (diffusers' `--report_to wandb`), beside TensorBoard or
    instead of it: the same scalars, the validation grids, the settings (finetune.training.logged_settings)."""

    enabled: bool = False
    project: str = "finetune"  # W&B's project the run is listed in
    entity: Optional[str] = None  # the team or user owning the project; None: the API key's default entity
    run_name: Optional[str] = None  # the name W&B shows; None: the output_dir's folder name ("lora" for outputs/lora)

    plain_value_hint: ClassVar[str] = "logging.wandb is a section, not {value!r}: set logging.wandb.enabled: true"

    @field_validator("project", "entity", "run_name")
    @classmethod
    def _a_name(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("is empty: give a name, or remove the key")
        if info.field_name == "project" and (refused := [c for c in value if c in WANDB_PROJECT_REFUSES]):
            raise ValueError(f"holds {refused[0]!r}: W&B refuses any of {' '.join(WANDB_PROJECT_REFUSES)} in a project's name (a team or "
                             "user goes in logging.wandb.entity)")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _names_of_a_run_that_logs(self) -> "WandBConfig":
        # A project named with W&B left off would log nowhere, without a word (the run's name given, the switch forgotten).
        if not self.enabled and (named := self.changed(("project", "entity", "run_name"))):
            raise ValueError(f"logging.wandb.{named[0]} names the W&B run, and logging.wandb.enabled is false: set logging.wandb.enabled: true "
                             f"to log to W&B, or remove logging.wandb.{named[0]}")  # fmt: skip
        return self


class LoggingConfig(Section):
    every_n_steps: int = Field(10, ge=1)
    tensorboard: bool = True
    wandb: WandBConfig = WandBConfig()


class Recipe(Section):
    method: Literal["lora", "full", "vae", "dreambooth", "controlnet"] = "lora"
    seed: int = Field(42, ge=0, le=2**32 - 1)  # accelerate's set_seed seeds numpy too, which takes 0 to 2**32 - 1
    output_dir: UserPath = "outputs/run"
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
            # Said with the key to set instead: LoRA's data.image_dir=photos, tried on a DreamBooth recipe, met "remove data.image_dir".
            if self.data.image_dir:
                raise ValueError(f"method dreambooth reads each concept's images from its instance_dir, not data.image_dir: remove "
                                 f"data.image_dir and set dreambooth.concepts.0.instance_dir={self.data.image_dir}")  # fmt: skip
            if self.data.dataset:
                raise ValueError("method dreambooth reads each concept's images from a folder, its instance_dir, not a datasets dataset: "
                                 "remove data.dataset and give the subject's images as a folder in dreambooth.concepts.0.instance_dir")  # fmt: skip
            if self.data.caption is not None:  # each concept's instance_prompt (or its captions) replaces it
                raise ValueError("method dreambooth captions each concept's images with its instance_prompt (or use_captions: true); remove data.caption")
            if self.lora.train_text_encoder:
                raise ValueError("method dreambooth trains the text encoder with dreambooth.train_text_encoder; remove lora.train_text_encoder")
            for i, concept in enumerate(self.dreambooth.concepts):
                if self.dreambooth.prior_preservation and not concept.class_prompt:
                    raise ValueError(
                        f"dreambooth.concepts[{i}] has no class_prompt, which prior preservation needs "
                        "(e.g. 'a photo of a dog'); set it or dreambooth.prior_preservation: false"
                    )
        elif self.dreambooth is not None:  # its concepts would be left untrained, without a word
            raise ValueError(f"a dreambooth: section does nothing with method {self.method}: set method: dreambooth to train its concepts, or remove the section")
        elif all(source is not None for source in sources):  # a dataset given on the command line to a recipe that names a folder
            raise ValueError(f"data.image_dir ({self.data.image_dir}) and data.dataset ({self.data.dataset}) are both set: keep one "
                             "(data.image_dir=null to train on the dataset)")  # fmt: skip
        elif not any(sources):
            raise ValueError("set exactly one of data.image_dir (a folder) or data.dataset (a datasets name or path)")
        if self.data.dataset is None and (unread := [f"data.{key}" for key in self.data.changed(("dataset_config", "dataset_split", "image_column"))]):
            # Else left unread without a word (data.caption_column also names a folder's metadata column).
            reads = "each concept's instance_dir" if self.method == "dreambooth" else "data.image_dir"
            raise ValueError(f"{', '.join(unread)} {'pick' if len(unread) > 1 else 'picks'} what a dataset (data.dataset) gives, and this recipe reads "
                             f"{reads}: remove {'them' if len(unread) > 1 else 'it'}")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _prodigy_takes_one_rate(self) -> "Recipe":
        if self.optimizer.name == "prodigy":  # it finds one step size for all parameters; its own check fails mid-run
            for key, value in (("lora.text_encoder_lr", self.lora.text_encoder_lr), ("full.text_encoder_lr", self.full.text_encoder_lr),
                               ("dreambooth.text_encoder_lr", self.dreambooth.text_encoder_lr if self.dreambooth else None)):  # fmt: skip
                if value is not None and value != self.optimizer.lr:
                    raise ValueError(f"{key} with prodigy: it takes one optimizer.lr for every parameter; remove {key}")
        return self

    @model_validator(mode="after")
    def _lora_settings_need_a_lora(self) -> "Recipe":
        """The lora: keys that shape a LoRA, its rates and its text-encoder layers: each with a LoRA that reads it."""
        uses_lora = self.trains_lora
        remedy = "dreambooth.adapter: lora" if self.method == "dreambooth" else "method lora"  # where no LoRA trains
        if self.lora.init_from and not uses_lora:
            raise ValueError(f"lora.init_from starts a LoRA, and method {self.method} trains none: remove it (or use {remedy})")
        for key in self.lora.changed(("conv_rank", "conv_alpha", "max_norm", "rank", "alpha", "dropout", "use_rslora", "use_dora", "target_modules")):
            if not uses_lora:
                raise ValueError(f"lora.{key} shapes a LoRA, and method {self.method} trains none: remove it (or use {remedy})")
        for key in ("loraplus_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            if getattr(self.lora, key) is None:
                continue
            if not uses_lora:
                raise ValueError(f"lora.{key} sets a LoRA's learning rates, and method {self.method} trains none: remove it (or use {remedy})")
            if self.optimizer.name == "prodigy":
                raise ValueError(f"lora.{key} with prodigy: it takes one optimizer.lr for every parameter; remove lora.{key}")
        trains_text_encoder_lora, switch = text_encoder_switch(self)
        if self.lora.changed(("text_encoder_target_modules",)) and not (uses_lora and trains_text_encoder_lora):
            raise ValueError("lora.text_encoder_target_modules picks the text encoder's LoRA layers, and no text-encoder LoRA trains: remove it "
                             f"(or {f'set {switch}: true' if uses_lora else f'use {remedy}'})")  # fmt: skip
        if self.lora.loraplus_text_encoder_lr_ratio is not None and not trains_text_encoder_lora:
            raise ValueError("lora.loraplus_text_encoder_lr_ratio is the text encoder's LoRA+ ratio, and no text encoder trains: remove it "
                             f"(or set {switch}: true)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _clip_skip_leaves_no_trained_layer_out(self) -> "Recipe":
        """A text encoder trained whole keeps every layer; clip skip would leave its last ones unused."""
        trains_text_encoder = self.full.train_text_encoder if self.method == "full" else (
            self.dreambooth is not None and self.dreambooth.adapter == "full" and self.dreambooth.train_text_encoder)
        if self.model.clip_skip > 1 and trains_text_encoder:  # its skipped layers would be saved untrained, or not at all
            raise ValueError("model.clip_skip above 1 leaves the text encoder's last layers out: train it with a LoRA, or set clip_skip to 1")
        return self

    @model_validator(mode="after")
    def _warmup_ends_within_the_run(self) -> "Recipe":
        """A warm-up as long as the run never reaches optimizer.lr."""
        # With train.max_epochs the trainer checks this once it knows the steps.
        if self.optimizer.scheduler != "constant" and self.train.max_epochs is None and self.optimizer.warmup_steps >= self.train.max_steps:
            raise ValueError(
                f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) must be below train.max_steps ({self.train.max_steps}): "
                f"the learning rate would never reach optimizer.lr; lower it with the run's length (optimizer.warmup_steps={self.train.max_steps // 10}, "
                "a tenth of it)"
            )
        return self

    @model_validator(mode="after")
    def _loss_mask_under_a_method_that_reads_it(self) -> "Recipe":
        """data.loss_mask weighs a denoising loss on latents, which controlnet's and vae's do not read."""
        if self.data.loss_mask.enabled and self.method in ("controlnet", "vae"):
            raise ValueError(f"data.loss_mask weighs the denoising loss of lora, full and dreambooth; method {self.method} does not use it: remove it")
        return self

    @model_validator(mode="after")
    def _vae_reads_no_denoising_settings(self) -> "Recipe":
        if self.method == "vae":  # it trains the autoencoder on reconstructions: no denoising loss, no prompts
            unused = [f"train.{key}" for key in self.train.changed(DENOISING_SETTINGS)]
            unused += ["validation.prompts"] if self.validation.prompts else []
            unused += ["validation.prompts_file"] if self.validation.prompts_file else []
            # The denoiser's target and the prompts' encoding: the saved pipeline's scheduler would claim a target its UNet never learned.
            unused += [f"model.{key}" for key in self.model.changed(("prediction_type", "zero_terminal_snr", "clip_skip", "max_token_length"))]
            # It reads no captions (finetune.data_check.train_inputs.data_configs): what gives or changes them is unread too.
            unused += [f"data.{key}" for key in self.data.changed(("caption", "caption_dropout", "shuffle_tags", "keep_tokens", "keep_tokens_separator", "tag_dropout"))]
            if unused:
                raise ValueError(f"method vae trains the autoencoder on reconstructions, so {', '.join(unused)} would do nothing: remove {'them' if len(unused) > 1 else 'it'}")
        return self

    @model_validator(mode="after")
    def _controlnet_settings_fit(self) -> "Recipe":
        """ControlNet empties captions its own way, and pairs validation conditioning images with prompts."""
        if self.method == "controlnet":
            if self.validation.prompts_unset and self.controlnet.validation_conditions:  # null samples pairs' captions with their own images
                raise ValueError("validation.prompts: null samples the first training pairs' captions, each with its own conditioning image; "
                                 "controlnet.validation_conditions needs prompts of its own: list validation.prompts (one serves every image; "
                                 "'' for none), or leave controlnet.validation_conditions empty")  # fmt: skip
            if self.data.caption_dropout:
                raise ValueError("method controlnet empties captions with controlnet.empty_prompt_share; set data.caption_dropout to 0")
            conditions, prompts = len(self.controlnet.validation_conditions), len(self.validation.all_prompts)
            if conditions and not prompts:
                raise ValueError("controlnet.validation_conditions needs validation.prompts (one prompt serves every image; '' for none)")
            if conditions > 1 and prompts > 1 and conditions != prompts:
                raise ValueError(
                    f"controlnet.validation_conditions has {conditions} images for {prompts} validation.prompts: "
                    "give one image per prompt, or one image (or one prompt) for all"
                )
        return self

    @model_validator(mode="after")
    def _class_batches_fit(self) -> "Recipe":
        """Class images are made only with prior preservation: otherwise the key is said to do nothing (recipe_warnings)."""
        generates = self.method == "dreambooth" and self.dreambooth is not None and self.dreambooth.prior_preservation
        if generates and (problem := class_batch_problem(self.dreambooth.class_generation.batch_size, self.data.resolution)):
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _sampler_fits_the_schedule(self) -> "Recipe":
        # Else an IndexError at the first validation, once the data check and the base's loading are done.
        if self.validation.sampler == "dpmpp_2m_karras" and self.model.zero_terminal_snr:
            raise ValueError(f"validation.sampler with model.zero_terminal_snr: {KARRAS_ON_ZERO_TERMINAL_SNR}")
        karras = [text for text in self.validation.all_prompts if self.validation.prompt_settings(text).sampler == "dpmpp_2m_karras"]
        if karras and self.model.zero_terminal_snr:
            raise ValueError(f"validation prompt '{karras[0]}' (its --ss) with model.zero_terminal_snr: {KARRAS_ON_ZERO_TERMINAL_SNR}")
        validation = self.validation
        unset = [""] if self.samples_unset_prompts else []  # prompts: null samples captions, found later, with the section's own settings
        for text in validation.all_prompts or unset:
            prompt = validation.prompt_settings(text)
            trailing = trailing_steps_problem(prompt.num_inference_steps) if self.model.zero_terminal_snr else None
            if problem := steps_problem(prompt.sampler or validation.sampler, prompt.num_inference_steps) or trailing:
                own = prompt.sampler is not None or prompt.num_inference_steps != validation.num_inference_steps  # its --ss or --s
                keys = "validation.num_inference_steps" + ("" if trailing else " with validation.sampler")
                raise ValueError(f"{f'validation prompt {text!r}' if own else keys}: {problem}")
        return self

    @model_validator(mode="after")
    def _validation_grid_fits(self) -> "Recipe":
        """The validation grid (samples/step-N.png) is drawable and opens again: every image of a validation is held in
        memory to draw it, and an image past PIL's decompression-bomb bound cannot be opened (finetune/data/image_bounds.py)."""
        validation, controlnet = self.validation, self.method == "controlnet"
        prompts = len(validation.all_prompts) or (unset_prompt_rows(self) if self.samples_unset_prompts else 0)  # at most, for prompts: null
        if not prompts:
            return self
        rows = max(prompts, len(self.controlnet.validation_conditions) if controlnet else 0)
        fix = "lower validation.images_per_prompt" + (" or list fewer validation.prompts" if rows > 1 else "")
        problem = grid_problem("validation grid", "validation.images_per_prompt", validation.images_per_prompt, rows, self.data.resolution,
                               1 if controlnet else 0, fix)  # fmt: skip
        if problem is not None:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _method_sections_under_their_method(self) -> "Recipe":
        """controlnet: and vae: are read by their own method only: a value of their own under another would do nothing
        (the reference recipes name them with their defaults)."""
        for section in ("controlnet", "vae"):
            changed = getattr(self, section).changed()
            if self.method != section and changed:
                raise ValueError(f"{section}.{changed[0]} does nothing with method {self.method}: remove it (or use method {section})")
        return self

    @model_validator(mode="after")
    def _text_encoder_settings_take_effect(self) -> "Recipe":
        """The text encoder's switch and rate are read from the method's own section only (controlnet and vae
        train none): another section's, or a rate for a text encoder left frozen, would do nothing."""
        own = self.text_encoder_section
        for section in ("lora", "full"):
            for key in ("train_text_encoder", "text_encoder_lr"):
                if section != own and getattr(getattr(self, section), key):
                    trains = f"its text encoder trains with {own}.train_text_encoder" if own else "it trains no text encoder"
                    raise ValueError(f"{section}.{key} does nothing with method {self.method} ({trains}): remove {section}.{key}")
        settings = getattr(self, own) if own else None
        if settings is not None and settings.text_encoder_lr is not None and not settings.train_text_encoder:
            raise ValueError(f"{own}.text_encoder_lr is the text encoder's rate, and it stays frozen: set {own}.train_text_encoder: true, or remove {own}.text_encoder_lr")
        return self

    @property
    def samples_unset_prompts(self) -> bool:
        """Whether the grids sample prompts of the training data, found once it is checked (validation.prompts: null)."""
        return self.validation.prompts_unset and self.method in UNSET_PROMPT_METHODS

    @property
    def trains_lora(self) -> bool:
        """Whether a LoRA trains: method lora, or DreamBooth with a LoRA adapter."""
        return self.method == "lora" or (self.dreambooth is not None and self.dreambooth.adapter == "lora")

    @property
    def text_encoder_section(self) -> str | None:
        """The section whose train_text_encoder and text_encoder_lr the run reads: the method's own (lora:, full:, and
        dreambooth:, which decides for its adapter); None for controlnet and vae, which train no text encoder."""
        return self.method if self.method in ("lora", "full", "dreambooth") else None

    def flat_settings(self) -> dict:
        """Every setting by its dotted key ("lora.rank"), as scalars and strings (what TensorBoard's hparams
        take, and what checkpoints keep to say what changed at a resume)."""
        flat = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                for key, child in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, child)
            elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
                for index, item in enumerate(value):  # sections in a list (dreambooth.concepts, data.folders): each setting by its own key
                    walk(f"{prefix}.{index}", item)
            elif isinstance(value, (int, float, str, bool)):
                flat[prefix] = value
            elif value is not None:
                flat[prefix] = str(value)

        walk("", self.model_dump(mode="json"))
        return flat

    def fingerprint(self) -> str:
        """A short hash of every setting, recorded in saved files so a result can be traced to its recipe."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]
