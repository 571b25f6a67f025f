"""The base of every recipe section (unknown keys are rejected, assignments are validated) and the
value types several sections share."""

from __future__ import annotations

import os
import re
import types
import typing
from typing import Annotated, ClassVar, Iterable, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from finetune.data.image_bounds import MAX_RESOLUTION, RESOLUTION_BOUND
from finetune.sampling.prompt_options import MAX_STEPS


class Section(BaseModel):
    # inf and nan, which YAML reads as floats (.inf, .nan), would train NaNs (a learning rate, an alpha, a noise offset).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    # What to write instead, when a user gives a plain value for the whole section (data.bucketing=true,
    # sd-scripts' enable_bucket habit); {value!r} is the value. None: that it is a section.
    plain_value_hint: ClassVar[str | None] = None
    # How a section without an `enabled` key is switched on, said for `enabled` written there (data.bucketing has one,
    # so data.loss_mask.enabled was said to belong to data.bucketing). None: its keys are listed.
    switched_by: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _a_section(cls, value):
        if value is None:  # `lora:` with every key under it commented out (pydantic would name the class, LoRAConfig)
            raise ValueError("this section has no keys (all commented out?): give it keys, indented under it, or remove its line")
        if not isinstance(value, (dict, cls)):  # pydantic would name the class ("instance of DataConfig")
            raise ValueError(cls.plain_value_hint.format(value=value) if cls.plain_value_hint else "this is a section: write its keys, indented under it")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value, info: ValidationInfo):
        # Pydantic's lax mode reads true as 1 and false as 0, so `train.max_steps: true` trained one step and
        # `checkpoint.keep_last: no` (YAML 1.1's false) kept every checkpoint. Every number field, in every section.
        if _a_boolean_for_a_number(value, cls.model_fields[info.field_name].annotation):
            raise ValueError("takes a number; YAML reads an unquoted yes/no/on/off/true/false as a boolean: write a number")
        return value

    def changed(self, keys: Iterable[str] | None = None) -> list[str]:
        """The keys (of `keys`, else all) set to other than their defaults: a section a recipe leaves out, or
        names with its defaults (as the shipped recipes do), changed none."""
        fields = type(self).model_fields
        return [key for key in (fields if keys is None else keys) if getattr(self, key) != fields[key].get_default(call_default_factory=True)]


def _a_boolean_for_a_number(value, annotation) -> bool:
    """Whether `value` is a bool, or a list holding one, where `annotation` takes numbers: int, float, a Literal
    of numbers (model.max_token_length), their Annotated and Optional forms, and tuples or lists of them (optimizer.betas)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:  # PixelSize, Resolution, Share, Seed, SamplingSteps
        return _a_boolean_for_a_number(value, args[0])
    if origin in (Union, types.UnionType):  # Optional[int]; a union that also takes a bool would be left alone
        return bool not in args and any(_a_boolean_for_a_number(value, member) for member in args)
    if origin in (tuple, list):
        numbers = all(_a_boolean_for_a_number(True, arg) for arg in args if arg is not Ellipsis)
        return numbers and isinstance(value, (list, tuple)) and any(isinstance(item, bool) for item in value)
    numbers = annotation in (int, float) or (origin is Literal and all(type(choice) in (int, float) for choice in args))
    return isinstance(value, bool) and numbers


def _multiple_of_8(value: int) -> int:
    if value <= 0 or value % 8 != 0:
        raise ValueError("must be a positive multiple of 8 (the VAE downsamples by 8)")
    return value


def _between_0_and_1(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


# An epoch is listed whole, each image its repeats times, and shuffled whole each epoch (torch.randperm(n).tolist(),
# finetune/data/batches.py): 10 million uses is some 550 MB in each process (measured: the list and its shuffle) and 10 million steps at batch 1, longer
# than any fine-tune; repeats of 10**12 (a typo) were listed until memory ran out (8 TB), without a word. The whole epoch is checked when
# the data is read (finetune/data/epoch_uses.py); one folder's or concept's repeats already here.
MAX_USES_PER_EPOCH = 10_000_000


def _countable_repeats(value: int) -> int:
    if value > MAX_USES_PER_EPOCH:
        raise ValueError(f"must be at most {MAX_USES_PER_EPOCH:,} (an epoch is listed and shuffled in memory, each image its repeats times): lower it")
    return value


def _trainable_side(value: int) -> int:
    if value > MAX_RESOLUTION:  # why that bound: finetune/data/image_bounds.py (sample's --resolution has it too)
        raise ValueError(RESOLUTION_BOUND)
    return value


def _one_side(value):
    """sd-scripts writes its resolution as width,height (`512,512`, `768,512`), which was pydantic's "unable to parse
    string as an integer": here it is one side, of the square images train at or of their buckets' area."""
    sides = re.fullmatch(r"\s*(\d+)\s*[,x]\s*(\d+)\s*", value) if isinstance(value, str) else None
    if sides is None:
        return value
    width, height = int(sides[1]), int(sides[2])
    if width == height:
        raise ValueError(f"is one number, the side of the square images train at: write {width}")
    side = max(64, round((width * height) ** 0.5 / 64) * 64)  # a square of about as many pixels, in bucketing's steps
    raise ValueError(f"is one number, the side of the square images train at: images of other shapes train near their own shape with "
                     f"data.bucketing.enabled: true, in as many pixels as that square (for {width}x{height}'s, a side of about {side})")


PixelSize = Annotated[int, AfterValidator(_multiple_of_8)]  # an image side the VAE turns into whole latents
Resolution = Annotated[PixelSize, BeforeValidator(_one_side), AfterValidator(_trainable_side)]  # the side images train at (and validation samples)
Share = Annotated[float, AfterValidator(_between_0_and_1)]  # a probability
Repeats = Annotated[int, AfterValidator(_countable_repeats)]  # uses of each image per epoch (at least 1: each section says why)
# Random seeds: torch's generators take at most 64 bits, numpy's no negative numbers; image k draws from seed + k.
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
# Sampling steps, as a prompt's --s: up to MAX_STEPS, within the schedulers' training timesteps (more was
# diffusers' error at the first validation grid, after training up to it).
SamplingSteps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
# $NAME or ${NAME}: an environment variable in a path, as a shell reads it.
ENVIRONMENT_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _a_path(value: str) -> str:
    # "" is the current folder to every file call: a base model, an output_dir or a cache there, never meant.
    if not value.strip():
        raise ValueError("is empty: give a file or folder path, or remove the key")
    if any(ord(character) < 32 for character in value):  # "C:\new\train" in double quotes: YAML reads \n and \t as such
        raise ValueError("holds a line break or a tab: a Windows path in double quotes? there a backslash starts an escape (\\n, \\t): "
                         "write it in single quotes, or with forward slashes")  # fmt: skip
    value = os.path.expanduser(value)  # ~ is the user's home, as in a shell
    # $DATA/photos, as a shell script has it, was a folder named "$DATA" in the current one (an output_dir
    # made there, unseen). A file or folder whose own name holds a $ is left as it is.
    if "$" in value and not os.path.exists(value):
        unset = [match.group(1) or match.group(2) for match in ENVIRONMENT_VARIABLE.finditer(value) if (match.group(1) or match.group(2)) not in os.environ]
        if unset:
            raise ValueError(f"names the environment variable ${unset[0]}, which is not set: set it, or write the path out")
        value = os.path.expandvars(value)
    return value


UserPath = Annotated[str, AfterValidator(_a_path)]  # a file or folder
