"""The folder listings kept by the name lookups (caption files, metadata rows' images, loss masks) are keyed on the
folder's mtime, which moves once per tick of the file system's clock (2 s on FAT, 1 s on ext3 and many network shares):
a file added or renamed in the tick the folder was listed in leaves the mtime as it was. Such a change is simulated
here by setting the folder's time back to what it was, with the clock the listings read pinned a millisecond after it."""

import os

import pytest
from PIL import Image

from finetune.captions import file_names
from finetune.captions.captions import sidecar_path
from finetune.captions.file_names import loosely_named_file, row_image_key
from finetune.config import LossMaskConfig
from finetune.data.loss_mask import image_sharing_mask, mask_path

# When the test folders last changed, as their mtime says (any fixed time: nothing here reads the real clock).
CHANGED_NS = 1_700_000_000 * 10**9


def still(*folders):
    """Set `folders`' times to CHANGED_NS: as they were, to a clock too coarse to see the change just made."""
    for folder in folders:
        os.utime(folder, ns=(CHANGED_NS, CHANGED_NS))


@pytest.fixture
def clock(monkeypatch):
    """The clock the listings read, pinned to `clock.now` (a millisecond after the folders changed, unless set)."""

    class Clock:
        now = CHANGED_NS + 10**6

    monkeypatch.setattr(file_names, "time_ns", lambda: Clock.now, raising=False)
    return Clock


def image(path):
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def test_a_caption_file_added_in_the_tick_the_folder_was_listed_in_is_read(tmp_path, clock):
    photo = image(tmp_path / "a.png")
    still(tmp_path)
    assert sidecar_path(photo) is None
    (tmp_path / "A.TXT").write_text("a red square")  # found by the listing only: its exact name is a.txt
    still(tmp_path)
    assert sidecar_path(photo) == tmp_path / "A.TXT"


def test_an_image_renamed_in_the_tick_its_folder_was_listed_in_is_the_one_a_row_names(tmp_path, clock):
    image(tmp_path / "Cat.PNG")
    still(tmp_path)
    assert row_image_key("cat.png", tmp_path) == "Cat.PNG"
    assert loosely_named_file(tmp_path / "cat.png") == tmp_path / "Cat.PNG"
    os.rename(tmp_path / "Cat.PNG", tmp_path / "CAT.png")
    still(tmp_path)
    assert row_image_key("cat.png", tmp_path) == "CAT.png"
    assert loosely_named_file(tmp_path / "cat.png") == tmp_path / "CAT.png"


def test_a_mask_renamed_and_an_image_added_in_the_tick_their_folders_were_listed_in_are_found(tmp_path, clock):
    settings = LossMaskConfig(source="files")
    masks = tmp_path / "masks"
    masks.mkdir()
    photo = image(tmp_path / "a.jpg")
    image(masks / "A.PNG")
    still(tmp_path, masks)
    assert mask_path(str(photo), settings) == masks / "A.PNG"
    assert image_sharing_mask(str(photo), settings) is None
    os.rename(masks / "A.PNG", masks / "a.Png")
    image(tmp_path / "a.PNG")  # finds masks/a.Png by its name: which image it was made for cannot be told
    still(tmp_path, masks)
    assert mask_path(str(photo), settings) == masks / "a.Png"
    assert image_sharing_mask(str(photo), settings) == "a.PNG"


def test_a_folder_still_for_a_tick_is_listed_once(tmp_path, clock, monkeypatch):
    """Training asks for a folder's listing once per image: it is read again only when the folder changes."""
    listed, listdir, scandir = [], os.listdir, os.scandir
    monkeypatch.setattr(os, "listdir", lambda path=".": listed.append(path) or listdir(path))
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(path) or scandir(path))
    photos = [image(tmp_path / f"{i}.png") for i in range(3)]
    still(tmp_path)
    clock.now = CHANGED_NS + file_names.FOLDER_TIME_TICK_NS + 1
    for photo in photos * 2:
        assert sidecar_path(photo) is None and row_image_key(photo.name.upper(), tmp_path) == photo.name
    assert len(listed) == 2  # the caption files' listing and the file names'
    (tmp_path / "1.TXT").write_text("a red square")  # a later tick: the folder's time moves
    os.utime(tmp_path, ns=(clock.now, clock.now))
    assert sidecar_path(photos[1]) == tmp_path / "1.TXT"
