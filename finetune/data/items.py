"""Training data: the checked examples (finetune/data/sources.py reads them) decoded into training items.

Every image is opened and decoded once up front (finetune/data_check/check.py), so a corrupt, truncated or
tiny file stops the run with its name before any model is loaded; one changed since is caught at its
next use (finetune/data/files_as_checked.py). Randomness (crop, flip, caption dropout, tag order) is drawn
from generators seeded by (seed, epoch, index): the same item looks the same in a resumed run and on
any number of processes. With `data.bucketing` each image is cropped to its aspect-ratio bucket
(finetune/data/buckets.py) instead of a square.

An item is its caption, its image's view (pixels, or with the latent cache its key: `view_entry`) and,
with data.loss_mask, its mask's (`mask_entry`); `collate` stacks them into a batch. DreamBooth's and
ControlNet's datasets (finetune/dreambooth/data.py, finetune/controlnet/data.py) build their items from these too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from finetune.captions.captions import scored_caption, training_caption
from finetune.config import DataConfig
from finetune.data.buckets import assign_buckets
from finetune.data.cache import EncodingCache
from finetune.data.files_as_checked import (
    decoded_as_checked, decoded_at_checked_size, require_as_checked, require_checked_mask, require_mask_as_checked,
)
from finetune.data.images import upright_size
from finetune.data.loss_mask import mask_tensor
from finetune.data.sources import Example
from finetune.data.views import ViewPlan, plan_view, render, view_key


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of item `index`'s draws in `epoch` (its crop, flip and caption dropout)."""
    return np.random.default_rng([seed, epoch, index])


def render_pixels(example: Example, plan: ViewPlan, stamp: tuple[int, ...] | None = None) -> torch.Tensor:
    """The planned view of `example` as CHW pixels in [-1, 1] (a JPEG may decode at a reduced scale), for the latent cache:
    of the pixels the data check read (`decoded_as_checked`). `stamp`: the one `require_as_checked` just accepted; without
    it, that check is made here (the training process cutting a view the loader left out)."""
    if stamp is None:
        stamp = require_as_checked(example)
    return to_tensor(render(decoded_as_checked(example, 2 * max(plan.target), stamp), plan))


def render_mask(example: Example, plan: ViewPlan, as_checked: bool = False) -> torch.Tensor:
    """The planned view of `example`'s loss mask as (1, H, W) weights in [0, 1]; all 1 without a mask.

    `as_checked`: the mask must still be the one the data check read, as for views cached under its digest.
    """
    if example.load_mask is None:
        return torch.ones(1, plan.target[1], plan.target[0])
    mask = example.load_mask()
    if as_checked:
        require_checked_mask(example, mask)
    return mask_tensor(render(mask, plan))


class CaptionedImageDataset(torch.utils.data.Dataset):
    """The training set of LoRA, full and vae runs: each checked example as an item (see the module docstring).

    Items are looked up by (index, epoch) so augmentation is reproducible; see `finetune.data.batches`.

    With bucketing, `bucket_of[i]` is item i's (width, height) and `make_batch_sampler` batches by it.
    With a latent cache an item names its view (see `view_entry`), and `render(view)` decodes it.
    """

    def __init__(self, examples: list[Example], config: DataConfig, seed: int, latent_cache: EncodingCache | None = None,
                 held_out: frozenset[int] = frozenset()):  # fmt: skip
        self.examples = examples
        self.held_out = held_out  # items validation.loss_images scores: with their captions as written
        self.config = config
        self.seed = seed
        self.bucket_of = assign_buckets([upright_size(e) for e in examples], config) if config.bucketing.enabled else None
        self.latent_cache = latent_cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        example = self.examples[index]
        rng = item_rng(self.seed, epoch, index)
        target = self.bucket_of[index] if self.bucket_of else (self.config.resolution, self.config.resolution)
        width, height = upright_size(example)
        plan = plan_view((width, height), target, self.config.crop, self.config.random_flip, rng)
        caption = training_caption(example.caption, self.config, self.seed, epoch, index)
        if self.config.caption_dropout > 0 and rng.random() < self.config.caption_dropout:
            caption = ""
        if index in self.held_out:  # after the draws: a held-out item's view is as before
            caption = scored_caption(example.caption, self.config, self.seed, index)
        # original_size and crop_top_left: what SDXL-style size conditioning takes.
        item = {"caption": caption, "index": index, "original_size": (height, width), "crop_top_left": plan.top_left}
        likely_new = likely_new_view(self.config, epoch)
        if self.config.loss_mask.enabled:
            item.update(mask_entry(example, plan, self.latent_cache, likely_new))
        return {**item, **view_entry(example, plan, index, self.latent_cache, likely_new)}

    def render(self, view: tuple[int, ViewPlan]) -> torch.Tensor:
        index, plan = view
        return render_pixels(self.examples[index], plan)  # a cached view's (see view_entry)

    def render_mask(self, view: tuple[int, ViewPlan]) -> torch.Tensor:
        index, plan = view
        return render_mask(self.examples[index], plan, as_checked=True)  # a cached view's (see mask_entry)


def likely_new_view(config: DataConfig, epoch: int, epochs_per_visit: int = 1) -> bool:
    """Whether this epoch's view of an image may not be cached yet: until the image has been visited
    once (twice with flips, which make two views; a visit takes `epochs_per_visit` epochs when a pool
    is dealt out over several), or in any epoch of random crops."""
    return config.crop == "random" or epoch < epochs_per_visit * (2 if config.random_flip else 1)


def view_entry(example: Example, plan: ViewPlan, example_id: Any, cache: EncodingCache | None, likely_new: bool, prefix: str = "") -> dict[str, Any]:
    """An item's image: its pixels; with a latent cache also its cache key and how to render it: (`example_id`, plan),
    which the dataset's `render` takes (`example_id`: how it finds the example again, e.g. its index).

    The pixels are left out when the view is likely cached (`likely_new` false) or is on disk: a cached
    view is not decoded, and a view that was not cached after all is decoded by the training process.
    """
    if cache is None:  # decoded every use: an edit trains, at the size planned for
        return {f"{prefix}pixel_values": to_tensor(render(decoded_at_checked_size(example, at_least=2 * max(plan.target)), plan))}
    stamp = require_as_checked(example)  # a view cached in an earlier epoch is served under the checked content's key
    if example.digest is None:
        raise ValueError(f"image {example.source} has no content digest: cached latents need examples from finetune.data_check.check")
    key = view_key(example.digest, plan)
    entry = {f"{prefix}latent_key": key, f"{prefix}view": (example_id, plan)}
    if likely_new and not cache.stored(key):
        entry[f"{prefix}pixel_values"] = render_pixels(example, plan, stamp)
    return entry


def mask_entry(example: Example, plan: ViewPlan, cache: EncodingCache | None, likely_new: bool, prefix: str = "") -> dict[str, Any]:
    """An item's loss mask (data.loss_mask) as `view_entry` gives its image: the view of the mask; with a
    latent cache its key instead (None: the image has no mask, every pixel trains), and the view only
    while it is likely new. The cache holds the mask at the latents' size (`DiffusionMethod.loss_weights`),
    so a cached view neither decodes its mask nor, for data.loss_mask.source alpha, its image.
    """
    if cache is None:
        return {f"{prefix}loss_mask": render_mask(example, plan)}
    if example.load_mask is None:
        return {f"{prefix}mask_key": None}
    if example.mask_digest is None:
        raise ValueError(f"image {example.source} has no mask digest: cached masks need examples from finetune.data_check.check")
    require_mask_as_checked(example)  # a view cached in an earlier epoch is served under the checked mask's key
    key = view_key(f"mask-{example.mask_digest}", plan)
    entry = {f"{prefix}mask_key": key}
    if likely_new and not cache.stored(key):
        entry[f"{prefix}loss_mask"] = render_mask(example, plan, as_checked=True)
    return entry


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **collate_images(items),
        "captions": [item["caption"] for item in items],
        "indices": torch.tensor([item["index"] for item in items]),
        "original_size": torch.tensor([item["original_size"] for item in items]),  # (B, 2): height, width
        "crop_top_left": torch.tensor([item["crop_top_left"] for item in items]),  # (B, 2): top, left
    }


def collate_images(items: list[dict[str, Any]], prefixes: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """`pixel_values` stacked; or for named views `latent_keys`, `views`, `view_pixels` (each row's
    pixels, or None where the loader left them out) and `pixel_size` (height, width). With
    data.loss_mask also `loss_mask` (B, 1, H, W); for named views `mask_keys` and `view_masks` instead
    (as `latent_keys` and `view_pixels`; see `mask_entry`).

    `prefixes`: the item's image entries in batch order (DreamBooth: "" for instances, "class_" after).
    """
    rows = [(item, prefix) for prefix in prefixes for item in items]
    if f"{prefixes[0]}latent_key" not in items[0]:
        masks = {"loss_mask": torch.stack([item[f"{prefix}loss_mask"] for item, prefix in rows])} if "loss_mask" in items[0] else {}
        return {"pixel_values": torch.stack([item[f"{prefix}pixel_values"] for item, prefix in rows]), **masks}
    views = [item[f"{prefix}view"] for item, prefix in rows]
    width, height = views[0][1].target
    masks = {}
    if "mask_key" in items[0]:
        masks = {"mask_keys": [item[f"{prefix}mask_key"] for item, prefix in rows], "view_masks": [item.get(f"{prefix}loss_mask") for item, prefix in rows]}
    return {
        **masks,
        "latent_keys": [item[f"{prefix}latent_key"] for item, prefix in rows],
        "views": views,
        "view_pixels": [item.get(f"{prefix}pixel_values") for item, prefix in rows],
        "pixel_size": (height, width),
    }
