"""The recipe's `train:` and `optimizer:` sections: the run's length, precision and loss, and the optimizer with its
schedule (finetune/optim/optimizers.py builds them)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import Field, field_serializer, field_validator, model_validator

from finetune.config.base import Section, UserPath
from finetune.errors import FinetuneError, refuse_a_file_in_the_way

# What only a denoising loss uses (the VAE method trains on reconstructions).
DENOISING_SETTINGS = ("snr_gamma", "debiased_estimation", "noise_offset", "noise_offset_random_strength", "multires_noise_iterations",
                      "input_perturbation", "loss", "min_timestep", "max_timestep", "cache_latents", "cache_text_embeddings")


# Bounds no real run reaches (a fine-tune trains some 10**3 to 10**5 steps; 10**8 at 10 steps a second is 4 months), so a
# typo is one line where the recipe loads: train.max_steps: 1.0e+14 or a gradient accumulation of 10**12 started a run that
# never ended, without a word. train.max_epochs is bounded by the steps it makes, once the data is read (finetune.training.run_length).
MAX_TRAIN_STEPS = 100_000_000
MAX_ACCUMULATION = 10_000  # micro-batches an optimizer step: 10,000 of batch 1 are a step of 10,000 images


class TrainConfig(Section):
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(1000, ge=1)  # optimizer steps; null with max_epochs
    # The length in epochs instead, as sd-scripts' max_train_epochs counts it (an epoch uses each image its
    # folder's repeats times); the run turns it into optimizer steps once the data is read.
    max_epochs: Optional[int] = Field(None, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # Channels-last (NHWC) memory format for the UNet, VAE and ControlNet: the layout tensor-core and
    # oneDNN convolutions prefer, so no transposes around every conv. Same math, same loss.
    channels_last: bool = False
    max_grad_norm: Optional[float] = Field(1.0, ge=0)  # null or 0 (as sd-scripts): no clipping; a negative norm would flip the gradients
    # Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's value, None disables it.
    snr_gamma: Optional[float] = Field(None, gt=0)  # 0 would weigh every loss 0 (nothing trains), below 0 climb it
    # Debiased estimation (Yu et al. 2024, sd-scripts' debiased_estimation_loss): weigh each timestep's
    # loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), so low-noise steps count less. With snr_gamma, both apply.
    debiased_estimation: bool = False
    # Offset noise (Guttenberg 2023) helps very dark/bright images; 0.05-0.1 is typical.
    noise_offset: float = 0.0
    # sd-scripts' noise_offset_random_strength: each micro-batch's offset is noise_offset x a uniform draw in [0, 1), so
    # the model meets offsets of every strength up to noise_offset rather than one.
    noise_offset_random_strength: bool = False
    # Multi-resolution noise (sd-scripts' multires_noise_*): noise drawn at up to this many scales (full
    # size, then ever coarser) is added, level i weighed by discount**i; 6-10 with discount 0.3 are typical. 0: off.
    multires_noise_iterations: int = Field(0, ge=0)
    multires_noise_discount: float = Field(0.3, gt=0, le=1)
    # Input perturbation (Ning et al. 2023; sd-scripts' ip_noise_gamma): extra noise on the model's input
    # that its target does not include, against exposure bias; 0.1 is typical. 0: off.
    input_perturbation: float = Field(0.0, ge=0)
    # huber: the scheduled pseudo-Huber loss (Khrapov et al. 2024), less pulled by a few odd images;
    # huber_c is its threshold at high noise (it rises to 1, i.e. MSE, at low noise).
    loss: Literal["mse", "huber"] = "mse"
    huber_c: float = Field(0.1, gt=0, le=1)
    # Train on timesteps min_timestep <= t < max_timestep only (None: up to the model's 1000).
    min_timestep: int = Field(0, ge=0)
    max_timestep: Optional[int] = Field(None, ge=1)
    allow_tf32: bool = True  # TF32 for fp32 matmuls and convolutions on Ampere and newer GPUs (off: full fp32)
    # Keep an exponential moving average of the trained weights (finetune/training/ema.py) and sample and save
    # it instead of the last step's weights; 0.999-0.9999 for full fine-tunes. None: off.
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)
    # Compute frozen encoders' outputs once per distinct input (see finetune/data/cache.py): VAE posteriors
    # keyed by the image's content and view (crop, flip, size), text hidden states by caption. The
    # same loss as uncached (in bf16 to rounding); a cached view is not decoded again.
    cache_latents: bool = False
    cache_text_embeddings: bool = False  # ignored when the text encoder trains
    cache_dir: Optional[UserPath] = None  # None: in memory for this run; a folder: also on disk, reused by later runs

    @field_validator("max_steps", "max_epochs")
    @classmethod
    def _a_run_that_ends(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_TRAIN_STEPS:
            raise ValueError(f"must be at most {MAX_TRAIN_STEPS:,} (10 a second is some 4 months; more is a typo, not a fine-tune): lower it")
        return value

    @field_validator("gradient_accumulation_steps")
    @classmethod
    def _a_step_that_ends(cls, value: int) -> int:
        if value > MAX_ACCUMULATION:
            raise ValueError(f"must be at most {MAX_ACCUMULATION:,} micro-batches a step (each optimizer step trains them all): lower it, or raise train.batch_size")
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_the_default_steps(cls, data):
        if isinstance(data, dict) and data.get("max_epochs") is not None and "max_steps" not in data:
            return {**data, "max_steps": None}  # so the recipe as run (recipe_as_run.yaml) says null, and loads again
        return data

    @field_validator("cache_dir")
    @classmethod
    def _a_folder(cls, value: Optional[str]) -> Optional[str]:
        # Said at the recipe's loading: the cache folder is first made once the models are loaded, to name it by its encoder.
        if value is not None:
            try:
                refuse_a_file_in_the_way(Path(value).absolute(), "the cached encodings (or remove the key to cache in memory)")
            except FinetuneError as err:  # named by its key, as the recipe's other problems are
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _settings_take_effect(self) -> "TrainConfig":
        if (self.max_steps is None) == (self.max_epochs is None):
            raise ValueError(
                f"train.max_steps ({self.max_steps}) and train.max_epochs ({self.max_epochs}) both set the run's length: "
                "keep one (set the other to null)" if self.max_steps else
                "train.max_steps is null: set it, or train.max_epochs"
            )  # fmt: skip
        if self.cache_dir and not (self.cache_latents or self.cache_text_embeddings):
            raise ValueError("train.cache_dir keeps cached encodings, but nothing is cached: set train.cache_latents (or cache_text_embeddings) to true, or remove cache_dir")
        # A value of their own for these would do nothing (the reference recipes name them with their defaults).
        if self.loss != "huber" and self.changed(["huber_c"]):
            raise ValueError(f"train.huber_c ({self.huber_c:g}) is the pseudo-Huber loss's threshold: set train.loss: huber, or remove huber_c")
        if self.noise_offset_random_strength and not self.noise_offset:
            raise ValueError("train.noise_offset_random_strength draws the strength of offset noise, which is off: set train.noise_offset (e.g. 0.1), or remove it")
        if not self.multires_noise_iterations and self.changed(["multires_noise_discount"]):
            raise ValueError("train.multires_noise_discount weighs multi-resolution noise, which is off: set train.multires_noise_iterations (e.g. 6), or remove the discount")
        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ValueError(f"train.min_timestep ({self.min_timestep}) must be below train.max_timestep ({self.max_timestep})")
        return self


def timestep_range_problem(train: TrainConfig, num_train_timesteps: int) -> str | None:
    """Why train.min_timestep..max_timestep holds none of a base's training timesteps (its scheduler's), or None."""
    high = num_train_timesteps if train.max_timestep is None else train.max_timestep
    if high > num_train_timesteps:
        return f"train.max_timestep {high} is beyond the base model's {num_train_timesteps} training timesteps: set at most {num_train_timesteps}"
    if train.min_timestep >= high:
        return f"train.min_timestep {train.min_timestep} leaves no timestep below the base model's {num_train_timesteps}: set it lower"
    return None


class OptimizerConfig(Section):
    # SimpleTuner's and diffusers' SDXL scripts' --optimizer adamw_bf16 / prodigy, written as the section
    plain_value_hint: ClassVar[str] = ("optimizer is a section, not {value!r}: name the optimizer with optimizer.name "
                                       "(adamw, adamw8bit, paged_adamw8bit, lion8bit, adafactor or prodigy)")  # fmt: skip
    # adamw8bit, paged_adamw8bit and lion8bit come from bitsandbytes (8-bit states for large tensors);
    # adafactor keeps factored second moments only (the smallest state); prodigy finds its own step size.
    name: Literal["adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "adafactor", "prodigy"] = "adamw"
    lr: float = Field(1e-4, gt=0)  # prodigy: a multiplier of the step size it finds, near 1.0
    weight_decay: float = Field(1e-2, ge=0)
    betas: Optional[tuple[float, float]] = None  # null: the optimizer's own (OWN_BETAS)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"] = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)
    # cosine_with_restarts: the cosine decays to 0 this many times after the warm-up, each cycle starting again at
    # optimizer.lr (sd-scripts' lr_scheduler_num_cycles, diffusers' lr_num_cycles; their hard restarts).
    num_cycles: int = Field(1, ge=1)

    @field_validator("warmup_steps", mode="before")
    @classmethod
    def _steps_not_a_share(cls, value):
        # sd-scripts reads an lr_warmup_steps below 1 as a share of the run: it was "a number with a fractional part"
        if isinstance(value, float) and 0 < value < 1:
            raise ValueError(f"counts steps (sd-scripts reads {value:g} as a share of the run): write that share of train.max_steps, "
                             f"e.g. {round(value * 1000)} for a run of 1000 steps")  # fmt: skip
        return value

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, value):
        # Else [0.9] said "missing required key 'optimizer.betas.1'", and [0.9, 0.99, 0.999] "tuple should have at most 2 items".
        if isinstance(value, (list, tuple)) and len(value) != 2:
            raise ValueError("give two betas, the first and second moments' decay, e.g. [0.9, 0.999] (or null for the optimizer's own)")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_below_one(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError("each beta must be at least 0 and below 1 (the moments' decay)")
        return value

    @property
    def betas_in_use(self) -> tuple[float, float]:
        """The recipe's betas, else the optimizer's own."""
        return tuple(self.betas) if self.betas is not None else OWN_BETAS.get(self.name, ADAMW_BETAS)

    @field_serializer("betas")
    def _dump_betas_in_use(self, betas: tuple[float, float] | None) -> tuple[float, float]:
        # The saved recipe_as_run.yaml and a checkpoint's settings say which betas trained (a resume compares them).
        return self.betas_in_use

    @model_validator(mode="after")
    def _prodigy_multiplier(self) -> "OptimizerConfig":
        if self.name == "prodigy" and self.lr < 0.1:  # 1e-4, as for AdamW, would leave it all but still
            raise ValueError(f"optimizer.lr with prodigy multiplies the step size it finds: set it near 1.0 (got {self.lr:g})")
        if self.scheduler != "cosine_with_restarts" and self.changed(["num_cycles"]):  # diffusers' other schedules do not read it
            raise ValueError(f"optimizer.num_cycles ({self.num_cycles}) restarts scheduler cosine_with_restarts only: set optimizer.scheduler: "
                             "cosine_with_restarts, or remove num_cycles")  # fmt: skip
        if self.scheduler == "constant" and self.warmup_steps:  # diffusers' constant schedule has no warm-up
            raise ValueError(f"optimizer.warmup_steps ({self.warmup_steps}) does nothing with scheduler constant: use constant_with_warmup, or set warmup_steps: 0")
        # A value of one's own for what the optimizer does not read would do nothing (the shipped recipes name them with their defaults).
        keys, reason = UNREAD_OPTIMIZER_SETTINGS.get(self.name, ((), ""))
        for key in self.changed(keys):
            if key == "betas" and self.betas == ADAMW_BETAS:
                continue  # what recipes named before betas defaulted to the optimizer's own
            raise ValueError(f"optimizer.{key} does nothing with optimizer.name {self.name} ({reason}): remove it")
        return self


# Each optimizer's own betas (its library's defaults), for a recipe that names none. AdamW's were everyone's,
# which gave Lion (0.9, 0.99 in bitsandbytes and its paper) a second beta of 0.999.
ADAMW_BETAS = (0.9, 0.999)  # torch's AdamW, bitsandbytes' 8-bit AdamWs, Prodigy
OWN_BETAS = {"lion8bit": (0.9, 0.99)}

# What an optimizer does not read of the section (finetune/optim/optimizers.py), and why.
UNREAD_OPTIMIZER_SETTINGS = {
    "adafactor": (("betas", "eps"), "it keeps no first moment, and epsilons of its own"),
    "lion8bit": (("eps",), "Lion divides by no second moment, so it has no epsilon"),
}
