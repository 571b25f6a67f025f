"""DreamBooth (Ruiz et al., 2023): teach the model subjects, with prior preservation.

Each concept is a folder of a subject's images named by a prompt with a rare identifier ("a photo of
sks dog"). With prior preservation every batch also holds as many class images ("a photo of a dog"),
made by the frozen base model where the class folder has too few, and the loss is

    instance loss + prior_loss_weight x class loss,

so the model learns the subject without forgetting what the class looks like. The adapter is either
the full UNet or a LoRA (the `lora:` section), optionally with the text encoder; several concepts can
train in one run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from finetune.data_check.check import DataReport, checked_report
from finetune.data_check.check_record import recipe_record
from finetune.data_check.command import said_once
from finetune.dreambooth.class_image_names import is_generated_name
from finetune.dreambooth.class_image_plans import (
    ClassImagePlan, check_class_images, checked_own_class_images, class_image_plans, recipe_generation_record, unread_class_images_lines,
    unused_class_images_lines,
)
from finetune.config import Concept, Recipe
from finetune.console import say, warn
from finetune.counts import counted
from finetune.data.epoch_uses import expand_together
from finetune.data.sources import Example
from finetune.data_check.train_inputs import data_configs
from finetune.dreambooth.class_images import as_loaded_base, generate_class_images, generate_on_every_process, write_generation_record
from finetune.dreambooth.data import DreamBoothDataset, dreambooth_collate
from finetune.methods.base import DiffusionMethod
from finetune.methods.full import FullMethod
from finetune.methods.lora import LoRAMethod
from finetune.sampling.pipelines import build_pipeline
from finetune.training.step_losses import weighted


class DreamBoothMethod(DiffusionMethod):
    name = "dreambooth"

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        adapter_class = FullMethod if recipe.dreambooth.adapter == "full" else LoRAMethod
        self.adapter = adapter_class(recipe)  # its text encoder trains as dreambooth: says (`UNetMethod`)

    # -- data -----------------------------------------------------------------------------------

    def training_items(self) -> list[Example]:
        return [example for _, example in self.instances]  # each item: an instance with its class image

    def check_data(self) -> None:
        reports = [checked_report(config) for config in data_configs(self.recipe)]
        self.instances: list[tuple[int, Example]] = []
        for i, examples in enumerate(expand_together([report.usable for report in reports])):  # one epoch, bounded as a whole
            self.instances += [(i, example) for example in examples]
        self.data_reports += reports
        self._plan_class_images()
        said_once(self.data_reports)  # a folder two concepts share: its findings once, as check-data says them

    def _plan_class_images(self) -> None:
        """Each concept's class images: those a user brought are checked now, before the model loads and generates the rest."""
        self.class_plans: list[ClassImagePlan] = []
        planned: set[tuple[Path, str]] = set()
        plans = class_image_plans(self.recipe)
        self.start_lines += unread_class_images_lines([folder for folder, *_ in plans], self.recipe) + unused_class_images_lines(self.recipe, plans)
        for i, (folder, key, paths, missing) in enumerate(plans):
            if (folder.resolve(), key) in planned:  # concepts of one class folder and prompt share its images: made once
                missing = []
            planned.add((folder.resolve(), key))
            # The report `finetune train` made before torch loaded (finetune/data_check/checked_once.py), a copy of it: two
            # concepts sharing one folder label theirs.
            report = copy.copy(checked_own_class_images(self.recipe, i, folder, [p for p in paths if not is_generated_name(p)]))
            made = sum(1 for p in paths if is_generated_name(p) and p.is_file())  # by an earlier run: checked once generation is done
            if report is not None:
                report.label += f" (your own; {made} generated earlier, {len(missing)} to generate)"
                self.data_reports.append(report)  # printed with the instance images' summary
            else:
                self.start_lines.append(f"class images {folder}: {made} generated earlier, {len(missing)} to generate")
            self.class_plans.append(ClassImagePlan(folder, key, paths, missing, report.usable if report else []))

    def training_data(self, accelerator):
        class_images = [self._class_images(concept, plan, accelerator) for concept, plan in zip(self.recipe.dreambooth.concepts, self.class_plans)]
        self.training_dataset = DreamBoothDataset(self.instances, class_images, self.recipe, self.item_latent_cache(), self.held_out_items)
        return self.training_dataset, dreambooth_collate

    def recorded_data(self) -> dict[str, list]:
        class_images = [example for examples in self.training_dataset.class_examples for example in examples]
        return {**super().recorded_data(), "class images": [[example.digest or example.source, example.caption] for example in class_images]}

    def _check_class_images(self, paths: list[Path], concept: Concept, folder: Path) -> DataReport | None:
        """The generated class images' check, once they are made: those an earlier run made and checked are taken from the
        check's record while unchanged (a resume decodes none of its 100-300 a concept again), and the new ones kept in it."""
        record = recipe_record(self.recipe, make_folder=True)
        report = check_class_images(self.recipe, concept, folder, paths, record)
        record.save()
        return report

    def _class_images(self, concept: Concept, plan: ClassImagePlan, accelerator) -> list[Example]:
        """The concept's class images to train on: the user's own (checked in `check_data`), and those its plan is
        missing, generated now by the frozen base (on every process, each its share) and checked once made."""
        settings = self.recipe.dreambooth

        def generate() -> None:
            prompts = concept.class_prompts
            say(f"generating {counted(len(plan.missing), 'class image')} ({counted(len(prompts), 'prompt')}) in {plan.folder}")
            # The trainer has moved the VAE and text encoder to the device; the UNet only goes there at
            # accelerate's `prepare`, after the data is built: bring it along now.
            self.base.unet.to(self.base.vae.device)
            # The frozen base, sampled as it was trained (model.prediction_type and zero_terminal_snr change training's target).
            pipeline = build_pipeline(self.base, as_pretrained=True)
            if accelerator.process_index == 0:  # before the first image: an interrupted generation is recorded too
                write_generation_record(plan.folder, plan.key, recipe_generation_record(self.recipe, prompts))
            with as_loaded_base(self.base.unet, self.base.text_encoder), torch.random.fork_rng(devices=[]):
                generate_class_images(
                    pipeline, prompts, plan.folder, plan.key, plan.missing, settings.class_generation,
                    self.recipe.data.resolution, accelerator.process_index, accelerator.num_processes,
                )

        generate_on_every_process(accelerator, generate if plan.missing else None)  # a process's failure stops every one
        generated = self._check_class_images([p for p in plan.paths if is_generated_name(p)], concept, plan.folder)
        examples = plan.own + (generated.usable if generated else [])
        if len(examples) < len(plan.paths):  # data.skip_bad_images left some out: they are not replaced
            warn(
                f"{len(examples)} of {len(plan.paths)} class images in {plan.folder} are usable "
                "(the others were skipped as bad): remove those files and run again to generate replacements"
            )
        return examples

    # -- model: everything but the loss split is the adapter's ------------------------------------

    def configure_model(self) -> None:
        # The adapter only configures the model; encoding (and its caches) stay this method's.
        self.adapter.base, self.adapter.weight_dtype = self.base, self.weight_dtype
        self.adapter.configure_model()
        self.start_lines += self.adapter.start_lines  # e.g. the LoRA it starts from (lora.init_from)

    def trained_module_names(self):
        return self.adapter.trained_module_names()

    def trained_modules(self):
        return self.adapter.trained_modules()

    def parameter_groups(self):
        return self.adapter.parameter_groups()

    def started_as_pretrained(self):
        return self.adapter.started_as_pretrained()

    def predict(self, modules, noisy_latents, timesteps, encoder_hidden_states, batch):
        return self.adapter.predict(modules, noisy_latents, timesteps, encoder_hidden_states, batch)

    def combine_losses(self, per_sample: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        n = batch["num_instance"]
        instance_loss = per_sample[:n].mean()
        if per_sample.shape[0] == n:  # no prior preservation
            return {"loss": instance_loss, "instance_loss": instance_loss.detach()}
        class_loss = per_sample[n:].mean()
        loss = instance_loss + weighted(class_loss, self.recipe.dreambooth.prior_loss_weight)
        return {"loss": loss, "instance_loss": instance_loss.detach(), "class_loss": class_loss.detach()}

    def hold_weight_limits(self, modules):
        return self.adapter.hold_weight_limits(modules)

    def save(self, output_dir, modules, metadata):
        return self.adapter.save(output_dir, modules, metadata)

    def pipeline(self, modules):
        return self.adapter.pipeline(modules)
