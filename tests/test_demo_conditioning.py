"""The demo makes a conditioning image from a photo as the picked ControlNet's training images were made."""

import json
import shutil

import numpy as np
from PIL import Image, ImageFilter

from finetune.conditions import make_condition
from finetune.demo_engine import DemoEngine, Request
from finetune.pipeline_io import METADATA_FILE


def test_canny_from_a_photo_uses_the_thresholds_the_controlnet_recorded(adapters_dir, tiny_model, tmp_path):
    folder = tmp_path / "adapters" / "edges"
    shutil.copytree(adapters_dir / "edges" / "controlnet", folder / "controlnet")
    metadata = json.loads((folder / "controlnet" / METADATA_FILE).read_text())
    made = {"kind": "canny", "low": 60.0, "high": 120.0, "sigma": 2.0}  # make-conditions --low 60 --high 120 --sigma 2
    (folder / "controlnet" / METADATA_FILE).write_text(json.dumps({**metadata, "finetune.conditioning": json.dumps(made)}))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    engine = DemoEngine(str(tiny_model), tmp_path / "adapters")

    request = Request(prompt="a red circle", steps=1, controlnet="edges/controlnet", conditioning_image=photo, conditioning_kind="canny")
    images, labels, _, _ = engine.render(request)
    assert labels[0] == "conditioning"
    expected = make_condition(photo, "canny", low=60.0, high=120.0, sigma=2.0)
    assert np.array_equal(np.asarray(images[0][0]), np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(make_condition(photo, "canny")))  # the defaults make other edges


def test_an_upload_of_another_shape_is_fitted_as_sample_fits_its_condition():
    """The demo cropped a non-square upload before resizing it (ImageOps.fit), `finetune sample` (and training) resize it to
    cover and crop after: edges a pixel apart, so the ControlNet was steered otherwise than in sample by the same image."""
    from finetune.demo_engine import conditioning_image
    from finetune.inference import fit_condition

    mask = np.zeros((150, 200), dtype=np.uint8)
    mask[40:110, 70:140] = 255  # a square, as make-conditions' mask of a centred shape
    for upload in (Image.fromarray(mask), Image.fromarray(mask).transpose(Image.Transpose.ROTATE_90), Image.fromarray(mask).resize((640, 480))):
        expected = np.asarray(fit_condition(upload.convert("RGB"), "mask.png", 64))
        assert np.array_equal(np.asarray(conditioning_image(upload, "as uploaded", 64)), expected), upload.size
        made = np.asarray(make_condition(Image.fromarray(expected), "mask"))
        assert np.array_equal(np.asarray(conditioning_image(upload, "mask", 64)), made), upload.size
