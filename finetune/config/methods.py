"""The sections of each method: `lora:`, `full:`, `vae:`, `dreambooth:` and `controlnet:`."""

from __future__ import annotations

from typing import Iterable, Literal, Optional, Union

from pydantic import Field, PrivateAttr, field_validator, model_validator

from finetune.config.base import Repeats, SamplingSteps, Section, Seed, Share, UserPath
from finetune.data.image_bounds import CLASS_BATCH_DEFAULT, MAX_CLASS_IMAGES

# A text-encoder LoRA's layers by default (each CLIP layer's attention projections), and all it may adapt: those and
# the layer's MLP, which sd-scripts' LoRA adapts too.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODER_LAYERS = (*TEXT_ENCODER_TARGETS, "fc1", "fc2")
# lora.alpha unset with rsLoRA: one alpha at every rank, as the rsLoRA paper scales (alpha / sqrt(rank) shrinks as the
# rank grows); an alpha following the rank would scale by sqrt(rank) instead, larger the higher the rank.
RSLORA_ALPHA = 16.0


class LoRAConfig(Section):
    rank: int = Field(16, ge=1)
    # The LoRA update is scaled by alpha / rank; saved with the weights so strength is preserved. None (unset): the rank,
    # a scale of 1 at any rank, as diffusers' training examples and SimpleTuner default it (sd-scripts' default is 1);
    # with rsLoRA RSLORA_ALPHA. Filled in as the recipe loads, so the recipe as run and every saved file record it.
    alpha: Optional[float] = Field(None, gt=0)
    # peft's lora_dropout: dropout on each adapted layer's input to its LoRA (sd-scripts' network_dropout drops the down
    # projection's output instead; its rank_dropout and module_dropout have no key here).
    dropout: float = Field(0.0, ge=0, lt=1)
    # rsLoRA (Kalajdzievski 2023): scale by alpha / sqrt(rank) instead of alpha / rank, so higher ranks
    # keep learning at one learning rate. Saved in the metadata; every loader here and diffusers honour it.
    use_rslora: bool = False
    # DoRA (Liu et al. 2024; peft's use_dora): each adapted layer also learns one magnitude per output channel,
    # W' = m * (W + scale * up @ down) / ||W + scale * up @ down|| (the norm of each output channel's row).
    use_dora: bool = False
    # Names of UNet submodules to adapt: attention projections by default; add "proj_in", "proj_out",
    # "ff.net.0.proj", "ff.net.2", "conv1", "conv2" for feed-forward and conv layers.
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    # LoCon (sd-scripts' conv_dim and conv_alpha): the rank and alpha of the 3x3 convolutions among the
    # targets (the ResNets' conv1 and conv2, the down- and upsamplers' conv), often lower than the rest's
    # for style LoRAs. None: lora.rank; conv_alpha None: the other layers' scale (alpha x conv_rank / rank;
    # with rsLoRA alpha x sqrt(conv_rank / rank)); sd-scripts' default is 1, so set it to repeat one of its runs.
    conv_rank: Optional[int] = Field(None, ge=1)
    conv_alpha: Optional[float] = Field(None, gt=0)
    # Also a LoRA on the text encoder's attention projections (method lora; DreamBooth has its own switch).
    # It learns new words' meanings faster; text embeddings are then not cached.
    train_text_encoder: bool = False
    # The text encoder's layers that LoRA adapts: its attention projections by default; add "fc1", "fc2" (each
    # CLIP layer's MLP) to train as sd-scripts' LoRA does, or to start (init_from) from one of its files.
    text_encoder_target_modules: list[str] = Field(list(TEXT_ENCODER_TARGETS), min_length=1)
    text_encoder_lr: Optional[float] = Field(None, gt=0)  # None: the same as optimizer.lr; sd-scripts users often halve it
    # Start from a trained LoRA instead of a no-op (sd-scripts' network_weights): a .safetensors file in our,
    # diffusers' or sd-scripts' layout, or a training folder; same rank and target layers as this recipe.
    init_from: Optional[UserPath] = None
    # LoRA+ (Hayou et al., 2024; sd-scripts' loraplus_lr_ratio): the up (B) matrices learn this many times
    # faster than the down (A) ones, which the paper finds trains faster and better (it uses 16). None: off.
    loraplus_lr_ratio: Optional[float] = Field(None, gt=0)
    # The text encoder's LoRA+ ratio, where it should differ (sd-scripts' loraplus_text_encoder_lr_ratio,
    # e.g. 4 with 16 for the UNet); None: loraplus_lr_ratio.
    loraplus_text_encoder_lr_ratio: Optional[float] = Field(None, gt=0)
    # Max-norm regularization (sd-scripts' scale_weight_norms, often 1.0): after each step, a layer whose
    # update (alpha/rank x up @ down) has a norm above this is scaled back to it, so none over-trains. None: off.
    max_norm: Optional[float] = Field(None, gt=0)

    @field_validator("text_encoder_target_modules")
    @classmethod
    def _clip_layers(cls, targets: list[str]) -> list[str]:
        # The six Linear layers of a CLIP layer: the ones ComfyUI, Forge and the webui read a kohya LoRA's text encoder keys of.
        if unknown := [target for target in targets if target not in TEXT_ENCODER_LAYERS]:
            raise ValueError(f"lora.text_encoder_target_modules: '{unknown[0]}' is no text-encoder layer a LoRA adapts; pick from {', '.join(TEXT_ENCODER_LAYERS)}")
        # In one order, whatever the recipe's: a resume compares the list, and the same layers train in any order.
        return [layer for layer in TEXT_ENCODER_LAYERS if layer in targets]

    # Whether lora.alpha was left unset (filled in from the rank): a resume takes its checkpoint's alpha then
    # (finetune.checkpoints.resumed_alpha), where a recipe's own alpha is the user's to change.
    _alpha_unset: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _alpha_follows_rank(self) -> "LoRAConfig":
        if self.alpha is None:
            self._alpha_unset = True
            self.alpha = self.unset_alpha()
        return self

    def unset_alpha(self) -> float:
        """What lora.alpha is where the recipe leaves it unset: the rank (a scale of 1), with rsLoRA RSLORA_ALPHA."""
        return RSLORA_ALPHA if self.use_rslora else float(self.rank)

    @property
    def alpha_unset(self) -> bool:
        return self._alpha_unset

    def changed(self, keys: Iterable[str] | None = None) -> list[str]:
        """As every section's, with an alpha at what an unset one is counted at its default (a recipe may name it so)."""
        return [key for key in super().changed(keys) if not (key == "alpha" and self.alpha == self.unset_alpha())]

    @model_validator(mode="after")
    def _conv_alpha_needs_a_conv_rank(self) -> "LoRAConfig":
        if self.conv_alpha is not None and self.conv_rank is None:
            raise ValueError("lora.conv_alpha scales the 3x3 conv layers' LoRA, which lora.conv_rank sets: set conv_rank too (e.g. 8), or remove conv_alpha")
        return self

    def conv_rank_alpha(self) -> tuple[int, float]:
        """The 3x3 convolutions' rank and alpha (the rest's, where conv_rank is not set)."""
        if self.conv_rank is None:
            return self.rank, self.alpha
        if self.conv_alpha is not None:
            return self.conv_rank, self.conv_alpha
        # The same scale as the other layers: alpha/rank, or with rsLoRA alpha/sqrt(rank).
        share = self.conv_rank / self.rank
        return self.conv_rank, self.alpha * (share**0.5 if self.use_rslora else share)


class FullConfig(Section):
    """`method: full`: every UNet weight trains (and the text encoder, if asked)."""

    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = Field(None, gt=0)  # None: the same as optimizer.lr


class VAEConfig(Section):
    """`method: vae`: train the autoencoder itself (pretraining a base model from scratch)."""

    # The weights below are at least 0: a negative one would climb its term.
    # Weight of the KL term that keeps latents near N(0, 1), as in the latent diffusion paper's KL-f8.
    kl_weight: float = Field(1.0e-6, ge=0)
    # L1 reconstruction is sharper than L2 for edges; both are summed with these weights.
    l1_weight: float = Field(1.0, ge=0)
    l2_weight: float = Field(1.0, ge=0)
    # Pixels far from the image's median colour weigh up to 1 + salience_weight times more in the
    # reconstruction loss, so a small object's colour is not outvoted by its background (0: plain mean).
    salience_weight: float = Field(0.0, ge=0)
    # Weight of the perceptual term (0: off) and the toy-world classifier file whose features define it.
    perceptual_weight: float = Field(0.0, ge=0)
    perceptual_network: Optional[UserPath] = None  # None: the shipped finetune/assets/toyworld_perceptual.safetensors

    @model_validator(mode="after")
    def _perceptual_network_is_used(self) -> "VAEConfig":
        if self.perceptual_network is not None and not self.perceptual_weight:
            raise ValueError("vae.perceptual_network does nothing with vae.perceptual_weight 0: set perceptual_weight (e.g. 0.1), or remove perceptual_network")
        return self


class ClassImageGeneration(Section):
    """How missing class images are generated with the frozen base model (DreamBooth prior preservation)."""

    num_inference_steps: SamplingSteps = 25
    guidance_scale: float = 7.5
    batch_size: int = Field(CLASS_BATCH_DEFAULT, ge=1)  # at most MAX_CLASS_BATCH_PIXELS a call (the Recipe checks it with data.resolution)
    seed: Seed = 0
    negative_prompt: Optional[str] = None


class Concept(Section):
    """One subject to learn: its images, the prompt that names it, and the class it belongs to."""

    instance_dir: UserPath
    # With a rare identifier, e.g. "a photo of sks dog"; not needed with use_captions (it would be unused).
    instance_prompt: Optional[str] = None
    # Read each image's .txt/metadata caption instead of instance_prompt.
    use_captions: bool = False
    # e.g. "a photo of a dog"; required with prior preservation. A list of prompts ("a photo of a dog
    # on grass", "a photo of a small dog", ...) spreads the prior over the prompts you will use:
    # generated class image k comes from prompt k mod len(list) and trains with it.
    class_prompt: Union[str, list[str], None] = None
    # Folder of class images; missing ones are generated there. Default: <output_dir>/class_images/concept-<n>.
    class_dir: Optional[UserPath] = None
    # With data.loss_mask on: false trains this concept's images whole, with no masks (a style concept).
    loss_mask: bool = True
    # Uses of each image per epoch, to balance concepts of few and many images (kohya's 10_name folder prefix).
    repeats: Repeats = Field(1, ge=1)

    @model_validator(mode="after")
    def _a_prompt_or_captions(self) -> "Concept":
        if not self.use_captions and not self.instance_prompt:
            raise ValueError("set instance_prompt (e.g. 'a photo of sks dog'), or use_captions: true to train with each image's caption")
        return self

    @field_validator("instance_dir", mode="before")  # before UserPath's own, more general, line
    @classmethod
    def _a_folder(cls, value: str) -> str:
        if isinstance(value, str) and not value.strip():  # "" is no folder: read as a dataset that is not there, a traceback
            raise ValueError("is empty: give the folder of this concept's images")
        return value

    @field_validator("class_prompt", mode="before")
    @classmethod
    def _a_prompt_or_prompts(cls, value):
        # Else pydantic names the union's member as a key ('class_prompt.str') and asks for a string only.
        if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(p, str) for p in value)):
            return value
        raise ValueError("write a prompt or a list of prompts, quoted where YAML would read a number or yes/no")

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
    num_class_images: int = Field(100, ge=0)  # per concept, at most MAX_CLASS_IMAGES
    class_generation: ClassImageGeneration = ClassImageGeneration()
    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = Field(None, gt=0)  # None: the same as optimizer.lr

    @field_validator("concepts")
    @classmethod
    def _at_least_one(cls, value: list) -> list:
        if not value:
            raise ValueError("list at least one concept (instance_dir and instance_prompt)")
        return value

    @field_validator("num_class_images")
    @classmethod
    def _nameable(cls, value: int) -> int:
        if value > MAX_CLASS_IMAGES:
            raise ValueError(f"must be at most {MAX_CLASS_IMAGES:,} per concept (generated class images are numbered in 5 digits): lower it")
        return value

    @model_validator(mode="after")
    def _class_images_to_preserve_with(self) -> "DreamBoothConfig":
        if self.prior_preservation and self.num_class_images < 1:
            raise ValueError("dreambooth.num_class_images must be at least 1 with prior preservation (or set prior_preservation: false)")
        return self


class ControlNetConfig(Section):
    """`method: controlnet` (Zhang et al., 2023): a zero-initialised trainable copy of the UNet encoder
    steers the frozen UNet with a conditioning image (edges, a mask, a depth-like map)."""

    # An existing diffusers ControlNet folder to continue from; None: copy the UNet's encoder.
    pretrained: Optional[UserPath] = None
    # Datasets: the column holding the conditioning image (where this default is missing, `conditioning`: what datasets
    # names a folder's conditioning_file_name). Folders: the metadata.jsonl key naming its file,
    # read where a row has no conditioning_file_name (diffusers' examples write conditioning_image).
    conditioning_column: str = "conditioning_image"
    # Share of training captions replaced by "" (0.5 in the ControlNet paper: learn to read the image).
    empty_prompt_share: Share = 0.5
    # Strength of the control in validation samples (training always uses 1.0).
    conditioning_scale: float = 1.0
    # Add only the mid-block residual to the UNet; the down-block zero convs stay zero and frozen.
    only_mid_control: bool = False
    # The paper's sd_locked=False: also train the UNet's decoder (up blocks, conv_norm_out, conv_out).
    unlock_unet_decoder: bool = False
    # Conditioning images for validation rows, paired with validation.prompts (one of them may have
    # length 1 and is then used for every row). Empty: the first training examples' conditioning images.
    validation_conditions: list[UserPath] = []
