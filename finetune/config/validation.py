"""The `validation:` section: the prompts the grids (samples/step-N.png) draw, how they are drawn and when, and the
held-out images' loss.

`prompts: null` samples prompts about what trains, known once the data is checked (finetune/sampling/unset_prompts.py):
a recipe's example prompts ("a photo of a cat") show nothing of a creator's images.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field, PrivateAttr, field_validator, model_validator

from finetune.config.base import SamplingSteps, Section, Seed, UserPath
from finetune.sampling.prompt_options import PromptSettings, with_options
from finetune.sampling.samplers import DEFAULT_SAMPLER, SamplerName, sampler_named
from finetune.sampling.validation_prompts import read_prompts_file


class ValidationConfig(Section):
    # Each may end in sd-scripts' per-prompt options: "a dog --n blurry --d 7 --l 5 --s 30" (negative
    # prompt, seed, guidance scale, steps; finetune/sampling/prompt_options.py). null (the shipped recipes'): prompts of the
    # training data, found once it is checked (`fill_unset_prompts`); [] (where the key is left out): no grid.
    prompts: Optional[list[str]] = []
    # A text file of more prompts, one a line (sd-scripts' sample prompts file, options included; blank lines and # comments
    # skipped), sampled after `prompts`; read as the recipe loads (finetune/sampling/validation_prompts.py).
    prompts_file: Optional[UserPath] = None
    every_n_steps: int = Field(0, ge=0)  # 0: only at the end of training
    every_n_epochs: int = Field(0, ge=0)  # also at the end of every Nth epoch (sd-scripts' sample_every_n_epochs); 0: off
    at_start: bool = True  # also sample before the first step, for a before/after comparison
    num_inference_steps: SamplingSteps = 25
    guidance_scale: float = 7.5
    negative_prompt: Optional[str] = None  # e.g. "blurry, low quality"; for every prompt without its own --n
    images_per_prompt: int = Field(2, ge=1)
    seed: Seed = 0  # image k of a prompt uses seed + k (a prompt's --d replaces it)
    # The sampler the grids are drawn with, by the webui's names (finetune/sampling/samplers.py): judge a LoRA with the one you
    # will use. Each keeps the run's prediction type and noise schedule; ddim is what grids were drawn with before.
    sampler: SamplerName = DEFAULT_SAMPLER
    # Hold this many training images out of training and report the loss on them at each validation
    # (fixed noise and timesteps: it falls while the model generalises and turns up when it overfits). 0: off.
    loss_images: int = Field(0, ge=0)

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler_by_any_name(cls, sampler):
        """sd-scripts' and the webui's names too ("Euler a"), as `sample --sampler` and a prompt's --ss take them; any other
        is left to the Literal's error, which lists ours."""
        try:
            return sampler_named(sampler) if isinstance(sampler, str) else sampler
        except ValueError:
            return sampler

    @field_validator("prompts")
    @classmethod
    def _options_known(cls, prompts: list[str] | None) -> list[str] | None:
        for prompt in prompts or []:
            with_options(prompt, PromptSettings("", None, 0, 1.0, 1))  # raises on an unknown option or value
        return prompts

    _file_prompts: list[str] = PrivateAttr(default_factory=list)
    _unset_prompts: list[str] = PrivateAttr(default_factory=list)  # what `prompts: null` stands for, once the data is checked

    @model_validator(mode="after")
    def _prompts_file_read(self) -> "ValidationConfig":
        self._file_prompts = read_prompts_file(self.prompts_file) if self.prompts_file is not None else []
        return self

    @property
    def all_prompts(self) -> list[str]:
        """Every prompt the grids draw, one row each: `prompts` (or those `prompts: null` stands for), then the lines of `prompts_file`."""
        return [*(self._unset_prompts if self.prompts is None else self.prompts), *self._file_prompts]

    @property
    def prompts_unset(self) -> bool:
        """Whether the grids' prompts are left to the run (`prompts: null` and no prompts_file): the training data's."""
        return self.prompts is None and self.prompts_file is None

    def fill_unset_prompts(self, prompts: list[str]) -> None:
        """The prompts `prompts: null` samples: set by the run once its data is checked (finetune/sampling/unset_prompts.py)."""
        self._unset_prompts = list(prompts) if self.prompts_unset else []

    def prompt_settings(self, text: str) -> PromptSettings:
        """A validation prompt with its own options, the section's settings for the rest."""
        return with_options(text, PromptSettings(text, self.negative_prompt, self.seed, self.guidance_scale, self.num_inference_steps))
