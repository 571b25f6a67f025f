"""The image and mask files a run trains on, held at each use to what its data check read (finetune/data_check/check.py).

A file may change while a run trains (an edit, a copy over it, a tool that rewrites it in place). With the latent cache
(train.cache_latents) a view's latents are kept under the checked pixels' digest, so a changed image or mask stops the
run in one line (`require_as_checked`, `decoded_as_checked`, `require_mask_as_checked`): its cached views would be
served stale. Without the cache an image is decoded at every use and trains as it now is, but only at the size the
check read, which its crop and bucket were planned for (`require_checked_size`, `decoded_at_checked_size`).

Each use costs one stat: a file whose stamp (size, mtime, ctime, inode: `finetune.data.images.file_stamp`) is as checked is
taken as checked. One whose stamp changed is read and compared once (per process), and a read that fails while the file
is still being written is tried again once it is whole (`_read_once_written`).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

from PIL import Image

from finetune.data.images import file_stamp, open_rgb, pixel_digest, read_upright_size
from finetune.data.loss_mask import mask_digest
from finetune.data.sources import Example
from finetune.errors import FinetuneError

# How often, and how many seconds apart, a read that failed on a file still changing is tried again.
READ_RETRIES, READ_RETRY_WAIT = 10, 0.25

# An image touched since the check whose pixels were found the same (a copy over itself, a tool that rewrote it): its
# new stamp, so it is not decoded again at each use (per process: each data-loader worker finds it once).
_UNCHANGED_STAMPS: dict[str, tuple[int, ...]] = {}
# Without the cache, an image changed since the check whose size was found the same: its new stamp, so its size is not
# read again at each use (a PNG's EXIF is read by decoding it whole). Apart from the above: its pixels may differ.
_SAME_SIZE_STAMPS: dict[str, tuple[int, ...]] = {}


def _stamp_now(example: Example, kind: str = "image") -> tuple[int, ...] | None:
    """The image file's stamp (None for a dataset row, or an example not from the check); one stat. A file gone since
    stops here with one line (the loader's traceback said less). `kind`: how a line names the file (a ControlNet's
    "conditioning image")."""
    if example.file_stamp is None or example.digest is None:
        return None
    if (stamp := file_stamp(example.source)) is None:
        raise FinetuneError(f"{kind} {example.source} was removed since this run's data check: put it back, or restart the run to train without it")
    return stamp


def require_as_checked(example: Example) -> tuple[int, ...] | None:
    """Stop where `example`'s image changed since this run's data check, at its next use: its views' cached latents (in
    memory or on disk), keyed by the checked pixels, would be served stale. A file whose stamp changed is decoded
    in full and compared, so a copy of the same pixels, or a touched file, trains on. Returns the file's stamp, now
    accepted as holding the checked pixels (None for a dataset row), which a view's decode takes (`decoded_as_checked`)."""
    stamp = _stamp_now(example)
    if stamp in (None, example.file_stamp, _UNCHANGED_STAMPS.get(example.source)):
        return stamp
    return _require_checked_pixels(example, stamp)[1]


def _require_checked_pixels(example: Example, stamp: tuple[int, ...]) -> tuple[Image.Image, tuple[int, ...]]:
    """The image decoded in full (once written) and its stamp, where its pixels are the checked ones; else one line."""
    image, stamp = _read_once_written(lambda: open_rgb(example), example.source, stamp)
    if pixel_digest(image) != example.digest:
        raise FinetuneError(f"image {example.source} changed since this run's data check: restart the run to train with it "
                            "(train.cache_latents keeps each view's latents under the content checked at the start)")  # fmt: skip
    _UNCHANGED_STAMPS[example.source] = stamp
    return image, stamp


def decoded_as_checked(example: Example, at_least: int, stamp: tuple[int, ...] | None) -> Image.Image:
    """`open_rgb` of an image whose view is cached under its checked digest: the checked pixels, never a rewrite's. The
    file was found as checked at `stamp` (`require_as_checked`), but a rewrite may land between that stat and the decode,
    and its view would be stored under the checked pixels' key. So the file is statted again after the decode (one stat
    per entry made, beside the decode): moved, it is decoded in full once written and compared, and the view is cut from
    that very decode. A rewrite that keeps the file's stamp is not seen, as at every use of a cached view (`file_stamp`)."""
    decode = functools.partial(open_rgb, example, at_least=at_least)
    if stamp is None:  # a dataset row: nothing on disk to change
        return decode()
    image, read_at = _read_once_written(decode, example.source, stamp)
    if read_at == stamp and _stamp_now(example) == stamp:  # unchanged across the decode: the checked pixels
        return image
    return _require_checked_pixels(example, _stamp_now(example))[0]


def _read_once_written(read: Callable[[], Any], path: str, stamp: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
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


def require_checked_size(example: Example, kind: str = "image") -> tuple[int, ...] | None:
    """Without the latent cache an edited image trains as it now is, but only at the size the check read: its crop (and
    bucket) was planned for that size, and a view planned for another would be stretched, unseen. A file caught
    half-rewritten is read once written, as with the cache. So for a ControlNet's conditioning image (`kind`), decoded at
    every use and cut by its image's plan. Returns the file's stamp, now accepted as of the checked size (None for a
    dataset row), which its decode takes (`decoded_at_checked_size`)."""
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


def require_checked_mask(example: Example, mask: Image.Image) -> None:
    """Stop where `mask`, just read, is not the loss mask of `example` the data check read (none recorded: nothing to hold
    it to): a view cached under the checked mask's key would be served stale."""
    if example.mask_digest is not None and mask_digest(mask) != example.mask_digest:
        raise FinetuneError(f"the loss mask of image {example.source} changed since this run's data check: restart the run to train with it "
                            "(train.cache_latents keeps each view's mask under the content checked at the start)")  # fmt: skip


def require_mask_as_checked(example: Example) -> None:
    """`require_as_checked` for a mask file (data.loss_mask.source files), whose cached views are served by their key:
    one stat a use; a file whose stamp changed is read and compared. (An alpha mask is its image's.)"""
    if example.mask_file_stamp is None or example.mask_digest is None:
        return
    path, *checked = example.mask_file_stamp
    if (stamp := file_stamp(path)) is None:
        raise FinetuneError(f"the loss mask {path} of image {example.source} was removed since this run's data check: put it back, or restart the run")
    if stamp in (tuple(checked), _UNCHANGED_STAMPS.get(path)):
        return
    mask, stamp = _read_once_written(example.load_mask, path, stamp)
    require_checked_mask(example, mask)
    _UNCHANGED_STAMPS[path] = stamp
