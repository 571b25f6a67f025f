"""The conditioning image the demo gives a ControlNet: an upload used as it is, or made into the kind of map a ControlNet
was trained on (canny, luminance, mask) at the upload's full size, then fitted to the grid's size as training and
`finetune sample --condition` fit one."""

from __future__ import annotations

from typing import Callable

from PIL import Image

from finetune.controlnet.condition_kinds import KINDS
from finetune.controlnet.pairs import small_conditioning_problem
from finetune.data.views import cover_and_center_crop
from finetune.demo.inputs import MAX_UPLOAD_PIXELS, UPLOADED, too_large_upload
from finetune.errors import FinetuneError

CONDITIONING_KINDS = ("as uploaded", *KINDS)  # an upload as it is, or made into a kind make-conditions makes


def conditioning_image(image: Image.Image | None, kind: str, size: int, options: dict[str, float] | None = None,
                       make: Callable[..., Image.Image] | None = None, source: str = UPLOADED) -> Image.Image:  # fmt: skip
    """The uploaded image (named `source` in messages), used as is or turned into a conditioning map (with `options`: the thresholds the ControlNet's
    training images were made with; by `make`, default `make_condition`), then fitted to `size` (resized to cover, center-cropped)."""
    from finetune.controlnet.conditions import make_condition

    if image is None:
        raise FinetuneError("a ControlNet needs a conditioning image: upload one, or a photo and pick canny, luminance or mask")
    if kind not in CONDITIONING_KINDS:
        raise FinetuneError(f"unknown conditioning kind '{kind}': use one of {', '.join(CONDITIONING_KINDS)}")
    if image.width * image.height > MAX_UPLOAD_PIXELS:  # (the page's upload is refused by its header first)
        raise FinetuneError(too_large_upload(f"{image.width}x{image.height}", source))
    if (problem := small_conditioning_problem(image, source, size)) is not None:
        raise FinetuneError(f"{problem}, or a smaller size")
    # Made at the upload's full size, as make-conditions makes a ControlNet's training images, and only then fitted: the
    # edges (or mask) of a photo shrunk to `size` are other lines than its edges shrunk, and steered otherwise than in training.
    image = image.convert("RGB")
    made = image if kind == "as uploaded" else (make or make_condition)(image, kind, **(options or {}))
    # Resized to cover, then center-cropped, as `finetune sample --condition` and training fit a conditioning image
    # (ImageOps.fit crops first: edges a pixel off, a ControlNet steered otherwise than in sample for the same upload).
    return cover_and_center_crop(made, (size, size))
