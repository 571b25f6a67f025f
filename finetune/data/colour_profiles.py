"""Photos with an embedded colour profile read as sRGB, as a browser or photo viewer shows them.

A phone's photo (an iPhone's Display P3), a camera's (Adobe RGB) or a print file's (CMYK) holds values of its own
colour space: trained as they are, they would train as sRGB values, duller or more saturated than the photo looks,
and the model would learn those colours. `upright_rgb` converts them with littlecms (PIL.ImageCms) at decode time.
An image without a profile, or with an sRGB one, is not touched (its pixels, so its digest and cached latents, stay
as they were); a converted image's pixels change, so its digest does, and with it the key of each cached view
(`views.view_key`): latents cached from the raw values are never served for it.

Relative colorimetric: colours inside sRGB keep their exact colour (white to white), colours outside it are
clipped to its edge. It is what browsers and photo viewers use for a photo's profile; perceptual would shift
in-gamut colours too, and a matrix profile (Display P3, Adobe RGB) has no perceptual table (littlecms falls back).

Conditioning images (depth maps, edges, segmentation colours) are data rather than photos: their values are
read as they are (`colour_managed=False`), in training and at sampling alike.
"""

from __future__ import annotations

import functools
import io

from PIL import Image

from finetune.console import warn

try:
    from PIL import ImageCms
except ImportError:  # a Pillow built without littlecms
    ImageCms = None


def profile_bytes(image: Image.Image) -> bytes | None:
    return image.info.get("icc_profile") or None


@functools.lru_cache(maxsize=32)
def _conversion(profile: bytes, mode: str):
    """(transform or None, what was done in words) for a profile of an image of `mode` (as decoded)."""
    try:
        embedded = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        name = (ImageCms.getProfileDescription(embedded) or "unnamed").strip()
    except (OSError, ImageCms.PyCMSError) as err:
        return None, f"colour profile cannot be read ({err}): its values train as sRGB"
    if "srgb" in name.lower():
        return None, None  # sRGB itself (any of its versions): the values are the ones trained
    space = embedded.profile.xcolor_space.strip()
    if space == "RGB" and mode not in ("CMYK", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1"):
        in_mode = "RGB"  # applied to the image as converted to 8-bit RGB (transparency flattened, palette expanded)
    elif space == "CMYK" and mode == "CMYK":
        in_mode = "CMYK"  # applied to the decoded CMYK values, instead of Pillow's naive CMYK -> RGB
    else:  # a grey profile, or one that does not fit the image's mode: the values train as they are
        return None, None
    try:
        transform = ImageCms.buildTransform(embedded, ImageCms.createProfile("sRGB"), in_mode, "RGB",
                                            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)  # fmt: skip
    except ImageCms.PyCMSError as err:
        return None, f"colour profile '{name}' cannot be converted ({err}): its values train as sRGB"
    return transform, f"colour profile '{name}': converted to sRGB"


@functools.lru_cache(maxsize=1)
def _warn_no_littlecms() -> None:
    warn("Pillow was built without littlecms (PIL.ImageCms), so photos with a colour profile (Display P3, Adobe RGB) train "
         "their raw values as sRGB (colours shifted): install a Pillow with it (pip install --force-reinstall pillow)", by="machine")  # fmt: skip


def srgb_transform(image: Image.Image):
    """The transform that takes this decoded image's values to sRGB, or None (no profile, an sRGB one, or one that
    cannot be used). Its `inputMode` says whether it applies to the CMYK image or to its RGB conversion."""
    profile = profile_bytes(image)
    if profile is None:
        return None
    if ImageCms is None:
        _warn_no_littlecms()
        return None
    return _conversion(profile, image.mode)[0]


def profile_note(image: Image.Image) -> str | None:
    """What reading as sRGB does to this decoded image, in words for the data check; None where nothing is done."""
    profile = profile_bytes(image)
    if profile is None:
        return None
    if ImageCms is None:
        return "colour profile not converted (Pillow has no littlecms): its values train as sRGB"
    return _conversion(profile, image.mode)[1]


def apply(image: Image.Image, transform) -> Image.Image:
    return ImageCms.applyTransform(image, transform)
