"""Pillow's warnings about an image (here the one of a photo whose EXIF is cut short) name no file, and Python shows each
text once per process: the data check, training's data and make-conditions name the image, each one."""

import re
import warnings
from pathlib import Path

import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.controlnet.conditions import make_condition_folders
from finetune.data.images import open_rgb
from finetune.data.sources import Example, read_examples
from finetune.data_check.check import WARNING, inspect_examples
from finetune.errors import FinetuneError


def cut_exif_photo(path: Path) -> Path:
    """A JPEG whose EXIF holds a description longer than the bytes left of it (an editor or a copy cut it short)."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 200  # ImageDescription, stored past the tag list at an offset
    exif[0x0112] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 100, 50)).save(path, exif=exif.tobytes()[:-150])
    (path.with_suffix(".txt")).write_text("a photo")
    return path


def pillows_warning(photo: Path) -> str:
    """What the installed Pillow warns of `photo`'s cut EXIF, in its words: "Truncated File Read" (Pillow 12), "Tag data
    larger than file. Skipping tag 270" (13). The lines under test carry Pillow's text, whichever it is."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with Image.open(photo) as image:
            image.getexif()
    assert len(shown) == 1, [str(w.message) for w in shown]
    return str(shown[0].message)


def test_the_data_check_names_each_image_pillow_warned_about(tmp_path):
    for name in ("a.jpg", "b.jpg"):  # the second's warning is the first's text: Python would not show it at all
        cut_exif_photo(tmp_path / "photos" / name)
    config = DataConfig(image_dir=str(tmp_path / "photos"), resolution=64)
    report = inspect_examples(read_examples(config), config, "photos")
    said = [finding.message for finding in report.findings if finding.level == WARNING and "Pillow" in finding.message]
    warned = pillows_warning(tmp_path / "photos" / "a.jpg")
    assert said == [f"image {tmp_path / 'photos' / name}: Pillow warned while reading it: {warned} "
                    "(it reads as decoded; re-save it to be rid of this)" for name in ("a.jpg", "b.jpg")]  # fmt: skip
    assert len(report.usable) == 2


def test_make_conditions_says_one_line_per_image_naming_it(tmp_path, capfd):
    for name in ("a.jpg", "b.jpg"):
        cut_exif_photo(tmp_path / "photos" / name)
    make_condition_folders(tmp_path / "photos", tmp_path / "out", "luminance")
    out, err = capfd.readouterr()
    warned = pillows_warning(tmp_path / "photos" / "a.jpg")
    lines = [line for line in (out + err).splitlines() if warned in line]
    assert lines == [f"warning: image {tmp_path / 'photos' / name}: Pillow warned while reading it: {warned} "
                     "(it reads as decoded; re-save it to be rid of this)" for name in ("a.jpg", "b.jpg")]  # fmt: skip


def test_an_image_is_named_once_and_not_by_the_training_loader_after_the_check(tmp_path, capfd):
    photo = str(cut_exif_photo(tmp_path / "c.jpg"))
    for _ in range(2):
        open_rgb(Example(photo, "", lambda: Image.open(photo)))
    open_rgb(Example(str(cut_exif_photo(tmp_path / "d.jpg")), "", lambda: Image.open(tmp_path / "d.jpg"), digest="checked"))
    out, err = capfd.readouterr()
    assert (out + err).count(pillows_warning(photo)) == 1 and "c.jpg" in out


def test_other_warnings_and_pillows_outside_a_decode_are_shown_as_ever(tmp_path, recwarn, monkeypatch):
    import finetune.data.image_warnings

    monkeypatch.setattr(finetune.data.image_warnings, "_shown_outside", set())  # as in a process that has shown none yet
    photo = cut_exif_photo(tmp_path / "e.jpg")
    open_rgb(Example(str(photo), "", lambda: Image.open(photo)))
    warnings.warn("not about an image")
    for _ in range(2):  # read by a caller of Pillow's own: its warning as Python's default filter shows it, once
        with Image.open(photo) as image:
            image.getexif()
    warned = [str(w.message) for w in recwarn]
    assert warned == ["not about an image", pillows_warning(photo)]


def test_an_image_past_pillows_pixel_bound_is_told_to_be_downscaled_not_re_saved(tmp_path, monkeypatch):
    """A re-save keeps the pixels that Pillow's DecompressionBombWarning is about (a 320-megapixel scan trains, as
    finetune reads up to twice Pillow's raised bound): only fewer of them end it."""
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(tmp_path / "photos" / "scan.png")
    (tmp_path / "photos" / "scan.txt").write_text("a scan")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # as 320 megapixels are past finetune's 300
    config = DataConfig(image_dir=str(tmp_path / "photos"), resolution=64)
    report = inspect_examples(read_examples(config), config, "photos")
    said = [finding.message for finding in report.findings if finding.level == WARNING and "Pillow" in finding.message]
    assert len(said) == 1 and "decompression bomb" in said[0] and said[0].endswith("(it reads as decoded; downscale it to be rid of this)")
    assert len(report.usable) == 1


def test_the_line_is_said_over_a_progress_bar_not_after_it(tmp_path, monkeypatch):
    """A validation image read while training's bar is drawn: printed, the line went on after the bar's text on its line."""
    import io
    import sys

    from tqdm import tqdm

    terminal = io.StringIO()  # stdout and stderr: one terminal
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    photo = str(cut_exif_photo(tmp_path / "e.jpg"))
    with tqdm(total=2, desc="training"):
        open_rgb(Example(photo, "", lambda: Image.open(photo)))
    before = terminal.getvalue().split("warning: image", 1)[0]
    assert "training:" in before and before.endswith("\r")  # the bar cleared from its line first, then drawn again below


def test_a_users_error_filter_still_raises_pillows_warnings_in_a_decode_and_after_it(tmp_path):
    """`python -W error::UserWarning:PIL.TiffImagePlugin` (a filter on Pillow's module, as its docs suggest for
    DecompressionBombWarning): this module's filter, first in the list, made it show the warning instead."""
    photo = cut_exif_photo(tmp_path / "f.jpg")
    warned = pillows_warning(photo)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UserWarning, module=r"PIL\.TiffImagePlugin\Z")  # what that -W makes
        with pytest.raises(FinetuneError, match=rf"^image .*f.jpg cannot be read \(UserWarning: {re.escape(warned)}\): fix or remove it$"):
            open_rgb(Example(str(photo), "", lambda: Image.open(photo)))  # the decode's own one line
        with pytest.raises(UserWarning, match=re.escape(warned)), Image.open(photo) as image:
            image.getexif()  # after a decode put this module's filter first


def test_a_users_ignore_filter_silences_pillows_warnings_in_a_decode_and_after_it(tmp_path, recwarn, capfd):
    photo = cut_exif_photo(tmp_path / "g.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # python -W ignore, PYTHONWARNINGS=ignore
        open_rgb(Example(str(photo), "", lambda: Image.open(photo)))
        with Image.open(photo) as image:
            image.getexif()
    out, err = capfd.readouterr()
    assert pillows_warning(photo) not in out + err and [str(w.message) for w in recwarn] == []


def test_a_users_always_filter_shows_pillows_warning_outside_a_decode_each_time(tmp_path, recwarn):
    photo = cut_exif_photo(tmp_path / "h.jpg")
    open_rgb(Example(str(photo), "", lambda: Image.open(photo)))  # this module's filter in place
    warnings.simplefilter("always")
    for _ in range(2):
        with Image.open(photo) as image:
            image.getexif()
    warned = [str(w.message) for w in recwarn]
    assert warned == [pillows_warning(photo)] * 2
