"""Loss masks (`data.loss_mask`): train on part of each image, such as a subject without its background.

A mask is a greyscale image of its image's shape: white pixels train fully, black ones weigh
`data.loss_mask.unmasked_weight` (0: not at all), grey ones in between. It is the image's own
transparency (source `alpha`) or a file in a folder beside the images (source `files`:
`masks/0001.png` for `0001.jpg`, as ControlNet's `conditioning/` folder pairs by name).

The mask is cut exactly like its image (the same resize, crop and flip: `finetune.data.views`), averaged
over each 8x8 patch to the latents' size, and each crop's loss is the mean over its latents weighed
by it, divided by the crop's weight (at least MIN_NORMALIZING_SHARE of it), so a small subject trains
as strongly as a whole image.
With cached latents (train.cache_latents) each view's mask is cached beside its latents, at their size
and keyed by the mask's content and the view (`finetune.data.items.mask_entry`), so a cached view reads neither
its mask file nor, for `alpha`, its image; a changed mask is another key, cut anew.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from finetune.captions.file_names import file_names_by_loose_key, folder_listing, loose_name_key
from finetune.config import LossMaskConfig
from finetune.data.images import to_8_bit
from finetune.data.sources import IMAGE_SUFFIXES
from finetune.errors import FinetuneError

if TYPE_CHECKING:  # torch is imported where tensors are made: the data check reads masks without it
    import torch

# A mask may be saved in any of these formats (any letter case), whatever its image's format.
MASK_SUFFIXES = (".png", ".webp", ".bmp", ".jpg", ".jpeg")
# Per-image normalization divides by the mask's weight in the crop, but never by less than this share of
# it: a crop that catches only a sliver of the subject (or a JPEG mask's faint fringe) is not blown up to
# a whole image's loss; subjects filling at least 1/32 of the crop train at full strength.
MIN_NORMALIZING_SHARE = 1.0 / 32.0
# The preview looks for masked images among this many first items (each is decoded), so a large unmasked
# folder listed first does not hold up the start.
PREVIEW_SCAN = 200


def mask_path(image_path: str, settings: LossMaskConfig) -> Path:
    """The mask file of an image: in `settings.folder` beside it, with its file name, or its stem and any
    of MASK_SUFFIXES; where no file has the exact name, one that differs only in letter case or Unicode form
    (macOS writes `café` decomposed), as its caption file is found (`loose_name_key`); the expected name (its
    own) if none is there, for the error that says so."""
    image = Path(image_path)
    folder = image.parent / settings.folder
    wanted = [image.name, *(image.stem + suffix for suffix in MASK_SUFFIXES)]
    for name in wanted:  # the exact names first: Cat.jpg and cat.jpg each find their own
        if (folder / name).is_file():
            return folder / name
    names = file_names_by_loose_key(str(folder)) if folder.is_dir() else {}
    for name in wanted:
        if loose_name_key(name) in names:
            return folder / names[loose_name_key(name)]
    return folder / image.name


def image_sharing_mask(image_path: str, settings: LossMaskConfig) -> str | None:
    """Another image beside `image_path` of its stem that finds the same mask file, where that is not
    `image_path`'s by its exact name (a.jpg finds a.png's masks/a.png by the stem): which image the mask
    was made for cannot be told. The other's file name, or None."""
    image, mask = Path(image_path), mask_path(image_path, settings)
    if mask.name == image.name:
        return None
    namesakes = _images_by_loose_stem(str(image.parent)).get(loose_name_key(image.stem), [])
    return next((name for name in namesakes if name != image.name and mask_path(str(image.parent / name), settings) == mask), None)


@folder_listing
def _images_by_loose_stem(folder: str) -> dict[str, list[str]]:
    """A folder's image file names (not hidden ones) by their stem's `loose_name_key`."""
    stems: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
            stems.setdefault(loose_name_key(Path(name).stem), []).append(name)
    return stems


def read_mask_file(path: Path) -> Image.Image:
    """A mask file as upright 8-bit greyscale: its red channel (white and red train, as sd-scripts reads
    masks), 16-bit greys scaled to 8 bits, and transparent areas black."""
    try:
        with Image.open(path) as opened:
            opened.load()
            mask = ImageOps.exif_transpose(opened)
    except Exception as err:  # PIL raises many types for broken files
        raise FinetuneError(f"loss mask {path} cannot be read ({err.__class__.__name__}: {err}): fix or remove it") from None
    if mask.mode.startswith("I"):  # 16-bit greyscale: convert("L") would clip, not scale
        mask = to_8_bit(mask)
    rgba = mask.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).getchannel("R")


def alpha_mask(raw: Image.Image) -> Image.Image:
    """The transparency of a decoded image (one with alpha), upright, as 8-bit greyscale."""
    return ImageOps.exif_transpose(raw).convert("RGBA").getchannel("A")


def opaque_images(usable: list, config) -> list[str]:
    """The images (each once, in order) data.loss_mask.source alpha finds no transparency in, which train whole; not those
    of a data.folders entry with loss_mask: false, trained whole by choice."""
    if config.loss_mask.source != "alpha":
        return []
    masked = [example for example in usable if not config.folders or config.folders[example.folder_index].loss_mask]
    return list(dict.fromkeys(example.source for example in masked if example.mask_area is None))


def opaque_images_warning(sources: list[str], named: int = 3) -> str:
    """One line for every opaque image however many (a folder of JPEGs said one line each), the first few by name."""
    if len(sources) == 1:
        return f"image {sources[0]} has no transparency: it trains whole (data.loss_mask.source alpha); add an alpha channel to mask it"
    names = ", ".join(Path(source).name for source in sources[:named]) + (", ..." if len(sources) > named else "")
    return (f"{len(sources)} images have no transparency ({names}): their loss is unmasked, they train whole "
            "(data.loss_mask.source alpha); add an alpha channel to mask them")  # fmt: skip


def mask_digest(mask: Image.Image) -> str:
    """A hash of a mask's pixels (8-bit greyscale, as read): the name of its views in the latent cache."""
    return hashlib.blake2b(f"{mask.width}x{mask.height}".encode() + mask.tobytes(), digest_size=16).hexdigest()


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A greyscale view -> (1, H, W) weights in [0, 1]."""
    import torch  # here, as in latent_loss_weights: the data check reads masks with this module, without torch

    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def mask_area(mask: Image.Image) -> float:
    """The share of the image a mask trains (grey counts in part)."""
    return float(np.asarray(mask, dtype=np.float32).mean() / 255.0)


def latent_loss_weights(masks: torch.Tensor, latent_size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """Pixel masks (B, 1, H, W) in [0, 1] -> loss weights at the latents' size (B, 1, h, w): each 8x8
    patch's mean, raised from 0 to `unmasked_weight` where it is black."""
    import torch.nn.functional as F

    patches = F.interpolate(masks.float(), size=latent_size, mode="area")
    return unmasked_weight + (1.0 - unmasked_weight) * patches


def preview(dataset, sources: list[str], unmasked_weight: float, count: int = 8) -> Image.Image | None:
    """What trains in the first views of the first `count` masked images (`sources` names each item's
    image: repeats count once), side by side: each dimmed where its mask weighs little (to the
    background's weight, or to 0.15 so the scene still shows), so a mask that does not sit on its subject
    (after crops, flips, EXIF) shows at a glance. None when no image is masked."""
    floor, cells, shown_sources = max(0.15, unmasked_weight), [], set()
    for index, source in enumerate(sources[:PREVIEW_SCAN]):
        if len(cells) == count:
            break
        if source in shown_sources:  # a repeat
            continue
        item = dataset[(index, 0)]
        mask = item.get("loss_mask")
        if mask is None and item.get("mask_key") is not None:  # a cached view names its mask
            mask = dataset.render_mask(item["view"])
        if mask is None or bool(mask.min() == 1.0):  # an unmasked folder or concept
            continue
        shown_sources.add(source)
        pixels = item["pixel_values"] if "pixel_values" in item else dataset.render(item["view"])  # a cached view names its pixels
        shown = (pixels + 1.0) / 2.0 * (floor + (1.0 - floor) * mask)
        cells.append(Image.fromarray((shown.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()))
    if not cells:
        return None
    strip = Image.new("RGB", (sum(cell.width for cell in cells), max(cell.height for cell in cells)), "white")
    for i, cell in enumerate(cells):
        strip.paste(cell, (sum(c.width for c in cells[:i]), 0))
    return strip
