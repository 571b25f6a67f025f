"""The data check of an image's loss mask (data.loss_mask): there, readable, of the image's upright shape, and training
something; from its file, or from the check's record of it where the file is unchanged (finetune/data_check/check_record.py)."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from finetune.config import DataConfig
from finetune.data.images import file_stamp
from finetune.data.loss_mask import alpha_mask, image_sharing_mask, mask_area, mask_digest, mask_path, read_mask_file
from finetune.data.sources import Example
from finetune.data_check.check_record import CheckRecord, ImageFacts, MaskFacts
from finetune.errors import FinetuneError


def _loaded_alpha_mask(load):
    """The transparency of the image `load` opens: an example's mask loader, which spawned data workers (macOS,
    Windows) receive pickled, so a module-level function rather than a lambda."""
    return alpha_mask(load())


def inspect_loss_mask(example: Example, facts: ImageFacts, config: DataConfig, record: CheckRecord | None = None) -> tuple[Example, list]:
    """(the example with its mask loader and trained area, findings): the mask must be there, readable,
    of the image's upright size, and train something. `facts`: what the check read from the image."""
    from finetune.data_check.check import FATAL, Finding  # it builds on this module

    settings, source = config.loss_mask, example.source
    if config.folders and not config.folders[example.folder_index].loss_mask:
        return example, []  # its folder trains whole (data.folders loss_mask: false)
    if settings.source == "alpha":
        if facts.alpha is None:  # no alpha channel, or one opaque everywhere: said for all at once (masks_out_of_view)
            return example, []
        named, load = f"the transparency of image {source}", functools.partial(_loaded_alpha_mask, example.load)
        mask = MaskFacts(size=example.size, area=facts.alpha[0], digest=facts.alpha[1])  # upright, as its image
    else:
        path = mask_path(source, settings)
        if not path.is_file():
            message = (f"image {source} has no loss mask: expected {path} (or {path.stem} with another image suffix; greyscale, "
                       "the image's size, white where it trains)")  # fmt: skip
            return example, [Finding(FATAL, source, message)]
        if (other := image_sharing_mask(source, settings)) is not None:
            own = Path(settings.folder) / Path(source).name
            message = (f"images {other} and {Path(source).name} share the loss mask {path}: name each image's mask by its full file name "
                       f"({own} for {Path(source).name}), or remove one image (a copy?)")  # fmt: skip
            return example, [Finding(FATAL, source, message)]
        stamp = file_stamp(str(path))  # before reading: an edit while it is read shows as a changed file
        if (mask := record.facts(str(path), stamp, MaskFacts) if record is not None else None) is None:
            try:
                read = read_mask_file(path)
            except FinetuneError as err:
                return example, [Finding(FATAL, source, str(err))]
            mask = MaskFacts(size=read.size, area=mask_area(read), digest=mask_digest(read))
            if record is not None:
                record.keep(str(path), stamp, mask)
        named, load = f"loss mask {path}", functools.partial(read_mask_file, path)
        example = replace(example, mask_file_stamp=(str(path), *stamp) if stamp else None)
    (mask_width, mask_height), (width, height) = mask.size, example.size
    if abs(mask_width * height / (mask_height * width) - 1.0) > 0.01:  # another scale is fine: it is resized with its image
        rotated = facts.turned and (mask_width, mask_height) == (height, width)
        hint = "save the mask upright: the image is turned by its EXIF orientation" if rotated else "a mask must have its image's shape (its size, or another scale of it)"
        message = f"{named} is {mask_width}x{mask_height} but image {source} is {width}x{height} upright: {hint}"
        return example, [Finding(FATAL, source, message)]
    if mask.area == 0.0 and settings.unmasked_weight == 0.0:
        message = f"{named} is black everywhere, so image {source} would train nothing: whiten what should train, or remove the image"
        return example, [Finding(FATAL, source, message)]
    return replace(example, load_mask=load, mask_area=mask.area, mask_digest=mask.digest), []
