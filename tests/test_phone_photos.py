"""A creator's folder of phone photos, as the data check reads it: what it says of them in its `converted` lines."""

from PIL import Image

from finetune.config import DataConfig
from finetune.data.sources import read_examples
from finetune.data_check.check import CONVERTED, inspect_examples
from odd_images import noise


def save_turned(path, seed, orientation=6):
    """Stored lying on its side (or upside down, 3) with the EXIF orientation that turns it, as phones save photos."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    noise(96, 64, seed=seed).save(path, exif=exif)
    path.with_suffix(".txt").write_text("a photo")


def converted_lines(folder):
    config = DataConfig(image_dir=str(folder), resolution=64)
    report = inspect_examples(read_examples(config), config, "photos")
    return report, [line for line in report.lines() if line.startswith("converted: ")]


def test_photos_turned_by_their_exif_orientation_are_one_line_past_three(tmp_path):
    """A phone folder's portrait and upside-down photos (60 of 120) said one `converted` line each, burying the other
    findings; past three, they are one line with the first three names. Other conversions stay one line per image."""
    for i, orientation in enumerate([6, 8, 3, 6, 6]):
        save_turned(tmp_path / f"IMG_{i}.jpg", seed=i, orientation=orientation)
    noise(64, 64, seed=9).convert("CMYK").save(tmp_path / "print.jpg")
    (tmp_path / "print.txt").write_text("a print")
    report, lines = converted_lines(tmp_path)
    assert lines == ["converted: 5 images (IMG_0.jpg, IMG_1.jpg, IMG_2.jpg, ...): EXIF orientation: rotated upright, as photo viewers show them",
                     f"converted: image {tmp_path / 'print.jpg'}: CMYK: converted to RGB"]  # fmt: skip
    assert [finding.source for finding in report.findings if finding.level == CONVERTED] == ["photos", str(tmp_path / "print.jpg")]
    turned = [example.size for example in report.usable if "IMG_" in example.source]
    assert turned == [(64, 96), (64, 96), (96, 64), (64, 96), (64, 96)]  # each turned as before (3: upside down)

    for i in (3, 4):  # three turned: each named on its line, with its orientation
        (tmp_path / f"IMG_{i}.jpg").unlink()
    _, lines = converted_lines(tmp_path)
    assert lines[:3] == [f"converted: image {tmp_path / f'IMG_{i}.jpg'}: EXIF orientation {o}: rotated upright" for i, o in enumerate([6, 8, 3])]
