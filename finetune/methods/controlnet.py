"""ControlNet (Zhang et al., 2023): steer a frozen Stable Diffusion with a conditioning image.

A trainable copy of the UNet's encoder (conv_in, down blocks, mid block) reads the noisy latents plus
the conditioning image (edges, a mask, a depth-like map), and its features enter the frozen UNet's
skip connections through "zero convolutions": 1x1 convs initialised to zero, as is the last conv of
the small network that embeds the conditioning image. So right after creation the UNet with the
ControlNet attached computes exactly what the UNet alone computes, and training starts from the base
model's behaviour instead of disturbing it.

- Only the ControlNet trains (fp32); UNet, VAE and text encoder stay frozen in the weight dtype.
  `controlnet.unlock_unet_decoder` is the paper's `sd_locked=False`: the UNet's decoder (up blocks and
  the output norm + conv) trains too and is saved as a UNet folder beside the ControlNet.
- `controlnet.only_mid_control`: only the mid-block residual reaches the UNet. The down-block zero
  convs are set to zero and frozen, so the saved ControlNet behaves the same in any diffusers pipeline.
- Data are triples (image, conditioning image, caption), read and checked by `finetune.controlnet.pairs` and
  served by `finetune.controlnet.data`. One crop and one flip are drawn per item from the (seed, epoch, index)
  generator and applied to both images; then a share of captions (`controlnet.empty_prompt_share`, 0.5 as in
  the paper) is emptied, so the model learns to read the conditioning image rather than the prompt.
  Conditioning images reach the ControlNet in [0, 1].
- Output: `output_dir/controlnet`, a diffusers `ControlNetModel` folder that
  `StableDiffusionControlNetPipeline` uses. Validation rows show conditioning | samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from finetune.checkpoints.run_files import CONTROLNET_DIR, UNET_DIR
from finetune.config import Recipe
from finetune.controlnet.data import ControlNetDataset, controlnet_collate
from finetune.controlnet.folder import conditioning_channels_problem
from finetune.controlnet.layout import RESUMED_LAYOUT, kept_layout, unknown_layout_problem
from finetune.controlnet.pairs import checked_pairs, paired_views, validation_conditions_problem, validation_conditions_warnings
from finetune.counts import counted
from finetune.data.images import open_rgb
from finetune.data.sources import Example
from finetune.data_check.starting_files import controlnet_to_load
from finetune.errors import FinetuneError
from finetune.methods.base import DiffusionMethod
from finetune.models.loading import freeze
from finetune.outputs.metadata import started_from
from finetune.outputs.pipeline_io import save_model_folder
from finetune.sampling.adapter_records import saved_model_metadata
from finetune.sampling.adapters_as_trained import adapters_prediction_type
from finetune.sampling.finite_images import VALIDATION_OVERFLOW
from finetune.sampling.inference import load_controlnet
from finetune.sampling.pipelines import build_pipeline, generate_with_settings
from finetune.sampling.unset_prompts import unset_prompt_items
from finetune.training.device_copy import to_device

STARTED_FROM = "controlnet_started_from"  # in a checkpoint's method state: the outputs' record of controlnet.pretrained, made when the run started
INHERITED_CONDITIONING = "controlnet_inherited_conditioning"  # in it too: the conditioning record taken from controlnet.pretrained
PRETRAINED_METADATA_KEY = "finetune.controlnet_pretrained"  # the outputs' metadata key of that record
# The UNet parts that train with unlock_unet_decoder (the original's output_blocks and out).
DECODER_PARTS = ("up_blocks", "conv_norm_out", "conv_out")


# ---------------------------------------------------------------------------------------------------
# The method


class ControlNetMethod(DiffusionMethod):
    name = "controlnet"
    feeding_another_model = ("controlnet",)  # its residuals, the UNet's inputs

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.settings = recipe.controlnet
        self.load_from = self.settings.pretrained  # controlnet.pretrained; a run's output folder it names becomes its controlnet/ in check_data
        self.controlnet: ControlNetModel | None = None
        self.started_from: str | None = None  # its record in the outputs (`start_metadata`)
        self.unknown_layout: tuple[Path, str] | None = None  # a resume's checkpoint that keeps no layout, and where it began
        self.inherited_conditioning: dict | None = None  # controlnet.pretrained's conditioning record, where the data records none

    def training_items(self) -> list[Example]:
        return [pair.image for pair in self.pairs]

    def recorded_data(self) -> dict[str, list]:
        return {**super().recorded_data(), "conditioning images": [pair.conditioning.digest or pair.conditioning.source for pair in self.pairs]}

    def data_metadata(self) -> dict[str, str]:
        """How `finetune make-conditions` made the conditioning images, if it did: `finetune sample` names it. Where the data
        folder records none, that of the ControlNet the run continues (`inherited_conditioning`)."""
        record = self._conditioning_record() or self.inherited_conditioning
        return {"finetune.conditioning": json.dumps(record)} if record else {}

    def _conditioning_record(self) -> dict | None:
        from finetune.controlnet.conditioning_records import data_folder_record

        return data_folder_record(self.recipe.data)

    def check_data(self) -> None:
        # What is cheap to check (a record make-conditions could not have written, the validation conditioning images,
        # controlnet.pretrained's folder) is said before the images are decoded, as `finetune train` says it.
        self._conditioning_record()
        if problem := validation_conditions_problem(self.recipe):
            raise FinetuneError(problem)
        self.start_lines += validation_conditions_warnings(self.recipe)
        if self.settings.pretrained is not None:
            self._check_pretrained(self.settings.pretrained)
        self.pairs, report = checked_pairs(self.recipe)
        self.data_reports = [report]

    def _check_pretrained(self, pretrained: str) -> None:
        """controlnet.pretrained, before any model loads: a controlnet run's output folder stands for its controlnet/
        (`load_from`); a file, a folder of something else, a ControlNet that works only with its own UNet, or a hub id
        not found is one line (`controlnet_to_load`). Its record in the outputs (`started_from`) is made here."""
        self.load_from = controlnet_to_load(pretrained)  # its folder, config and UNet checked without torch (finetune.data_check.starting_files)
        self.started_from = started_from(self.load_from)  # now, while a local folder is there to be told from a hub id
        recorded = self._recorded_by_its_run()
        # A type no model predicts (an edited record) is one line now, not advice to set model.prediction_type to it once loaded.
        adapters_prediction_type({f"controlnet.pretrained {pretrained}": recorded})
        from finetune.controlnet.conditioning_records import inherited_record

        self.inherited_conditioning = None if self._conditioning_record() else inherited_record(recorded)

    def training_data(self, accelerator):
        self.training_dataset = ControlNetDataset(
            self.pairs, self.recipe.data, self.recipe.seed, self.settings.empty_prompt_share, self.item_latent_cache(), self.held_out_items
        )
        return self.training_dataset, controlnet_collate

    # -- model --------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        unet = self.base.unet
        # Copy the encoder while the UNet is still fp32 (a copy of bf16-rounded weights would be worse).
        self.controlnet = self._load_or_create(unet)
        freeze(unet, self.weight_dtype)
        # The trainer moves only what trains (and the frozen encoders); the locked UNet goes where they are.
        unet.to(self.base.vae.device)
        self.controlnet.to(self.base.vae.device).requires_grad_(True).train()  # created/loaded in fp32
        if self.settings.only_mid_control:  # after loading: a controlnet.pretrained trained with down residuals adds none from here on
            with torch.no_grad():
                for block in self.controlnet.controlnet_down_blocks:
                    block.weight.zero_()
                    block.bias.zero_()
            self.controlnet.controlnet_down_blocks.requires_grad_(False)
        if self.settings.unlock_unet_decoder:
            unet.train()
            for part in DECODER_PARTS:
                getattr(unet, part).to(torch.float32).requires_grad_(True)
        if self.recipe.train.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()

    def _load_or_create(self, unet) -> ControlNetModel:
        pretrained = self.load_from
        if layout := (self.resumed_state or {}).get(RESUMED_LAYOUT):  # its weights are the checkpoint's, loaded next
            return ControlNetModel.from_config(layout)
        if pretrained is None:
            # Random init of the conditioning embedding from the global RNG, which the trainer seeded.
            controlnet = ControlNetModel.from_unet(unet)
            if self.unknown_layout and (problem := unknown_layout_problem(controlnet, *self.unknown_layout)):
                raise FinetuneError(problem)
            return controlnet
        recorded = self._recorded_by_its_run()
        self._check_trained_for_this_target(recorded)
        controlnet = load_controlnet(pretrained, self.base)  # as `finetune sample` loads one: in fp32, refused where it does not fit the UNet
        if (problem := conditioning_channels_problem(controlnet.config)) is not None:  # a hub id: its config is read only here
            raise FinetuneError(f"controlnet.pretrained {pretrained} {problem}")
        self.start_lines.append(self._start_line(recorded))
        if self.inherited_conditioning:
            self.start_lines.append(self._inherited_line())
        self.note_starting_target(recorded, f"controlnet.pretrained {self.settings.pretrained}")
        return controlnet

    def _recorded_by_its_run(self) -> dict:
        """What the run that trained controlnet.pretrained recorded (finetune_metadata.json); {} for a hub id."""
        return saved_model_metadata(Path(self.load_from)) if Path(self.load_from).is_dir() else {}

    def _check_trained_for_this_target(self, recorded: dict) -> None:
        """As lora.init_from's: a ControlNet trained for another target (its run's finetune.prediction_type) would start
        from what it did not learn, and the step-0 samples, read as this run's target, would be noise."""
        from finetune.models.init_from_record import check_same_target

        check_same_target("controlnet.pretrained", self.settings.pretrained, recorded.get("finetune.prediction_type"), self.base.noise_scheduler.config.prediction_type)

    def _start_line(self, recorded: dict) -> str:
        """Which ControlNet the run starts from, and what its run recorded of it (steps, conditioning kind), as
        lora.init_from's start is said: its outputs' steps are this run's. One that records no prediction type (a hub
        id's, or one trained elsewhere) is taken to be trained for the base's own, as ControlNets are made for a base: said."""
        from finetune.controlnet.conditioning_records import recorded_conditioning

        steps, made = recorded.get("finetune.steps"), recorded_conditioning(recorded)
        facts = [f"trained {counted(steps, 'step')}" if steps else "", f"on {made} conditioning images" if made else "",
                 "" if recorded.get("finetune.prediction_type") else f"no prediction type recorded, taken to be the base's ({self.base.pretrained_prediction_type})"]  # fmt: skip
        known = ", ".join(fact for fact in facts if fact)
        return f"starting from the ControlNet {self.settings.pretrained} (controlnet.pretrained)" + (f": {known}" if known else "")

    def _inherited_line(self) -> str:
        """Where the data folder records no conditioning kind: that the outputs record the one controlnet.pretrained does."""
        from finetune.controlnet.conditioning_records import conditioning_named

        made = conditioning_named(self.inherited_conditioning)  # checked as it was taken (conditioning_records.inherited_record)
        folder = self.recipe.data.image_dir or self.recipe.data.dataset
        data = f"the data folder {folder}" if folder else "the training data"
        return (f"{data} records no conditioning kind (no conditioning.json, which finetune make-conditions writes): the outputs "
                f"record controlnet.pretrained's, {made}, so finetune sample and the demo make and check conditions for them as for it")

    def resuming(self, checkpoint: Path, state: dict) -> None:
        super().resuming(checkpoint, state)
        if began := (state.get("recipe") or {}).get("controlnet.pretrained"):
            self.resumed_state[RESUMED_LAYOUT] = layout = kept_layout(checkpoint, self.resumed_state)
            self.unknown_layout = None if layout else (checkpoint, began)  # made from the UNet, as before, where the shapes are its
            # The first record; else (older checkpoints) their output's.
            self.started_from = self.resumed_state.get(STARTED_FROM) or saved_model_metadata(checkpoint / CONTROLNET_DIR).get(PRETRAINED_METADATA_KEY) or started_from(began)
            self.inherited_conditioning = self.resumed_state.get(INHERITED_CONDITIONING)  # a resume reads no controlnet.pretrained

    def checkpoint_state(self) -> dict:
        # A resume does not read controlnet.pretrained (finetune.models.start_weights): it builds that ControlNet's layout
        # (its config, which from_unet would not make) from this, and loads its weights from the checkpoint.
        if not self.started_from:  # made from the UNet: a resume makes it so again
            return {}
        inherited = {INHERITED_CONDITIONING: self.inherited_conditioning} if self.inherited_conditioning else {}
        return {RESUMED_LAYOUT: json.loads(self.controlnet.to_json_string()), STARTED_FROM: self.started_from, **inherited}

    def start_metadata(self) -> dict[str, str]:
        return {PRETRAINED_METADATA_KEY: self.started_from} if self.started_from else {}

    def trained_module_names(self) -> list[str]:
        return ["controlnet", "unet"] if self.settings.unlock_unet_decoder else ["controlnet"]

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {name: self.controlnet if name == "controlnet" else self.base.unet for name in self.trained_module_names()}

    def predict(self, modules, noisy_latents, timesteps, encoder_hidden_states, batch) -> torch.Tensor:
        conditioning = to_device(batch["conditioning_pixel_values"], noisy_latents.device)
        down, mid = modules["controlnet"](
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=conditioning,
            conditioning_scale=batch.get("conditioning_scale", 1.0),
            return_dict=False,
        )
        if self.settings.only_mid_control:
            down = [torch.zeros_like(residual) for residual in down]
        # In the frozen weights' dtype, as the UNet's own features. The step's autocast made them so, and accelerate no
        # longer casts them to fp32 (`feeding_another_model`): no kernel here, unless called outside autocast.
        down, mid = [residual.to(self.weight_dtype) for residual in down], mid.to(self.weight_dtype)
        unet = modules.get("unet", self.base.unet)
        return unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    # -- output -------------------------------------------------------------------------------------

    def save(self, output_dir: Path, modules, metadata: dict[str, str]) -> list[Path]:
        paths = [save_model_folder(modules["controlnet"], output_dir / CONTROLNET_DIR, metadata)]
        if "unet" in modules:
            paths.append(save_model_folder(modules["unet"], output_dir / UNET_DIR, metadata))
        return paths

    def pipeline(self, modules) -> StableDiffusionControlNetPipeline:
        return build_pipeline(
            self.base, unet=modules.get("unet"), pipeline_class=StableDiffusionControlNetPipeline, controlnet=modules["controlnet"],
            max_token_length=self.recipe.model.max_token_length, sampler=self.recipe.validation.sampler,
        )

    def validation_conditions(self) -> list[Image.Image]:
        """Conditioning views (resized, center-cropped) for validation: the recipe's images, or the
        first training examples' conditioning images, one per validation prompt (with validation.prompts: null, those of
        the pairs whose captions it samples)."""
        config = self.recipe.data.model_copy(update={"crop": "center", "random_flip": False})
        paths = self.settings.validation_conditions
        if paths:
            images = [open_rgb(Example(p, "", lambda p=p: Image.open(p)), colour_managed=False) for p in paths]
            return [paired_views(image, image, config, np.random.default_rng(0))[1] for image in images]
        if self.recipe.validation.prompts_unset:  # validation.prompts: null: the captions of the first pairs, each with its own image
            pairs = [self.pairs[index] for index in unset_prompt_items(self.recipe, self.training_items())]
        else:
            count = len(self.recipe.validation.all_prompts)
            # Each conditioning image once: data.folders repeats (and templates) list a pair several times in a row.
            distinct = list({pair.conditioning.source: pair for pair in self.pairs}.values())
            pairs = [distinct[i % len(distinct)] for i in range(count)]
        return [paired_views(open_rgb(p.image), open_rgb(p.conditioning, colour_managed=False), config, np.random.default_rng(0))[1] for p in pairs]

    def validation_images(self, modules) -> tuple[list[list[Image.Image]], list[str]]:
        """One row per (conditioning, prompt) pair: the conditioning image, then the samples."""
        settings = self.recipe.validation
        if not settings.all_prompts:
            return [], []
        conditions = self.validation_conditions()
        prompts = settings.all_prompts
        rows_count = max(len(conditions), len(prompts))
        conditions = conditions * rows_count if len(conditions) == 1 else conditions
        prompts = prompts * rows_count if len(prompts) == 1 else prompts
        pipeline = self.pipeline(modules)
        scale = self.settings.conditioning_scale
        options = [settings.prompt_settings(prompt) for prompt in prompts]  # each with its own --n, --d, --l, --s, --ss, if any
        # The ControlNet's residuals reach the UNet in autocast's dtype, as in training (`feeding_another_model`).
        samples = generate_with_settings(pipeline, options, settings.images_per_prompt, self.recipe.data.resolution,
                                         conditions=conditions, controlnet_conditioning_scale=scale, not_finite_cause=VALIDATION_OVERFLOW)  # fmt: skip
        rows = [[condition, *row] for condition, row in zip(conditions, samples)]
        labels = [prompt if scale == 1.0 else f"{prompt} (control x{scale:g})" for prompt in prompts]
        return rows, labels
