"""Data sets of many files: the work before the first step that runs per file stays cheap per file (no stat where a
folder's listing tells, no caption file looked for where the listing has none, captions tokenized a chunk at a time),
counted here rather than timed."""

import json
import pathlib

import pytest
from PIL import Image

import finetune.captions.overrides as caption_overrides
from finetune.config import DataConfig
from finetune.data.sources import folder_images, image_subfolders, unread_images


def captioned_folder(folder: pathlib.Path, count: int) -> pathlib.Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (8, 8), "red").save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text("a red square")
    return folder


@pytest.fixture
def stats(monkeypatch):
    """The Path.stat calls made (Path.is_file and is_dir make one each)."""
    made = []
    original = pathlib.Path.stat
    monkeypatch.setattr(pathlib.Path, "stat", lambda self, **kwargs: made.append(self) or original(self, **kwargs))
    return made


def test_listing_a_data_folder_stats_no_file(tmp_path, stats):
    """A folder's images, its unread images and its image subfolders come from its listing's entry types: 20,000
    images and their captions were stat'ed one by one (40,000 calls) in each of the listings a run makes."""
    folder = captioned_folder(tmp_path / "data", 30)
    config = DataConfig(image_dir=str(folder), resolution=64)
    stats.clear()
    assert len(folder_images(folder)) == 30
    assert unread_images(folder, config) == ([], [])
    assert image_subfolders(folder, config, 3) == []
    assert [path.name for path in stats if path.suffix in (".png", ".txt")] == []  # (a metadata file is looked for, once a folder)


def test_a_folder_captioned_by_its_metadata_file_alone_is_not_searched_for_caption_files(tmp_path, monkeypatch):
    """The check's warning for caption files a metadata row overrides looked for a caption file beside each image with a
    row (four stats an image), parsing the metadata file again; where the folder's listing holds none, it does neither, and still
    finds one that is there."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(30):
        Image.new("RGB", (8, 8), "red").save(folder / f"{i:04d}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:04d}.png", "text": "a red square"}) + "\n" for i in range(30)))
    looked_up, parsed = [], []
    original, parse = caption_overrides.sidecar_path, caption_overrides.folder_captions
    monkeypatch.setattr(caption_overrides, "sidecar_path", lambda image: looked_up.append(image.name) or original(image))
    monkeypatch.setattr(caption_overrides, "folder_captions", lambda *args: parsed.append(args) or parse(*args))
    config = DataConfig(image_dir=str(folder), resolution=64)
    assert caption_overrides.shadowed_caption_files(folder, config) is None
    assert looked_up == [] and parsed == []  # (reading the examples parsed the metadata file already)
    (folder / "0007.TXT").write_text("a blue square")  # another caption, by a name of another case
    assert "1 caption file (0007.TXT) differs from metadata.jsonl" in caption_overrides.shadowed_caption_files(folder, config)
    assert looked_up == ["0007.png"]


def test_the_caption_files_of_a_folder_are_listed_once_for_all_readers(tmp_path, monkeypatch):
    """The overridden-caption warning listed the folder's caption files itself, beside the listing sidecar_path keeps
    (captions.caption_file_names): two listings of one folder, which could disagree on what a caption file is. So did the
    warning for caption files that name no image, for the files beside them, at every check."""
    import os
    import sys
    import time

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), "red").save(folder / f"{i:04d}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:04d}.png", "text": "a red square"}) + "\n" for i in range(3)))
    (folder / "0001.TXT").write_text("a blue square")  # by a name of another case: sidecar_path reads the listing
    a_minute_ago = time.time_ns() - 60 * 10**9  # a folder changed within a tick of its listing is listed again (test_folder_listings)
    os.utime(folder, ns=(a_minute_ago, a_minute_ago))
    listed, scandir = [], os.scandir
    by_captions = (os.path.join("captions", "captions.py"), os.path.join("captions", "overrides.py"))  # not the image listings of folder_images
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(sys._getframe(1).f_code.co_filename.endswith(by_captions)) or scandir(path))
    config = DataConfig(image_dir=str(folder), resolution=64)
    for _ in range(2):
        assert "1 caption file (0001.TXT) differs from metadata.jsonl" in caption_overrides.shadowed_caption_files(folder, config)
        assert caption_overrides.imageless_caption_files(folder, config) is None
    assert sum(listed) == 1


def test_captions_are_counted_in_tokens_a_chunk_at_a_time():
    """The long-caption warning tokenized every caption in one call, whose result holds each token's ids, offsets and
    strings (220 MB at once for 20,000 tag lists of some 30 tokens); it now tokenizes them in chunks, with the same counts."""
    from transformers import CLIPTokenizer

    from conftest import SHIPPED_BASE
    from finetune.captions.tokens import long_captions_line

    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_BASE, subfolder="tokenizer")
    batches = []

    def counting(texts, **options):
        batches.append(len(texts))
        return tokenizer(texts, **options)

    captions = {f"{i}.png": f"a red square {i}, " * (1 + i % 20) for i in range(2507)}
    captions["long.png"] = "a red square, " * 60
    line = long_captions_line(counting, captions, 75)
    assert max(batches) <= 1000 and sum(batches) == len(set(captions.values()))  # caption_tokens.TOKENIZED_AT_ONCE
    longest = len(tokenizer(captions["long.png"])["input_ids"]) - 2  # without the start and end marks
    cut = sum(len(tokenizer(caption)["input_ids"]) - 2 > 75 for caption in captions.values())
    assert line.startswith(f"{cut} of {len(captions)} captions are longer than") and f"(the longest: long.png, {longest} tokens)" in line
