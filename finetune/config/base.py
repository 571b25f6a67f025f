"""The base of every recipe section (unknown keys are rejected, assignments are validated) and the
value types several sections share."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _multiple_of_8(value: int) -> int:
    if value <= 0 or value % 8 != 0:
        raise ValueError("must be a positive multiple of 8 (the VAE downsamples by 8)")
    return value


def _between_0_and_1(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


PixelSize = Annotated[int, AfterValidator(_multiple_of_8)]  # an image side the VAE turns into whole latents
Share = Annotated[float, AfterValidator(_between_0_and_1)]  # a probability
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]  # a file or folder: ~ is the user's home, as in a shell
