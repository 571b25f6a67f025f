"""Reading an image as training and the data check see it: decoded in full (so a truncated file shows), upright
(EXIF rotation), 8-bit RGB from any mode, in sRGB (a photo's colour profile converted). Apart from `finetune.data.items`
(the training dataset, torch) so that `finetune check-data` reads every image without loading torch."""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
from PIL import Image, ImageOps

from finetune.data.buckets import Size
from finetune.data.colour_profiles import apply as apply_profile
from finetune.data.colour_profiles import srgb_transform
from finetune.data.image_warnings import pillow_warnings_named
from finetune.data.sources import Example
from finetune.errors import FinetuneError

# Pillow refuses images over 2x this many pixels as "decompression bombs" (89M by default: a 108 MP phone
# photo warns, a 200 MP one fails). A user's own photos are trusted input; the check still stops on a corrupt
# one. (The demo, serving uploads from a browser, refuses one past demo_inputs.MAX_UPLOAD_PIXELS by its header.)
TRUSTED_IMAGE_PIXELS = 300_000_000
Image.MAX_IMAGE_PIXELS = TRUSTED_IMAGE_PIXELS
MAX_READ_PIXELS = 2 * TRUSTED_IMAGE_PIXELS  # Pillow refuses an image past twice its MAX_IMAGE_PIXELS


def too_many_pixels_message(source: str, detail: str) -> str:
    """An image past MAX_READ_PIXELS, in training's, make-conditions' and the demo's words; `detail`: its size, or Pillow's refusal."""
    return f"image {source} has more pixels than training reads ({MAX_READ_PIXELS // 1_000_000} megapixels; {detail}): downscale it, or remove it"


def decode(example: Example, at_least: int | None = None) -> Image.Image:
    """Open and decode fully, so a truncated file fails here with its name rather than mid-training.

    `at_least`: a JPEG may be decoded at a reduced scale that keeps both sides at least this long.
    """
    try:
        image = example.load()
        if image is None:  # a dataset row whose image cell is null
            raise FinetuneError(f"{example.source} has no image (a null cell): fill that cell, or remove the row")
        if at_least is not None:
            image.draft(None, (at_least, at_least))  # a no-op for other formats and decoded images
        tiles = getattr(image, "tile", ())  # an opened file's (a dataset's array made an image has none)
        rawmode = tiles[0].args if len(tiles) == 1 else None  # before load, which forgets it
        image.load()
        if rawmode == "RGB;16B" and max(high for _, high in image.getextrema()) == 0:
            image = low_bytes(example.load())
    except FinetuneError:
        raise
    except Exception as err:  # PIL raises many types for broken files
        if os.path.islink(example.source) and not os.path.exists(example.source):  # what it links to was moved or deleted
            raise FinetuneError(f"image {example.source} is a link to {os.readlink(example.source)}, which is not there: fix the link or remove it") from None
        raise FinetuneError(unreadable_message(example.source, err)) from None
    return image


# Set in a decoded image's info by `low_bytes`: a 16-bit RGB PNG whose values are 8-bit ones, read as such.
EIGHT_BIT_VALUES = "finetune: 8-bit values in 16 bits"


def low_bytes(image: Image.Image) -> Image.Image:
    """An opened 16-bit RGB PNG decoded from each sample's low byte. Pillow keeps the top byte, which for 8-bit values
    written into a 16-bit file (as numpy or OpenCV write one) is 0 everywhere: black (`decode` knows one so)."""
    image.tile = [tile._replace(args="RGB;16L") for tile in image.tile]  # little-endian's top byte: the big-endian low one
    image.load()
    image.info[EIGHT_BIT_VALUES] = True
    return image


# Brands of the HEIF container (an iPhone's photos) at bytes 8-12, after "ftyp" at 4-8.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def unreadable_message(source: str, err: Exception, named: str | None = None) -> str:
    """Why an image file cannot be read, in the terms of what its user did: an empty file, a phone's HEIC photo
    renamed .jpg and a photo over the pixel limit are told apart from a damaged file. `named`: what the message
    calls it where that is not its path (a data file's row naming the file)."""
    path, source = source, named or source  # the file read; what the message calls it
    if isinstance(err, Image.DecompressionBombError):
        return too_many_pixels_message(source, str(err))
    try:
        with open(path, "rb") as opened:
            head = opened.read(12)
    except (OSError, ValueError):  # a dataset row, or a file gone since
        head = None
    if head == b"":  # a copy or download cut off before its first byte; OneDrive's and iCloud's placeholders read so too
        return f"image {source} is empty (0 bytes: a copy or download that did not finish?): copy it again, or remove it"
    if head is not None and head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return f"image {source} is a HEIC photo (as iPhones save them) under another name: convert it to JPEG or PNG"
    # Pillow names a dataset cell's bytes by their object ("<_io.BytesIO object at 0x7f...>"), which tells a user nothing.
    said = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
    return f"image {source} cannot be read ({err.__class__.__name__}: {said}): fix or remove it"


def float_levels_problem(image: Image.Image, named: str) -> str | None:
    """Why a decoded image of 32-bit float values cannot train (a depth map saved as float TIFF, a dataset made
    of float arrays): read as levels 0-255, values of 0-1 would train all but black, and values outside 0-255
    (depth in millimetres, 16-bit levels) would be clipped to black or white."""
    if image.mode != "F":
        return None
    low, high = image.getextrema()
    scale = "save it as an 8- or 16-bit PNG (values scaled to 0-255 or 0-65535)"
    if high <= 1.0:
        return f"{named} holds 32-bit float values of 0-1, which train as levels 0-255 (all but black): {scale}"
    if low < 0.0 or high > 255.0:
        return f"{named} holds 32-bit float values of {low:g} to {high:g}, which train as levels 0-255 (clipped to black or white outside them): {scale}"
    return None


def has_alpha(image: Image.Image) -> bool:
    # "transparency": a palette's transparent entries, or the one transparent colour of an RGB or grey PNG
    # (tRNS); not of a 16-bit one, which converting to RGBA would clip before it is scaled to 8 bits.
    return image.mode in ("RGBA", "LA", "PA") or ("transparency" in image.info and not is_16_bit(image))


def is_16_bit(image: Image.Image) -> bool:
    return image.mode.startswith("I;16") or image.mode == "I"


def holds_8_bit_values(image: Image.Image) -> bool:
    """Whether a 16-bit image has no value above 255, as when numpy or OpenCV writes 8-bit values into a
    16-bit file (scaled by 257 as 16-bit values, those would train black)."""
    return int(np.asarray(image).max(initial=0)) <= 255


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (mode I;16 or I) as 8-bit L: scaled by 257, unless it holds 8-bit values."""
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray((values / (1.0 if holds_8_bit_values(image) else 257.0)).clip(0, 255).astype(np.uint8))


def upright_rgb(image: Image.Image, colour_managed: bool = True) -> Image.Image:
    """Apply EXIF rotation and convert any mode (CMYK, 16-bit, alpha, palette, grey) to 8-bit RGB; `colour_managed`:
    a photo's embedded colour profile other than sRGB converts its values to sRGB (`finetune.data.colour_profiles`)."""
    transform = srgb_transform(image) if colour_managed else None  # of the decoded image: rotating makes a new one
    if image.getexif().get(0x0112, 1) in range(2, 9):  # else exif_transpose returns a copy: 36 MB of a 12 MP photo, for nothing
        image = ImageOps.exif_transpose(image)
    if transform is not None and transform.inputMode == "CMYK":
        return apply_profile(image, transform)
    if has_alpha(image):
        # Transparent areas become white rather than whatever colour the hidden pixels hold.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if is_16_bit(image):
        image = to_8_bit(image)
    if image.mode != "RGB":  # convert("RGB") of an RGB image is another copy
        image = image.convert("RGB")
    return image if transform is None else apply_profile(image, transform)


def open_rgb(example: Example, at_least: int | None = None, colour_managed: bool = True) -> Image.Image:
    """Decode fully (so truncation shows), apply EXIF rotation, and convert any mode to RGB (see `upright_rgb`). Pillow's
    warnings are said naming the image (`pillow_warnings_named`), but not every epoch of one the data check named them for."""
    with pillow_warnings_named(example.source, checked=example.digest is not None):
        return upright_rgb(decode(example, at_least), colour_managed)


def upright_size(example: Example) -> Size:
    """(width, height) as trained, after EXIF rotation; from the check, else from the file's header."""
    if example.size is not None:
        return example.size
    return header_upright_size(example.load())  # opened, not converted (a PNG is decoded for its EXIF)


def read_upright_size(example: Example) -> Size:
    """(width, height) after EXIF rotation read from the file again (`header_upright_size`); a file that
    cannot be read is one line, as `decode` says it, not Pillow's traceback."""
    try:
        with example.load() as image:
            return header_upright_size(image)
    except Exception as err:  # PIL raises many types for broken files
        raise FinetuneError(unreadable_message(example.source, err)) from None


def header_upright_size(image: Image.Image) -> Size:
    """(width, height) of an opened image after its EXIF rotation: from its header, but a PNG is decoded whole for its
    EXIF (Pillow's getexif: an eXIf chunk may follow the pixels)."""
    return (image.height, image.width) if turned_on_its_side(image) else image.size


def turned_on_its_side(image: Image.Image) -> bool:
    """Whether the image's EXIF orientation swaps its width and height (a phone's portrait photo, stored lying down)."""
    return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


# The rows pixel_digest hashes at a time: about this many bytes of them.
DIGEST_BAND_BYTES = 1 << 20


def pixel_digest(image: Image.Image) -> str:
    """A hash of an upright RGB image's size and pixels: names its cached latents (see `view_key`). Hashed a band of
    rows at a time, the same digest as of `image.tobytes()` whole: that held the image twice more as bytes (its
    chunks, then their join; 73 MB of a 12 MP photo) in each data-check thread."""
    digest = hashlib.blake2b(f"{image.width}x{image.height}".encode(), digest_size=16)
    rows = max(1, DIGEST_BAND_BYTES // max(1, len(image.getbands()) * image.width))
    for top in range(0, image.height, rows):
        digest.update(image.crop((0, top, image.width, min(image.height, top + rows))).tobytes())
    return digest.hexdigest()


def file_stamp(source: str) -> tuple[int, int, int, int] | None:
    """(size, mtime_ns, ctime_ns, inode) of an image file; None for a dataset row. Size and mtime alone missed a rewrite
    that keeps both (`cp -p`, `rsync -t`, `touch -r` set a file's mtime back, and files of one format and size are often
    of one length): the ctime moves at every write and every change of times, and only the system clock sets it; the
    inode changes where another file is renamed over it. Two writes of the same length within one tick of the file
    system's clock (milliseconds on ext4, up to 2 s on FAT and some network shares), this stat between them, still keep
    all four (on Windows Python's ctime is the creation time: three)."""
    try:
        stat = os.stat(source)
    except (OSError, ValueError):
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino
