"""Data sources, early checks with one-line errors, and reproducible augmentation and ordering."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import DataConfig
from finetune.data.batches import EpochBatchSampler
from finetune.data.items import CaptionedImageDataset
from data_examples import load_examples
from odd_images import save_exif_rotated
from finetune.data.images import open_rgb, upright_rgb
from finetune.data.sources import Example
from finetune.errors import FinetuneError


def write_image(path, size=(64, 64), colour="red", mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return path


def test_folder_with_txt_sidecars(image_folder):
    examples = load_examples(DataConfig(image_dir=str(image_folder), resolution=64))
    assert len(examples) == 4
    for example in examples:
        assert example.caption == open(example.source.replace(".png", ".txt")).read().strip()


def test_metadata_jsonl_wins_over_missing_sidecars(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from metadata"}) + "\n")
    assert load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))[0].caption == "from metadata"


def test_fixed_caption_needs_no_caption_files(tmp_path):
    write_image(tmp_path / "a.png")
    assert load_examples(DataConfig(image_dir=str(tmp_path), resolution=64, caption="a sks toy"))[0].caption == "a sks toy"


def test_missing_caption_names_the_image(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(FinetuneError, match=r"image .*a\.png has no caption: add a\.txt"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FinetuneError, match=r"data folder .*nothere not found"):
        load_examples(DataConfig(image_dir=str(tmp_path / "nothere"), resolution=64))
    write_image(tmp_path / "a.png")
    with pytest.raises(FinetuneError, match=r"^data.image_dir .*a\.png is a file: give the folder that holds the images$"):
        load_examples(DataConfig(image_dir=str(tmp_path / "a.png"), resolution=64))
    (tmp_path / "a.png").rename(tmp_path / "photos.ZIP")  # a dataset downloaded as an archive
    with pytest.raises(FinetuneError, match=r"^data.image_dir .*photos\.ZIP is an archive: unpack it and give the folder it holds$"):
        load_examples(DataConfig(image_dir=str(tmp_path / "photos.ZIP"), resolution=64))
    (tmp_path / "photos.ZIP").unlink()
    with pytest.raises(FinetuneError, match=r"data folder .* has no images"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))


def test_a_data_folder_this_user_cannot_read_is_one_line(tmp_path, monkeypatch):
    """A volume another user owns (a container's): its listing stopped with a PermissionError traceback."""
    import os
    from pathlib import Path

    (tmp_path / "photos").mkdir()
    write_image(tmp_path / "photos" / "a.png")
    readable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "photos" and readable(path, mode))  # the tests run as root
    with pytest.raises(FinetuneError, match=r"^data folder .*photos cannot be read \(its permissions\): make it readable to this user \(chmod\), "
                                            r"or check data.image_dir$"):  # fmt: skip
        load_examples(DataConfig(image_dir=str(tmp_path / "photos"), resolution=64))


def test_truncated_image_is_named(tmp_path):
    good = write_image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("ok")
    data = good.read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "broken.txt").write_text("broken")
    with pytest.raises(FinetuneError, match=r"image .*broken\.png cannot be read"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))


def test_not_an_image_at_all_is_named(tmp_path):
    (tmp_path / "fake.jpg").write_text("this is text")
    (tmp_path / "fake.txt").write_text("fake")
    with pytest.raises(FinetuneError, match=r"image .*fake\.jpg cannot be read"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))
    # An empty file (a copy cut off) and an iPhone's HEIC photo renamed .jpg say what they are, not only Pillow's "cannot identify".
    (tmp_path / "fake.jpg").write_bytes(b"")
    with pytest.raises(FinetuneError, match=r"image .*fake\.jpg is empty \(0 bytes: a copy or download that did not finish\?\): copy it again, or remove it, or set data.skip_bad_images"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))
    (tmp_path / "fake.jpg").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100))
    with pytest.raises(FinetuneError, match=r"image .*fake\.jpg is a HEIC photo \(as iPhones save them\) under another name: convert it to JPEG or PNG, or set data.skip_bad_images"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))


def test_tiny_image_is_an_error(tmp_path):
    write_image(tmp_path / "tiny.png", size=(20, 20))
    (tmp_path / "tiny.txt").write_text("tiny")
    with pytest.raises(FinetuneError, match=r"tiny\.png is 20x20, smaller than 32 px"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))


@pytest.mark.parametrize("mode,colour", [("RGBA", (255, 0, 0, 0)), ("CMYK", (0, 255, 255, 0)), ("L", 128), ("I;16", 65535)])
def test_odd_modes_become_rgb(tmp_path, mode, colour):
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    Image.new(mode, (8, 8), colour).save(path)
    from finetune.data.sources import Example

    image = open_rgb(Example(str(path), "", lambda: Image.open(path)))
    assert image.mode == "RGB"
    if mode == "RGBA":  # fully transparent pixels become white, not the hidden red
        assert image.getpixel((0, 0)) == (255, 255, 255)
    if mode == "I;16":
        assert image.getpixel((0, 0)) == (255, 255, 255)


def test_datasets_dataset_saved_to_disk(tmp_path):
    import datasets

    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    datasets.Dataset.from_dict({"img": images, "caption": ["a red thing", "a blue thing"]}).save_to_disk(tmp_path / "ds")
    config = DataConfig(dataset=str(tmp_path / "ds"), image_column="img", caption_column="caption", resolution=64)
    examples = load_examples(config)
    assert [e.caption for e in examples] == ["a red thing", "a blue thing"]
    item = CaptionedImageDataset(examples, config, seed=0)[(1, 0)]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["pixel_values"][2].mean() > 0.9  # the blue image


def test_a_saved_dataset_dict_picks_its_split_and_a_wrong_split_is_one_line(tmp_path):
    import datasets

    def split(colour):
        return datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 64), colour)], "text": [f"a {colour} thing"]})

    datasets.DatasetDict({"train": split("red"), "test": split("blue")}).save_to_disk(tmp_path / "dd")
    assert [e.caption for e in load_examples(DataConfig(dataset=str(tmp_path / "dd"), dataset_split="test", resolution=64))] == ["a blue thing"]
    with pytest.raises(FinetuneError, match=r"dd has no split 'validation' \(has train, test\): set data.dataset_split$"):
        load_examples(DataConfig(dataset=str(tmp_path / "dd"), dataset_split="validation", resolution=64))
    split("red").save_to_disk(tmp_path / "one")  # a split asked of a single saved split is not silently ignored
    with pytest.raises(FinetuneError, match=r"one is a single split saved with save_to_disk \(no split 'test' to pick\)"):
        load_examples(DataConfig(dataset=str(tmp_path / "one"), dataset_split="test", resolution=64))


def test_datasets_missing_caption_names_the_row_and_an_empty_one_is_a_warning(tmp_path):
    import datasets

    from finetune.data.sources import read_examples
    from finetune.data_check.check import WARNING, inspect_examples

    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    datasets.Dataset.from_dict({"image": images, "text": ["a red thing", None]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(FinetuneError, match=r"row 1 has no caption \(a null cell\): fill the caption column"):
        load_examples(DataConfig(dataset=str(tmp_path / "ds"), resolution=64))
    # A blank caption trains as the empty prompt, as an empty .txt does (ControlNet data may mean it).
    datasets.Dataset.from_dict({"image": images, "text": ["a red thing", " "]}).save_to_disk(tmp_path / "blank")
    config = DataConfig(dataset=str(tmp_path / "blank"), resolution=64)
    assert [e.caption.strip() for e in load_examples(config)] == ["a red thing", ""]
    warnings = [f.message for f in inspect_examples(read_examples(config), config, "blank").of_level(WARNING)]
    assert warnings == [f"dataset {tmp_path / 'blank'} row 1 has an empty caption: it trains as the empty prompt; write one in its caption column if that is not meant"]
    datasets.Dataset.from_dict({"image": [images[0], None], "text": ["a", "b"]}).save_to_disk(tmp_path / "no-image")
    with pytest.raises(FinetuneError, match=r"no-image row 1 has no image \(a null cell\): fill that cell, or remove the row"):
        load_examples(DataConfig(dataset=str(tmp_path / "no-image"), resolution=64))


def test_datasets_missing_column_lists_the_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"img": [Image.new("RGB", (64, 64))], "text": ["x"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(FinetuneError, match=r"no column 'image' \(data.image_column\); its columns are: 'img', 'text': set data.image_column=img$"):
        load_examples(DataConfig(dataset=str(tmp_path / "ds"), resolution=64))


def test_datasets_missing_caption_column_names_the_text_column_or_data_caption(tmp_path):
    """A dataset's captions under another name, or none at all: the line listed the columns, and never said that
    data.caption trains a dataset with no caption column (one prompt for every image), as it does a folder."""
    import datasets

    image = Image.new("RGB", (64, 64))
    datasets.Dataset.from_dict({"picture": [image], "prompt": ["x"]}).save_to_disk(tmp_path / "named")
    with pytest.raises(FinetuneError, match=r"no column 'text' \(data.caption_column\); its columns are: 'picture', 'prompt': "
                                            r"set data.caption_column=prompt, or data.caption for one prompt for every image$"):
        load_examples(DataConfig(dataset=str(tmp_path / "named"), image_column="picture", resolution=64))
    datasets.Dataset.from_dict({"picture": [image]}).save_to_disk(tmp_path / "uncaptioned")
    uncaptioned = DataConfig(dataset=str(tmp_path / "uncaptioned"), image_column="picture", resolution=64)
    with pytest.raises(FinetuneError, match=r"its columns are: 'picture': it has no column of text; set data.caption for one prompt for every image$"):
        load_examples(uncaptioned)
    assert [example.caption for example in load_examples(uncaptioned.model_copy(update={"caption": "a photo"}))] == ["a photo"]


def test_random_crop_and_flip_are_reproducible_per_epoch(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    config = DataConfig(image_dir=str(tmp_path), caption="x", resolution=64, crop="random", random_flip=True)
    dataset = CaptionedImageDataset(load_examples(config), config, seed=1)
    again = CaptionedImageDataset(load_examples(config), config, seed=1)
    assert torch.equal(dataset[(0, 0)]["pixel_values"], again[(0, 0)]["pixel_values"])
    views = {dataset[(0, epoch)]["pixel_values"].sum().item() for epoch in range(8)}
    assert len(views) > 1  # different epochs see different crops (a flip keeps the sum)
    # The flip is drawn after the crop: without flips each epoch has the same crop, unmirrored.
    unflipped = CaptionedImageDataset(load_examples(config), config.model_copy(update={"random_flip": False}), seed=1)
    flipped = []
    for epoch in range(8):
        view, plain = dataset[(0, epoch)]["pixel_values"], unflipped[(0, epoch)]["pixel_values"]
        assert torch.equal(view, plain) or torch.equal(view, plain.flip(-1)), epoch
        flipped.append(not torch.equal(view, plain))
    assert 0 < sum(flipped) < 8, flipped  # some epochs mirrored, some not


def test_caption_dropout_share(tmp_path):
    write_image(tmp_path / "a.png")
    config = DataConfig(image_dir=str(tmp_path), caption="x", resolution=64, caption_dropout=0.3)
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    dropped = sum(dataset[(0, epoch)]["caption"] == "" for epoch in range(400))
    assert 80 < dropped < 160


def test_sampler_two_processes_see_what_one_process_sees():
    one = EpochBatchSampler(10, batch_size=4, num_processes=1, process_index=0, seed=5)
    ranks = [EpochBatchSampler(10, batch_size=2, num_processes=2, process_index=r, seed=5) for r in range(2)]
    streams = [iter(s) for s in (one, *ranks)]
    for _ in range(7):  # crosses epoch boundaries (2 batches per epoch)
        whole, first, second = (next(s) for s in streams)
        assert whole == first + second
    seen = one.global_batch_indices(0) + one.global_batch_indices(1)
    assert len(set(seen)) == 8  # no image twice within an epoch


def test_sampler_resumes_mid_stream():
    full = iter(EpochBatchSampler(7, batch_size=2, num_processes=1, process_index=0, seed=1))
    batches = [next(full) for _ in range(9)]
    resumed = iter(EpochBatchSampler(7, batch_size=2, num_processes=1, process_index=0, seed=1, start=5))
    assert [next(resumed) for _ in range(4)] == batches[5:]


def test_too_few_images_for_one_global_batch():
    with pytest.raises(FinetuneError, match="fewer than one global batch"):
        EpochBatchSampler(3, batch_size=2, num_processes=2, process_index=0, seed=0)


def test_a_large_jpeg_is_decoded_at_reduced_scale_into_the_same_view(tmp_path):
    """A 2400x1800 photo trained at 256 px: decoded at half scale (both sides stay >= 2 x 256), and the
    view matches full decoding and a plain LANCZOS resize to within JPEG-level noise."""
    small = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(small).resize((2400, 1800), Image.Resampling.BICUBIC).save(path, quality=92)
    opened = []

    def load():
        opened.append(Image.open(path))
        return opened[-1]

    config = DataConfig(image_dir=str(tmp_path), resolution=256, crop="center", random_flip=False)
    dataset = CaptionedImageDataset([Example(str(path), "a photo", load, size=(2400, 1800))], config, seed=0)  # size: as checked
    item = dataset[(0, 0)]
    assert [image.size for image in opened] == [(1200, 900)]  # opened once, decoded at half scale
    assert item["original_size"] == (1800, 2400)  # (height, width) of the file, not of the reduced decode

    full = Image.open(path).convert("RGB").resize((341, 256), Image.Resampling.LANCZOS).crop((42, 0, 298, 256))
    expected = np.asarray(full, dtype=np.float64)
    got = (item["pixel_values"].permute(1, 2, 0).numpy().astype(np.float64) + 1.0) * 127.5
    psnr = 10 * np.log10(255.0**2 / ((got - expected) ** 2).mean())
    assert psnr > 35.0, psnr


def test_an_upright_rgb_photo_is_read_without_copies_of_its_pixels(tmp_path):
    """Most phone photos are RGB JPEGs with EXIF orientation 1 (or none): upright_rgb returns the decoded image itself.
    ImageOps.exif_transpose (nothing to turn) and convert("RGB") (already RGB) each returned a copy, 36 MB of a 12 MP
    photo apiece, in every check thread and at every decode. A photo that does need turning is still turned."""
    exif = Image.Exif()
    exif[0x0112] = 1  # upright, as a phone writes for a landscape photo
    for name, extra in (("tagged.jpg", {"exif": exif.tobytes()}), ("untagged.jpg", {})):
        Image.new("RGB", (64, 48), "red").save(tmp_path / name, **extra)
        decoded = Image.open(tmp_path / name)
        decoded.load()
        assert upright_rgb(decoded) is decoded
    save_exif_rotated(tmp_path / "turned.png")
    turned = upright_rgb(Image.open(tmp_path / "turned.png"))
    assert turned.size == (64, 96) and turned.mode == "RGB" and turned.getpixel((0, 0)) == (255, 0, 0)  # red on top


@pytest.mark.parametrize("target, decoded", [((256, 192), (1200, 900)), ((128, 96), (600, 450))])
def test_a_cached_view_of_a_reduced_decode_is_as_close_to_a_full_decode_as_another_resampling(tmp_path, target, decoded):
    """The latent cache's views (render_pixels) of a large JPEG decode it at 1/2 or 1/4 scale (Image.draft, both sides
    kept >= 2x the view's longer side) and shrink it with LANCZOS's reducing gap. Against the view of a full decode and
    a plain LANCZOS resize, they differ less than that full decode resized with BICUBIC does: no more than a resampling's
    own difference. A reduced decode that keeps less margin (1/8 scale here: 300x225) does not."""
    from PIL import ImageDraw

    from finetune.data.items import render_pixels
    from finetune.data.views import plan_view

    coarse = np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    photo = Image.fromarray(coarse).resize((2400, 1800), Image.Resampling.BICUBIC)
    pen = ImageDraw.Draw(photo)
    for i in range(30):  # sharp edges, where a reduced decode loses most
        pen.line((80 * i, 0, 2400 - 60 * i, 1800), fill=(255, 255 - 8 * i, 8 * i), width=3 + i % 5)
    path = tmp_path / "photo.jpg"
    photo.save(path, quality=92)
    opened = []

    def load():
        opened.append(Image.open(path))
        return opened[-1]

    plan = plan_view((2400, 1800), target, "center", False, np.random.default_rng(0))
    view = (render_pixels(Example(str(path), "a photo", load), plan).permute(1, 2, 0).numpy().astype(np.float64) + 1.0) * 127.5
    assert [image.size for image in opened] == [decoded]
    top, left = plan.top_left
    full = Image.open(path).convert("RGB")

    def resized(method):
        return np.asarray(full.resize(plan.resized, method).crop((left, top, left + target[0], top + target[1])), dtype=np.float64)

    reference = resized(Image.Resampling.LANCZOS)
    assert ((view - reference) ** 2).mean() < ((resized(Image.Resampling.BICUBIC) - reference) ** 2).mean()
