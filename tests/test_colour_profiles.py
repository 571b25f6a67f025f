"""Photos with an embedded colour profile other than sRGB train as sRGB (converted at decode time); images without
one, or with an sRGB one, decode bit-identically to before; conditioning images are read as they are."""

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from finetune.config import DataConfig
from finetune.controlnet.data import ControlNetDataset
from finetune.controlnet.pairs import Pair, read_conditioning
import finetune.data.colour_profiles as colour_profiles
from finetune.data.items import CaptionedImageDataset, render_pixels
from finetune.data_check.check import CONVERTED, inspect_examples
from data_examples import load_examples
from finetune.data.images import open_rgb, pixel_digest
from finetune.data.sources import Example, read_examples
from finetune.data.views import plan_view, view_key
from icc_profiles import DISPLAY_P3_D50, SRGB_D50, rgb_profile

RED = (230, 60, 40)  # a saturated red: in Display P3 it is redder than sRGB's (230, 60, 40)
DISPLAY_P3 = rgb_profile("Display P3 (test)")


def srgb_of_display_p3(rgb) -> np.ndarray:
    """The reference: Display P3 (gamma 2.2, as the test profile has it) values -> XYZ (D50) -> sRGB, clipped to its gamut."""
    linear = (np.asarray(rgb, dtype=np.float64) / 255.0) ** 2.2
    srgb_linear = np.clip(np.linalg.solve(np.array(SRGB_D50).T, np.array(DISPLAY_P3_D50).T @ linear), 0.0, 1.0)
    encoded = np.where(srgb_linear <= 0.0031308, 12.92 * srgb_linear, 1.055 * srgb_linear ** (1 / 2.4) - 0.055)
    return encoded * 255.0


def save(path, image, **options):
    image.save(path, **options)
    return Example(str(path), "a thing", lambda p=path: Image.open(p))


def raw_rgb(path) -> np.ndarray:
    """What the decode gave before colour profiles were read: the file's values."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_display_p3_photo_decodes_to_its_srgb_colours(tmp_path):
    example = save(tmp_path / "p3.png", Image.new("RGB", (64, 64), RED), icc_profile=DISPLAY_P3)
    decoded = np.asarray(open_rgb(example)).astype(int)
    expected = srgb_of_display_p3(RED)  # about (251, 25, 0): redder than the values as sRGB
    assert np.abs(decoded - expected).max() <= 2, (decoded[0, 0], expected)
    assert np.abs(decoded[0, 0] - np.array(RED)).max() > 15


def test_a_converted_photo_gets_new_cache_keys(tmp_path):
    """Latents cached from the raw values (the digest names each view's entry) are not served for the converted photo."""
    save(tmp_path / "p3.png", Image.new("RGB", (64, 64), RED), icc_profile=DISPLAY_P3)
    (tmp_path / "p3.txt").write_text("a thing")
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    [checked] = inspect_examples(read_examples(config), config, "data").usable
    old_digest = pixel_digest(Image.fromarray(raw_rgb(tmp_path / "p3.png")))
    assert checked.digest != old_digest
    plan = plan_view((64, 64), (64, 64), "center", False, np.random.default_rng(0))
    assert view_key(checked.digest, plan) != view_key(old_digest, plan)
    # What trains (a cached view rendered as checked) is the converted photo
    pixels = render_pixels(checked, plan)
    assert np.abs(((pixels[:, 0, 0].numpy() + 1.0) * 127.5) - srgb_of_display_p3(RED)).max() <= 2.5


@pytest.mark.parametrize("kind", ["no profile png", "no profile jpeg", "no profile cmyk jpeg", "pillow srgb", "srgb iec61966"])
def test_images_without_a_profile_or_with_srgb_decode_as_before(tmp_path, kind):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    options = {"pillow srgb": {"icc_profile": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()},
               "srgb iec61966": {"icc_profile": rgb_profile("sRGB IEC61966-2.1", SRGB_D50)}}.get(kind, {})  # fmt: skip
    if "cmyk" in kind:
        image = image.convert("CMYK")
    path = tmp_path / ("image.jpg" if "jpeg" in kind else "image.png")
    example = save(path, image, **options)
    decoded = open_rgb(example)
    assert np.array_equal(np.asarray(decoded), raw_rgb(path))
    assert pixel_digest(decoded) == pixel_digest(Image.fromarray(raw_rgb(path)))


def test_a_rotated_photo_with_transparency_is_converted_and_white_stays_white(tmp_path):
    image = Image.new("RGBA", (40, 64), RED + (255,))
    image.paste((0, 0, 0, 0), (0, 0, 40, 8))  # a transparent band: flattened onto white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored lying down
    example = save(tmp_path / "turned.png", image, icc_profile=DISPLAY_P3, exif=exif)
    decoded = open_rgb(example)
    assert decoded.size == (64, 40)
    pixels = np.asarray(decoded).astype(int)
    assert np.abs(pixels[20, 20] - srgb_of_display_p3(RED)).max() <= 2
    assert np.abs(pixels[0, 63] - 255).max() <= 1  # the transparent band, now on the right


def test_conditioning_images_are_read_as_they_are(tmp_path):
    """A depth map or an edge image holds data, not a photo's colours: a profile on it converts nothing."""
    photo = save(tmp_path / "photo.png", Image.new("RGB", (64, 64), RED), icc_profile=DISPLAY_P3)
    conditioning = save(tmp_path / "edges.png", Image.new("RGB", (64, 64), RED), icc_profile=DISPLAY_P3)
    assert np.array_equal(np.asarray(read_conditioning(conditioning)), raw_rgb(tmp_path / "edges.png"))
    config = DataConfig(image_dir=str(tmp_path), resolution=64, random_flip=False, crop="center")
    dataset = ControlNetDataset([Pair(photo, conditioning)], config, seed=0, empty_prompt_share=0.0)
    item = dataset[(0, 0)]
    assert np.array_equal(np.rint(item["conditioning_pixel_values"][:, 0, 0].numpy() * 255.0), RED)
    assert np.abs((item["pixel_values"][:, 0, 0].numpy() + 1.0) * 127.5 - srgb_of_display_p3(RED)).max() <= 2.5


def test_class_and_training_images_convert_through_the_dataset(tmp_path):
    save(tmp_path / "p3.png", Image.new("RGB", (64, 64), RED), icc_profile=DISPLAY_P3)
    (tmp_path / "p3.txt").write_text("a thing")
    config = DataConfig(image_dir=str(tmp_path), resolution=64, random_flip=False)
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    pixels = dataset[(0, 0)]["pixel_values"][:, 10, 10].numpy()
    assert np.abs((pixels + 1.0) * 127.5 - srgb_of_display_p3(RED)).max() <= 2.5


def test_the_data_check_says_which_images_were_converted(tmp_path):
    save(tmp_path / "p3.png", Image.new("RGB", (64, 64), RED), icc_profile=DISPLAY_P3)
    save(tmp_path / "plain.png", Image.new("RGB", (64, 64), RED))
    for name in ("p3", "plain"):
        (tmp_path / f"{name}.txt").write_text("a thing")
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    report = inspect_examples(read_examples(config), config, "data")
    converted = [(f.source.rsplit("/", 1)[-1], f.message) for f in report.findings if f.level == CONVERTED]
    assert converted == [("p3.png", f"image {tmp_path / 'p3.png'}: colour profile 'Display P3 (test)': converted to sRGB")]


def test_without_littlecms_the_raw_values_train_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(colour_profiles, "ImageCms", None)
    colour_profiles._warn_no_littlecms.cache_clear()
    monkeypatch.setattr(colour_profiles, "warn", lambda line, by="run": print(f"warning: {line}"))
    example = save(tmp_path / "p3.png", Image.new("RGB", (64, 64), RED), icc_profile=DISPLAY_P3)
    for _ in range(3):
        assert np.array_equal(np.asarray(open_rgb(example)), raw_rgb(tmp_path / "p3.png"))
    said = capsys.readouterr().out
    assert said.count("warning: Pillow was built without littlecms") == 1
    colour_profiles._warn_no_littlecms.cache_clear()


def test_an_unreadable_profile_trains_the_raw_values(tmp_path):
    example = save(tmp_path / "broken.png", Image.new("RGB", (64, 64), RED), icc_profile=b"not a profile" * 20)
    assert np.array_equal(np.asarray(open_rgb(example)), raw_rgb(tmp_path / "broken.png"))
    assert "cannot be read" in colour_profiles.profile_note(Image.open(tmp_path / "broken.png"))


def test_a_profiled_png_round_trips_through_bytes():
    """The test profile is a valid RGB profile littlecms reads (else every test above would test nothing)."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(DISPLAY_P3))
    assert ImageCms.getProfileDescription(profile).strip() == "Display P3 (test)"
    assert profile.profile.xcolor_space == "RGB "
