"""What reading an image as training does to it (`finetune.data.images.upright_rgb`), in the data check's `converted`
lines: one per image and change, but for a turn by its EXIF orientation, which a folder of phone photos holds for every
photo taken as a portrait or upside down (60 of 120 phone photos said one line each: 65 of check-data's 72 lines were `converted` ones): past a few
images, those are one line, the first few by name."""

from __future__ import annotations

from pathlib import Path

from finetune.data.colour_profiles import profile_note
from finetune.data.images import EIGHT_BIT_VALUES, has_alpha, holds_8_bit_values, is_16_bit

EIGHT_BIT_WORDS = "its values are 8-bit ones (none above 255), read as such"

# Turned images listed by name, each on its own line, up to this many; more are one line naming this many.
TURNED_NAMED = 3


def conversions(image, alpha_is_mask: bool = False) -> list[str]:
    """What `upright_rgb` will do to this decoded image, in words (`alpha_is_mask`: its transparency is
    its loss mask, data.loss_mask.source alpha)."""
    done = []
    # An animated WebP or PNG (APNG) trains its first frame; not a camera's MPO JPEG, whose second "frame" is its preview.
    if image.format in ("WEBP", "PNG") and getattr(image, "n_frames", 1) > 1:
        done.append(f"animated ({image.n_frames} frames): its first frame trains (save the frames to train as images of their own)")
    orientation = image.getexif().get(0x0112, 1)
    if orientation in range(2, 9):  # 1 is upright; other values are invalid, and ImageOps.exif_transpose ignores them
        done.append(f"EXIF orientation {orientation}: rotated upright")
    if image.mode == "CMYK":
        done.append("CMYK: converted to RGB")
    elif is_16_bit(image):
        done.append(f"16-bit ({image.mode}): " + (EIGHT_BIT_WORDS if holds_8_bit_values(image) else "scaled to 8-bit RGB"))
    elif image.info.get(EIGHT_BIT_VALUES):  # a 16-bit RGB PNG, decoded as 8-bit RGB (`finetune.data.images.low_bytes`)
        done.append(f"16-bit (RGB): {EIGHT_BIT_WORDS}")
    elif has_alpha(image) and not opaque(image):
        done.append(f"transparency ({image.mode}): " + ("its loss mask; the pixels composited on white" if alpha_is_mask else "composited on white"))
    elif image.mode in ("P", "PA"):
        done.append("palette image: converted to RGB")
    elif image.mode not in ("RGB", "RGBA"):  # RGBA here is opaque everywhere: compositing changes no pixel, nothing to say
        done.append(f"mode {image.mode}: converted to RGB")
    return done + [note] if (note := profile_note(image)) else done


def opaque(image) -> bool:
    """Whether an image with alpha (`has_alpha`) is opaque everywhere, as a screenshot saved with an alpha channel is."""
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else image.convert("RGBA").getchannel("A")
    return alpha.getextrema()[0] == 255


def is_turn(source: str, message: str) -> bool:
    """Whether `message` is image `source`'s line of a turn by its EXIF orientation (`conversions`, said per image)."""
    return message.startswith(f"image {source}: EXIF orientation ") and message.endswith(": rotated upright")


def turns_line(sources: list[str]) -> str:
    """The one line of more than TURNED_NAMED images turned by their EXIF orientation."""
    names = ", ".join(Path(source).name for source in sources[:TURNED_NAMED])
    return f"{len(sources)} images ({names}, ...): EXIF orientation: rotated upright, as photo viewers show them"
