"""An upload reaches the demo's reader as it was uploaded, so the page's condition is `finetune sample --condition`'s
for the same file: gradio's Image component converted every upload that was not RGB to RGB itself first (a 16-bit
depth map clipped rather than scaled, an image's transparency dropped rather than refused or flattened onto white,
a greyscale JPEG decoded and encoded again), before the reader `sample` shares with the demo ever saw it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finetune.demo_engine import conditioning_image
from finetune.demo_inputs import read_upload


@pytest.fixture(scope="module")
def client(demo):
    from gradio_client import Client

    return Client(demo.url, verbose=False)


def conditioning_column(client, path) -> np.ndarray:
    """The demo's conditioning column (the first single image) for the upload `path`, one step on the tiny model."""
    from gradio_client import handle_file

    _grid, gallery, _summary = client.predict(api_name="/generate", prompt="a circle", steps=1, controlnet="edges/controlnet",
                                              conditioning_image=handle_file(str(path)), include_base=False)  # fmt: skip
    assert gallery[0]["caption"] == "conditioning, seed 0"
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))


def gradient(width: int = 96, height: int = 80) -> np.ndarray:
    return np.linspace(0, 1, width * height).reshape(height, width)


@pytest.mark.parametrize("kind", ["16-bit depth map", "greyscale jpeg"])
def test_an_upload_is_read_as_sample_reads_its_condition(client, tmp_path, kind):
    if kind == "16-bit depth map":  # values of 0-65535, scaled to 0-255 as training and sample read them
        path, image = tmp_path / "depth.png", Image.fromarray((gradient() * 65535).astype(np.uint16))
    elif kind == "greyscale jpeg":
        edges = np.random.default_rng(0).integers(0, 2, (80, 96), dtype=np.uint8) * 255  # what a JPEG's encoding changes most
        path, image = tmp_path / "edges.jpg", Image.fromarray(edges)
    image.save(path)
    expected = np.asarray(conditioning_image(read_upload(str(path)), "as uploaded", 64))
    assert np.array_equal(conditioning_column(client, path), expected)


def test_an_upload_drawn_in_its_transparency_is_refused_as_sample_refuses_it(client, tmp_path):
    from gradio_client.exceptions import AppError

    mask = np.zeros((80, 80, 4), dtype=np.uint8)
    mask[20:60, 20:60] = 255  # white and opaque in the square, transparent black around it: flattened onto white, one colour
    Image.fromarray(mask).save(tmp_path / "mask.png")
    with pytest.raises(AppError, match="is one colour once its transparency is flattened onto white"):
        conditioning_column(client, tmp_path / "mask.png")
