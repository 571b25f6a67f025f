"""Training data: the checked examples (finetune/sources.py reads them) decoded into training items.

Every image is opened and decoded once up front (finetune/check_data.py), so a corrupt, truncated or
tiny file stops the run with its name before any model is loaded. Randomness (crop, flip, caption
dropout, tag order) is drawn from generators seeded by (seed, epoch, index): the same item looks the
same in a resumed run and on any number of processes. With `data.bucketing` each image is cropped to
its aspect-ratio bucket (finetune/buckets.py) instead of a square.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from finetune.buckets import assign_buckets
from finetune.cache import EncodingCache
from finetune.captions import scored_caption, training_caption
from finetune.config import DataConfig
from finetune.errors import FinetuneError
from finetune.images import file_stamp, open_rgb, pixel_digest, read_upright_size, upright_size
from finetune.loss_mask import mask_digest, mask_tensor
from finetune.sources import Example
from finetune.views import ViewPlan, plan_view, render, view_key


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


# An image touched since the check whose pixels were found the same (a copy over itself, a tool that rewrote it): its
# new stamp, so it is not decoded again at each use (per process: each data-loader worker finds it once).
_UNCHANGED_STAMPS: dict[str, tuple[int, int]] = {}
# Without the cache, an image changed since the check whose size was found the same: its new stamp, so its size is not
# read again at each use (a PNG's EXIF is read by decoding it whole). Apart from the above: its pixels may differ.
_SAME_SIZE_STAMPS: dict[str, tuple[int, int]] = {}


def _stamp_now(example: Example, kind: str = "image") -> tuple[int, int] | None:
    """The image file's stamp (None for a dataset row, or an example not from the check); one stat. A file gone since
    stops here with one line (the loader's traceback said less). `kind`: how a line names the file (a ControlNet's
    "conditioning image")."""
    if example.file_stamp is None or example.digest is None:
        return None
    if (stamp := file_stamp(example.source)) is None:
        raise FinetuneError(f"{kind} {example.source} was removed since this run's data check: put it back, or restart the run to train without it")
    return stamp


def require_as_checked(example: Example) -> tuple[int, int] | None:
    """Stop where `example`'s image changed since this run's data check, at its next use: its views' cached latents (in
    memory or on disk), keyed by the checked pixels, would be served stale. A file whose size or time changed is decoded
    in full and compared, so a copy of the same pixels, or a touched file, trains on. The file's stamp now accepted as
    holding the checked pixels (None for a dataset row), for a view's decode (`decoded_as_checked`)."""
    stamp = _stamp_now(example)
    if stamp in (None, example.file_stamp, _UNCHANGED_STAMPS.get(example.source)):
        return stamp
    return _require_checked_pixels(example, stamp)[1]


def _require_checked_pixels(example: Example, stamp: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """The image decoded in full (once written) and its stamp, where its pixels are the checked ones; else one line."""
    image, stamp = _read_once_written(lambda: open_rgb(example), example.source, stamp)
    if pixel_digest(image) != example.digest:
        raise FinetuneError(f"image {example.source} changed since this run's data check: restart the run to train with it "
                            "(train.cache_latents keeps each view's latents under the content checked at the start)")  # fmt: skip
    _UNCHANGED_STAMPS[example.source] = stamp
    return image, stamp


def decoded_as_checked(example: Example, at_least: int, stamp: tuple[int, int] | None) -> Image.Image:
    """`open_rgb` of an image whose view is cached under its checked digest: the checked pixels, never a rewrite's. The
    file was found as checked at `stamp` (`require_as_checked`), but a rewrite may land between that stat and the decode,
    and its view would be stored under the checked pixels' key. So the file is statted again after the decode (one stat
    per entry made, beside the decode): moved, it is decoded in full once written and compared, and the view is cut from
    that very decode. A rewrite that keeps the file's size and time is not seen, as at every use of a cached view."""
    decode = functools.partial(open_rgb, example, at_least=at_least)
    if stamp is None:  # a dataset row: nothing on disk to change
        return decode()
    image, read_at = _read_once_written(decode, example.source, stamp)
    if read_at == stamp and _stamp_now(example) == stamp:  # unchanged across the decode: the checked pixels
        return image
    return _require_checked_pixels(example, _stamp_now(example))[0]


def _read_once_written(read: Callable[[], Any], path: str, stamp: tuple[int, int]) -> tuple[Any, tuple[int, int]]:
    """`read()` of the file `path` (an image, a mask) and the stamp it was read at. A file rewritten in place (`mogrify`,
    an optimiser, a save over it) was caught half-written by the use that found it changed: 'cannot be read: fix or
    remove it' stopped a cached run over a file whole a moment later, of the same pixels. A read that fails is tried
    again while the file goes on changing (a few seconds at most); one that stays as it is fails as it is."""
    for _ in range(READ_RETRIES):
        try:
            return read(), stamp
        except FinetuneError:
            time.sleep(READ_RETRY_WAIT)
            if (now := file_stamp(path)) in (None, stamp):  # not changing (or gone): unreadable as it is
                raise
            stamp = now
    return read(), stamp


READ_RETRIES, READ_RETRY_WAIT = 10, 0.25


def require_checked_size(example: Example, kind: str = "image") -> tuple[int, int] | None:
    """Without the latent cache an edited image trains as it now is, but only at the size the check read: its crop (and
    bucket) was planned for that size, and a view planned for another would be stretched, unseen. A file caught
    half-rewritten is read once written, as with the cache. So for a ControlNet's conditioning image (`kind`), decoded at
    every use and cut by its image's plan. The file's stamp as checked (None for a dataset row), for its decode."""
    stamp = _stamp_now(example, kind)
    if stamp in (None, example.file_stamp, _SAME_SIZE_STAMPS.get(example.source)):
        return stamp
    size, stamp = _read_once_written(lambda: read_upright_size(example), example.source, stamp)
    if size != example.size:
        raise FinetuneError(f"{kind} {example.source} changed size since this run's data check ({size[0]}x{size[1]}, was "
                            f"{example.size[0]}x{example.size[1]}): restart the run to train with it (its crops and bucket are planned for the checked size)")  # fmt: skip
    _SAME_SIZE_STAMPS[example.source] = stamp
    return stamp


def decoded_at_checked_size(example: Example, at_least: int, kind: str = "image", colour_managed: bool = True) -> Image.Image:
    """`open_rgb` of an image decoded at every use (no latent cache; a ControlNet's conditioning image, `kind`), at the size
    the check read (`require_checked_size`). A rewrite in place may begin after that check: a decode that fails on a file
    that is changing is tried again once it is written (`_read_once_written`; Pillow's error stopped the run), and the size
    of what it then read is checked again."""
    stamp = require_checked_size(example, kind)
    decode = functools.partial(open_rgb, example, at_least=at_least, colour_managed=colour_managed)
    if stamp is None:  # a dataset row: nothing on disk to wait for
        return decode()
    image, read_at = _read_once_written(decode, example.source, stamp)
    if read_at != stamp:
        require_checked_size(example, kind)
    return image


def render_pixels(example: Example, plan: ViewPlan, stamp: tuple[int, int] | None = None) -> torch.Tensor:
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
    if as_checked and example.mask_digest is not None and mask_digest(mask) != example.mask_digest:
        raise FinetuneError(_changed_mask(example))
    return mask_tensor(render(mask, plan))


def _changed_mask(example: Example) -> str:
    return (f"the loss mask of image {example.source} changed since this run's data check: restart the run to train with it "
            "(train.cache_latents keeps each view's mask under the content checked at the start)")  # fmt: skip


def require_mask_as_checked(example: Example) -> None:
    """`require_as_checked` for a mask file (data.loss_mask.source files), whose cached views are served by their key:
    one stat a use; a file whose size or time changed is read and compared. (An alpha mask is its image's.)"""
    if example.mask_file_stamp is None or example.mask_digest is None:
        return
    path, *checked = example.mask_file_stamp
    if (stamp := file_stamp(path)) is None:
        raise FinetuneError(f"the loss mask {path} of image {example.source} was removed since this run's data check: put it back, or restart the run")
    if stamp in (tuple(checked), _UNCHANGED_STAMPS.get(path)):
        return
    mask, stamp = _read_once_written(example.load_mask, path, stamp)
    if mask_digest(mask) != example.mask_digest:
        raise FinetuneError(_changed_mask(example))
    _UNCHANGED_STAMPS[path] = stamp


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Items are looked up by (index, epoch) so augmentation is reproducible; see `finetune.batches`.

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
            caption = scored_caption(example.caption, self.seed, index)
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
        raise ValueError(f"image {example.source} has no content digest: cached latents need examples from finetune.check_data")
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
        raise ValueError(f"image {example.source} has no mask digest: cached masks need examples from finetune.check_data")
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
