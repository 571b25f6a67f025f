"""The demo makes a conditioning image from a photo as the picked ControlNet's training images were made."""

import json
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from finetune.checkpoints.run_files import METADATA_FILE
from finetune.controlnet.conditions import make_condition
from finetune.demo.engine import DemoEngine, Request


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
    from finetune.demo.conditioning import conditioning_image
    from finetune.sampling.inference import fit_condition

    mask = np.zeros((150, 200), dtype=np.uint8)
    mask[40:110, 70:140] = 255  # a square, as make-conditions' mask of a centred shape
    for upload in (Image.fromarray(mask), Image.fromarray(mask).transpose(Image.Transpose.ROTATE_90), Image.fromarray(mask).resize((640, 480))):
        expected = np.asarray(fit_condition(upload.convert("RGB"), "mask.png", 64))
        assert np.array_equal(np.asarray(conditioning_image(upload, "as uploaded", 64)), expected), upload.size
        made = np.asarray(fit_condition(make_condition(upload.convert("RGB"), "mask"), "mask.png", 64))  # made at full size, then fitted
        assert np.array_equal(np.asarray(conditioning_image(upload, "mask", 64)), made), upload.size


def photo_with_shapes(width: int, height: int) -> Image.Image:
    """A photo-like image: a background of soft shading, ellipses of other colours on it, a little grain."""
    rng = np.random.default_rng(0)
    shading = rng.integers(70, 130, (height // 16, width // 16, 3), dtype=np.uint8)
    photo = Image.fromarray(shading).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(photo)
    for _ in range(12):
        x, y = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        draw.ellipse((x, y, x + int(rng.integers(40, 200)), y + int(rng.integers(40, 200))), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    grain = rng.normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(photo, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def test_a_condition_made_from_a_photo_is_the_one_make_conditions_makes_fitted_as_training_and_sample_fit_it(tmp_path):
    """The demo shrank the photo to the sampling size and made its edges (or mask) there, make-conditions makes them at the
    photo's full size and training (or sample --condition) shrinks those: other lines (a fifth of a 256 px canny image's
    pixels differed here, half of a mask's), so the ControlNet was steered by images unlike those it trained on."""
    from finetune.controlnet.conditions import make_condition_folders
    from finetune.data.views import plan_view, render
    from finetune.demo.conditioning import conditioning_image
    from finetune.demo.inputs import read_upload
    from finetune.sampling.inference import fit_condition

    (tmp_path / "photos").mkdir()
    photo_with_shapes(1024, 768).save(tmp_path / "photos" / "photo.png")
    for kind, options in (("canny", {"low": 15.0, "high": 30.0, "sigma": 1.5}), ("mask", {"threshold": 30.0})):
        out = tmp_path / kind
        make_condition_folders(tmp_path / "photos", out, kind, **options)
        with Image.open(out / "conditioning" / "photo.png") as made:
            made = made.convert("RGB")
        assert 0.001 < (np.asarray(made) > 0).mean() < 0.5  # lines or a shape, not a blank or noise
        for size in (256, 512):
            demo = np.asarray(conditioning_image(read_upload(str(tmp_path / "photos" / "photo.png"), photo=True), kind, size, options))
            assert np.array_equal(demo, np.asarray(fit_condition(made, "photo.png", size))), (kind, size)  # as sample fits it
            trained = render(made, plan_view(made.size, (size, size), "center", False, np.random.default_rng(0)))  # as a training view
            assert np.array_equal(demo, np.asarray(trained)), (kind, size)


def test_a_photo_with_a_colour_profile_makes_the_condition_make_conditions_makes(tmp_path):
    """make-conditions reads its photos in sRGB (a Display P3 photo converted), so the demo reads a photo it makes the
    condition of so too; it read every upload's values as they are, as a conditioning image's are (they are data)."""
    from finetune.controlnet.conditions import make_condition_folders
    from finetune.demo.conditioning import conditioning_image
    from finetune.demo.inputs import read_upload
    from finetune.sampling.inference import fit_condition
    from icc_profiles import rgb_profile

    (tmp_path / "photos").mkdir()
    photo = tmp_path / "photos" / "photo.png"
    photo_with_shapes(512, 384).save(photo, icc_profile=rgb_profile("Display P3-like"))
    make_condition_folders(tmp_path / "photos", tmp_path / "made", "luminance")
    with Image.open(tmp_path / "made" / "conditioning" / "photo.png") as made:
        expected = np.asarray(fit_condition(made.convert("RGB"), "photo.png", 256))
    assert np.array_equal(np.asarray(conditioning_image(read_upload(str(photo), photo=True), "luminance", 256)), expected)
    with Image.open(photo) as raw:  # a conditioning image upload: its values as they are
        assert np.array_equal(np.asarray(read_upload(str(photo))), np.asarray(raw.convert("RGB")))


def test_the_condition_made_of_an_upload_is_made_once_for_renders_of_the_same_photo(adapters_dir, tiny_model, tmp_path, monkeypatch):
    """Made at the photo's full size, a large photo's edges take seconds: made again for every render of the same upload
    (another prompt, seed or strength), each render waited for them. Another photo, kind or size is made (or fitted) anew."""
    import finetune.controlnet.conditions as conditions

    made = []
    monkeypatch.setattr(conditions, "make_condition", lambda image, kind, **options: made.append(kind) or make_condition(image, kind, **options))
    shutil.copytree(adapters_dir / "edges" / "controlnet", tmp_path / "adapters" / "edges" / "controlnet")
    engine = DemoEngine(str(tiny_model), tmp_path / "adapters")
    photo = photo_with_shapes(512, 384)

    def rendered(prompt, kind="canny", size=64, upload=photo):
        request = Request(prompt=prompt, steps=1, size=size, controlnet="edges/controlnet", conditioning_image=upload.copy(), conditioning_kind=kind)
        return np.asarray(engine.render(request)[0][0][0])

    first = rendered("a red circle")
    assert np.array_equal(rendered("a blue square"), first) and made == ["canny"]
    assert rendered("a red circle", size=128).shape == (128, 128, 3) and made == ["canny"]  # the same edges, fitted to another size
    rendered("a red circle", kind="mask")
    rendered("a red circle", upload=photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert made == ["canny", "mask", "canny"]


def declared_canvas(path, width: int, height: int):
    """A PNG of a few bytes whose header declares `width` x `height` (no pixel data: refused before any decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IEND", b""))
    return path


def test_the_demo_takes_a_phones_photo_and_refuses_past_64_megapixels_in_one_line_naming_make_conditions(tmp_path):
    """It refused any upload over 4096x4096, a phone's photo among them. Past 8192x8192 it still refuses (a condition is
    made at the upload's full size), by the upload's header, saying to downscale it or make the condition with
    make-conditions, which reads more."""
    import pytest

    from finetune.demo.conditioning import conditioning_image
    from finetune.demo.inputs import check_upload, read_upload
    from finetune.errors import FinetuneError

    photo = tmp_path / "photo.png"
    Image.new("RGB", (8064, 6048), (30, 60, 90)).save(photo)  # an iPhone's 48 megapixels
    check_upload(str(photo))
    assert conditioning_image(read_upload(str(photo), photo=True), "as uploaded", 64).size == (64, 64)
    with pytest.raises(FinetuneError) as uploaded:
        check_upload(str(declared_canvas(tmp_path / "vast.png", 8193, 8192)))
    assert str(uploaded.value) == ("the uploaded image vast.png is too large for the demo (8193x8192; at most 67 megapixels, a 48-megapixel "
                                   "phone photo fits): downscale it, or make its condition with finetune make-conditions and upload that")  # fmt: skip
    with pytest.raises(FinetuneError) as bomb:  # past Pillow's own bound, which reads no size: its words stand for it
        check_upload(str(declared_canvas(tmp_path / "vast.png", 30000, 30000)))
    assert str(bomb.value).startswith("the uploaded image vast.png is too large for the demo (Image size (900000000 pixels) exceeds limit")


def test_a_condition_made_as_another_kind_than_the_controlnet_trained_on_is_said(demo):
    """The fixture's ControlNet records canny training images; a mask made for it rendered without a word."""
    photo = photo_with_shapes(256, 256)
    summaries = {kind: demo.engine.render(Request(prompt="x", steps=1, controlnet="edges/controlnet", conditioning_image=photo, conditioning_kind=kind))[3]
                 for kind in ("mask", "canny", "as uploaded")}  # fmt: skip
    # Asked for by its folder (edges/controlnet, still taken), named as the list shows it: the note named the folder.
    assert summaries["mask"].endswith("; note: ControlNet edges was trained on canny images and this condition was made as mask: "
                                      "pick canny to steer as it learned")  # fmt: skip
    assert "note" not in summaries["canny"]


def test_a_run_folder_asked_for_is_labelled_as_the_list_shows_it(demo):
    """Two LoRAs whose short names are the same ('trained') label their columns by full names, the ControlNet's among them:
    asked for by its folder, it was labelled edges/controlnet, an entry the list does not have (it lists edges)."""
    request = Request(prompt="x", steps=1, loras=[("trained", 1.0), ("webui/trained", 1.0)], separate=True, controlnet="edges/controlnet",
                      conditioning_image=photo_with_shapes(256, 256), conditioning_kind="canny", include_base=False)  # fmt: skip
    assert demo.engine.render(request)[1] == ["conditioning", "trained+edges x1", "webui/trained+edges x1"]
    assert "edges" in demo.engine.names("controlnet") and "edges/controlnet" not in demo.engine.names("controlnet")


def test_a_photo_uploaded_as_is_for_an_edge_controlnet_is_said(demo):
    """The usual mistake: a photo given as is to the fixture's canny ControlNet steered as it never learned, without a word
    (only a condition made as another kind was said). A canny image uploaded as is, JPEG-saved too, is not said."""
    import io

    photo = photo_with_shapes(256, 256)

    def summary(image: Image.Image) -> str:
        request = Request(prompt="x", steps=1, controlnet="edges/controlnet", conditioning_image=image, conditioning_source="photo.png (uploaded)")
        return demo.engine.render(request)[3]

    assert summary(photo).endswith("; note: the conditioning image photo.png (uploaded) is no canny image (make-conditions makes them black "
                                   "and white; it has colours): a photo steers as the ControlNet never learned; pick canny to make one of it")  # fmt: skip
    assert "it has shades of grey" in summary(photo.convert("L").convert("RGB"))
    edges = make_condition(photo, "canny")
    jpeg = io.BytesIO()
    edges.save(jpeg, "JPEG", quality=75)
    assert "note" not in summary(edges) and "note" not in summary(Image.open(jpeg))


def test_an_uploads_kind_is_judged_without_copying_its_full_size(tmp_path):
    """The demo takes uploads up to 67 megapixels; judging one used as is copied it whole in int16 (300 MB for 48 megapixels)
    and more for its means. Judged on 1024 px a side, picked without new greys, it is told the same."""
    import tracemalloc

    from finetune.controlnet.conditioning_records import unlike_its_kind

    photo = photo_with_shapes(256, 256).resize((4000, 4000), Image.Resampling.NEAREST)
    edges = make_condition(photo_with_shapes(256, 256), "canny").resize((4000, 4000), Image.Resampling.NEAREST)
    tracemalloc.start()
    try:
        assert unlike_its_kind(photo, "canny") == "has colours" and unlike_its_kind(edges, "canny") is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"{peak / 1e6:.0f} MB"
