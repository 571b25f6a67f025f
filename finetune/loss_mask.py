"""Loss masks (`data.loss_mask`): train on part of each image, such as a subject without its background.

A mask is a greyscale image of its image's size: white pixels train fully, black ones weigh
`data.loss_mask.unmasked_weight` (0: not at all), grey ones in between. It is the image's own
transparency (source `alpha`) or a file in a folder beside the images (source `files`:
`masks/0001.png` for `0001.jpg`, as ControlNet's `conditioning/` folder pairs by name).

The mask is cut exactly like its image (the same resize, crop and flip: `finetune.views`), averaged
over each 8x8 patch to the latents' size, and each image's loss is the mean over its latents weighed
by it. The weights are normalized per image, so a small subject trains as strongly as a whole image.
Masks are not cached with the latents: they are read again each step (a small greyscale file, or for
`alpha` the image itself), so a changed mask takes effect in the next run without re-encoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from finetune.config import LossMaskConfig
from finetune.errors import FinetuneError

# A mask may be saved in any of these formats, whatever its image's format.
MASK_SUFFIXES = (".png", ".webp", ".bmp", ".jpg", ".jpeg")


def mask_path(image_path: str, settings: LossMaskConfig) -> Path:
    """The mask file of an image: in `settings.folder` beside it, with its file name or its stem and
    any image suffix; the expected name (its own) if none is there, for the error that says so."""
    image = Path(image_path)
    folder = image.parent / settings.folder
    for candidate in [folder / image.name, *(folder / (image.stem + suffix) for suffix in MASK_SUFFIXES)]:
        if candidate.is_file():
            return candidate
    return folder / image.name


def read_mask_file(path: Path) -> Image.Image:
    """A mask file as upright 8-bit greyscale (colour and alpha are dropped: only brightness counts)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened).convert("L")
    except Exception as err:  # PIL raises many types for broken files
        raise FinetuneError(f"loss mask {path} cannot be read ({err.__class__.__name__}: {err}): fix or remove it") from None


def alpha_mask(raw: Image.Image) -> Image.Image:
    """The transparency of a decoded image (one with alpha), upright, as 8-bit greyscale."""
    return ImageOps.exif_transpose(raw).convert("RGBA").getchannel("A")


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A greyscale view -> (1, H, W) weights in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def mask_area(mask: Image.Image) -> float:
    """The share of the image a mask trains (grey counts in part)."""
    return float(np.asarray(mask, dtype=np.float32).mean() / 255.0)


def latent_loss_weights(masks: torch.Tensor, latent_size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """Pixel masks (B, 1, H, W) in [0, 1] -> loss weights at the latents' size (B, 1, h, w): each 8x8
    patch's mean, raised from 0 to `unmasked_weight` where it is black."""
    patches = F.interpolate(masks.float(), size=latent_size, mode="area")
    return unmasked_weight + (1.0 - unmasked_weight) * patches
