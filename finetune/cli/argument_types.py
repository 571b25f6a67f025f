"""What an option's value may be: the argparse types of the `finetune` command's options (finetune/cli/arguments.py's, eval's
and the demo's), each refusing a value in argparse's one line, before anything loads."""

from __future__ import annotations

import argparse
import math
import re

from finetune.data.image_bounds import MAX_RESOLUTION, RESOLUTION_BOUND
from finetune.sampling.prompt_options import MAX_STEPS
from finetune.sampling.samplers import sampler_named


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (0 images or steps crashed deep in sampling)."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def pixel_size(text: str) -> int:
    """An argparse type: an image side, a positive multiple of 8 (the VAE downsamples by 8), checked before a base
    model loads (or downloads) rather than after."""
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
    return value


def sample_side(text: str) -> int:
    """An argparse type: the side of sampled images, a pixel_size at most data.resolution's bound (finetune/data/image_bounds.py):
    --resolution 100000 made one image of 10 gigapixels, until memory ran out."""
    value = pixel_size(text)
    if value > MAX_RESOLUTION:
        raise argparse.ArgumentTypeError(f"{RESOLUTION_BOUND} (got {value})")
    return value


def sampling_steps(text: str) -> int:
    """An argparse type: sampling steps, 1 to MAX_STEPS (more was diffusers' traceback after the model loaded),
    as a prompt's --s takes them."""
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_STEPS} (the scheduler has 1000 training timesteps), got {value}")
    return value


def seed_number(text: str) -> int:
    """An argparse type: a seed as recipes take one (finetune.config.base.Seed): 0 to 2**63 - 1, which torch's
    and numpy's generators both take (a larger one was an overflow traceback)."""
    value = whole_number(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1, got {value}")
    return value


def number_or_text(text: str) -> int | str:
    """An argparse type: a whole number as one, anything else as typed, for the recipe key it replaces to say what is
    wrong with it (check-data's --resolution: sd-scripts' 512,512 was argparse's "invalid int value")."""
    return int(text) if re.fullmatch(r"-?\d+", text.strip()) else text


def finite_float(text: str) -> float:
    """An argparse type: a number, but not nan or inf, which float() reads and which give black images (and
    a merged pipeline of nan weights) rather than an error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def lora_strength(text: str) -> float:
    """An argparse type: one strength (`finite_float`); several ("1,0.5") say where to compare them (a sample grid's columns are seeds)."""
    if any(separator in text for separator in ",;"):
        raise argparse.ArgumentTypeError(f"takes one strength, got {text!r}: run sample once per strength (each run is numbered apart in --out, and each "
                                         "image's settings name its strength), or compare them side by side in finetune demo, whose strengths field takes 1, 0.5")
    return finite_float(text)


def sampler_option(text: str) -> str:
    """An argparse type: a sampler by our name, sd-scripts' or the webui's ("Euler a", as its sampler list spells it)."""
    try:
        return sampler_named(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0 (the demo's --max-upload-mb: 0 refused every upload)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535 (another was a bind() OverflowError traceback after the model loaded)."""
    value = whole_number(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {value}")
    return value
