"""The `data:` section: where the images and captions come from and how they are read."""

from __future__ import annotations

import os
import re
from typing import ClassVar, Literal, Optional

from pydantic import Field, PrivateAttr, field_validator, model_validator

from finetune.config.base import PixelSize, Repeats, Resolution, Section, Share, UserPath


class BucketConfig(Section):
    """`data.bucketing`: train each image near its own aspect ratio (see finetune/data/buckets.py)."""

    # Off: every image is resized and cropped to resolution x resolution, as without this section.
    enabled: bool = False
    # Bucket sides are multiples of this; keep it 64 for SD (smaller models need 8 x their UNet's downsampling).
    step: PixelSize = 64
    # Shortest and longest bucket side; None: resolution / 2 and resolution x 2 (rounded to step).
    min_side: Optional[int] = None
    max_side: Optional[int] = None
    # sd-scripts' bucket_no_upscale: each image gets a bucket of its own shape, at its own size (shrunk to
    # resolution^2 pixels if larger), sides rounded down to the step: never enlarged. min/max_side then do not apply.
    no_upscale: bool = False

    plain_value_hint: ClassVar[str] = "data.bucketing is a section, not {value!r}: set data.bucketing.enabled: true"


class FolderConfig(Section):
    """One entry of `data.folders`: a subfolder of data.image_dir with its own repeats and caption template."""

    path: UserPath  # relative to data.image_dir (or absolute); "." is image_dir itself
    # Times each image of this folder is used per epoch: 1 means no repeat, 3 means three times.
    repeats: Repeats = 1
    # The prompt: "{caption}" is replaced by the image's own caption ("a photo of {caption}"); a template
    # without "{caption}" is the prompt of every image in the folder, and its captions are not read.
    template: Optional[str] = None
    # With data.loss_mask on: false trains this folder's images whole, with no masks (a regularisation folder).
    loss_mask: bool = True

    @field_validator("repeats")
    @classmethod
    def _at_least_once(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 (1 means no repeat; remove the folder to leave it out)")
        return value

    @field_validator("template")
    @classmethod
    def _only_the_caption_placeholder(cls, value: Optional[str]) -> Optional[str]:
        # "{captions}" would make a fixed prompt of the whole folder, its captions unread.
        unknown = sorted(set(re.findall(r"\{[^{}]*\}", value or "")) - {"{caption}"})
        if unknown:
            raise ValueError(f"{unknown[0]} is not a placeholder: the template's one placeholder is {{caption}}")
        return value


class LossMaskConfig(Section):
    """`data.loss_mask`: train on part of each image (a subject, a face), weighing the loss per pixel."""

    # none: every pixel counts. alpha: each image's own transparency (opaque trains). files: a greyscale
    # mask per image in `folder`, with the image's file name or stem (white trains, black does not).
    source: Literal["none", "alpha", "files"] = "none"
    # Where masks are, relative to each image folder (data.folders entries, DreamBooth instance_dir).
    folder: str = "masks"
    # The loss weight where the mask is black: 0 ignores the background, 0.1 keeps a little of it.
    unmasked_weight: float = 0.0

    # data.loss_mask=files, or sd-scripts' masked_loss: true
    plain_value_hint: ClassVar[str] = "data.loss_mask is a section, not {value!r}: set data.loss_mask.source: files or alpha"
    switched_by: ClassVar[str] = "masks are on where data.loss_mask.source is alpha or files, off where it is none"

    @field_validator("unmasked_weight")
    @classmethod
    def _below_one(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError("must be at least 0 and below 1 (1 weighs the background fully: set data.loss_mask.source: none)")
        return value

    @model_validator(mode="after")
    def _settings_that_act(self) -> "LossMaskConfig":
        if os.path.normpath(self.folder) == ".":
            raise ValueError("data.loss_mask.folder is the image folder itself (each image would be its own mask): name a subfolder, e.g. masks")
        # Source none switches masks off whatever the other keys say (data.loss_mask.source=none for an A/B run).
        if self.folder != "masks" and self.source == "alpha":
            raise ValueError("data.loss_mask.folder is where source files finds masks; with source alpha it does nothing: remove it")
        return self

    @property
    def enabled(self) -> bool:
        return self.source != "none"


class DataConfig(Section):
    # Either a folder of images with captions, or a `datasets` dataset (hub name, or a local path).
    image_dir: Optional[UserPath] = None
    # Not a recipe key: the key that set image_dir, for messages (a DreamBooth concept's instance_dir).
    _image_dir_key: str = PrivateAttr("data.image_dir")
    # Not a recipe key: what else a missing caption may be fixed with (DreamBooth concepts have their own).
    _caption_alternative: str = PrivateAttr("set data.caption to one prompt for all images")
    _repeats: int = PrivateAttr(1)  # image_dir's uses per epoch without data.folders (a DreamBooth concept's repeats)
    # Not a recipe key: (key, folder) of each DreamBooth class folder, said where one lies inside an instance folder.
    _class_dirs: tuple[tuple[str, str], ...] = PrivateAttr(())
    dataset: Optional[UserPath] = None
    dataset_config: Optional[str] = None
    dataset_split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    # One prompt for every image; when set, captions are not read.
    caption: Optional[str] = None
    resolution: Resolution = 512  # at most MAX_RESOLUTION (4096)
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    # Share of training captions replaced by "" so classifier-free guidance keeps working.
    caption_dropout: Share = 0.0
    # Comma-separated tags ("sks, dog, grass") are shuffled per image and epoch, the first keep_tokens
    # staying in place (a trigger word first), so the model does not learn one tag order.
    shuffle_tags: bool = False
    keep_tokens: int = 0
    # sd-scripts' keep_tokens_separator (often "|||"): in a caption holding it, the tags before it stay in place (instead
    # of the first keep_tokens), a second one keeps the tags after it at the end, and the separators are left out.
    # As in sd-scripts, read where shuffle_tags or tag_dropout is on. None: off.
    keep_tokens_separator: Optional[str] = None
    # Each tag not kept in place (the first keep_tokens, or those around keep_tokens_separator) is left out with this
    # probability, per image and epoch (sd-scripts' caption_tag_dropout_rate), so no tag becomes a crutch the trigger word
    # cannot do without.
    tag_dropout: Share = 0.0
    # Images whose shorter side is below this are an error (default: half the resolution).
    min_image_size: Optional[int] = Field(None, ge=1)
    # Images that would stop the run (unreadable, truncated, too small, no caption) are skipped and
    # listed instead; default: training stops before it starts and names the first one.
    skip_bad_images: bool = False
    bucketing: BucketConfig = BucketConfig()
    # Subfolders of image_dir with their own repeats and prompt templates; empty: image_dir alone, once.
    folders: list[FolderConfig] = []
    loss_mask: LossMaskConfig = LossMaskConfig()
    num_workers: int = Field(0, ge=0)

    @property
    def dreambooth_concept(self) -> str | None:
        """The DreamBooth concept whose images these are (`dreambooth.concepts.0`), by the key that set image_dir; else None."""
        concept = self._image_dir_key.removesuffix(".instance_dir")
        return concept if concept.startswith("dreambooth.") else None

    @field_validator("image_dir", "dataset", mode="before")  # before UserPath's own, more general, line
    @classmethod
    def _not_empty(cls, value: Optional[str]) -> Optional[str]:
        if isinstance(value, str) and not value.strip():  # "" is no data: read as the current folder, or a traceback
            raise ValueError("is empty: give a folder (data.image_dir) or a datasets name or path (data.dataset), and null for the other")
        return value

    @field_validator("keep_tokens")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value

    @field_validator("keep_tokens_separator")
    @classmethod
    def _a_separator_between_tags(cls, value: Optional[str]) -> Optional[str]:
        # "" or " " would split every caption at its first space, "," at its first tag.
        if value is not None and (not value.strip() or "," in value):
            raise ValueError("must be text without a comma that captions hold between tags, e.g. '|||' (sd-scripts'), or null")
        return value

    def _one_bucket_only(self) -> str | None:
        """Why bucketing, on, would make the square its only bucket (and crop every image as without it), or None."""
        from finetune.data.buckets import make_buckets, side_limits  # here: buckets.py builds on this module

        if len(make_buckets(self)) > 1:
            return None
        resolution, step = self.resolution, self.bucketing.step
        low, high = side_limits(self)
        limits = [fix for fix, value in (("lower data.bucketing.min_side", self.bucketing.min_side), ("raise data.bucketing.max_side", self.bucketing.max_side))
                  if value is not None]  # fmt: skip
        fix = (f"lower data.bucketing.step to a multiple of 8 that divides {resolution}, at most {resolution // 2}" if 2 * step > resolution
               else " or ".join(limits))  # fmt: skip
        # data.resolution and data.bucketing named: the error names each override of them (data.resolution=64, data.bucketing.enabled=true), not the recipe
        return (f"data.bucketing at data.resolution {resolution} has one bucket, the {resolution}x{resolution} square (sides {low}-{high} in steps of {step}), so every image "
                f"would be cropped as without bucketing: {fix}")  # fmt: skip

    @model_validator(mode="after")
    def _buckets_and_folders_fit(self) -> "DataConfig":
        buckets = self.bucketing
        if buckets.no_upscale and not buckets.enabled:
            raise ValueError("data.bucketing.no_upscale sizes buckets: set data.bucketing.enabled: true as well")
        if buckets.no_upscale and (buckets.min_side is not None or buckets.max_side is not None):
            raise ValueError("data.bucketing.min_side and max_side do not apply with no_upscale (each image buckets at its own shape): remove them")
        if buckets.enabled:
            for key, value in (("resolution", self.resolution), ("bucketing.min_side", buckets.min_side), ("bucketing.max_side", buckets.max_side)):
                if value is not None and value % buckets.step != 0:
                    raise ValueError(f"data.{key} ({value}) must be a multiple of data.bucketing.step ({buckets.step})")
            if buckets.min_side is not None and buckets.min_side < buckets.step:
                raise ValueError(f"data.bucketing.min_side ({buckets.min_side}) must be at least data.bucketing.step ({buckets.step})")
            if buckets.min_side is not None and buckets.min_side > self.resolution:
                raise ValueError(f"data.bucketing.min_side ({buckets.min_side}) must be at most data.resolution ({self.resolution})")
            if buckets.max_side is not None and buckets.max_side < self.resolution:
                raise ValueError(f"data.bucketing.max_side ({buckets.max_side}) must be at least data.resolution ({self.resolution})")
            if message := self._one_bucket_only():
                raise ValueError(message)
        if self.folders and self.image_dir is None:
            raise ValueError("data.folders are subfolders of data.image_dir: set data.image_dir (a dataset has no folders; "
                             "for DreamBooth, give each concept its repeats)")  # fmt: skip
        # The same folder by another spelling (absolute, ./a/) and the same prompts ("{caption}" is no template).
        entries = [(os.path.abspath(os.path.join(self.image_dir, folder.path)), None if folder.template == "{caption}" else folder.template)
                   for folder in self.folders]  # fmt: skip
        twice = next((folder.path for folder, entry in zip(self.folders, entries) if entries.count(entry) > 1), None)
        if twice is not None:  # (with another template it is another set of prompts for the same images)
            raise ValueError(f"data.folders lists '{twice}' twice with the same template: list it once and raise its repeats")
        if self.loss_mask.source == "files" and self.dataset is not None:
            raise ValueError(
                "data.loss_mask.source files reads masks from folders beside the images; a dataset's images can carry "
                "their mask as transparency: use source alpha"
            )
        if self.keep_tokens_separator is not None and not (self.shuffle_tags or self.tag_dropout):
            raise ValueError("data.keep_tokens_separator keeps the tags before it in place while data.shuffle_tags shuffles or data.tag_dropout drops "
                             "the others (without either, sd-scripts leaves it in the caption too): set data.shuffle_tags: true (or data.tag_dropout)")  # fmt: skip
        if self.keep_tokens and not (self.shuffle_tags or self.tag_dropout):
            raise ValueError("data.keep_tokens keeps the first tags in place while data.shuffle_tags shuffles or data.tag_dropout drops the "
                             "others: set data.shuffle_tags: true (or data.tag_dropout)")  # fmt: skip
        return self
