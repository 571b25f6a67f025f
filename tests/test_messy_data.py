"""Real creators' folders, as a walkthrough found them: macOS `._` files, nested metadata rows, 8-bit values in
16-bit files, formats training does not read, list-valued dataset captions, paths with `~`, and huge
photos. Each is read as meant, or is one line naming the file or key and what to do."""

import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.cli.main import main
from finetune.config import DataConfig
from finetune.data.items import CaptionedImageDataset
from finetune.data_check.check import CONVERTED, FATAL, WARNING, inspect_examples
from data_examples import load_examples
from finetune.data.images import decode
from finetune.data.sources import Example, read_examples
from finetune.errors import FinetuneError


def noise(path, size=(64, 64), seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def report_of(folder, **settings):
    config = DataConfig(image_dir=str(folder), resolution=64, **settings)
    return inspect_examples(read_examples(config), config, "data")


def test_hidden_files_are_not_images_and_unread_kinds_and_subfolders_are_said(tmp_path):
    noise(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")  # what a Mac copies beside each image
    Image.new("RGB", (64, 64)).save(tmp_path / "anim.gif")
    (tmp_path / "sub").mkdir()
    noise(tmp_path / "sub" / "b.png")
    report = report_of(tmp_path)
    assert [example.source for example in report.usable] == [str(tmp_path / "a.png")] and report.of_level(FATAL) == []
    assert [finding.message for finding in report.of_level(WARNING)] == [
        f"data folder {tmp_path} has 1 image training does not read (.gif, e.g. anim.gif): convert it to PNG or JPEG",
        f"data folder {tmp_path} has subfolders with images (sub), which are not read: list each in data.folders (with its repeats) to train it",
    ]


def test_images_two_folders_down_are_said_as_a_phones_export_by_year_and_month_holds_them(tmp_path):
    """2023/jan/*.jpg, with no image in 2023 itself: its photos trained nothing, unseen, or the folder "had no images"."""
    (tmp_path / "2023" / "jan").mkdir(parents=True)
    noise(tmp_path / "2023" / "jan" / "b.png")
    (tmp_path / "2023" / "jan" / "b.txt").write_text("b")
    with pytest.raises(FinetuneError, match=r"has no images of its own, only subfolders with images \(2023/jan\): list each with its repeats in "
                                            r"the recipe's data section, e.g. folders: \[\{path: \"2023/jan\", repeats: 1\}\]$"):  # fmt: skip
        read_examples(DataConfig(image_dir=str(tmp_path), resolution=64))
    noise(tmp_path / "a.png", seed=1)
    (tmp_path / "a.txt").write_text("a")
    assert [finding.message for finding in report_of(tmp_path).of_level(WARNING)] == [
        f"data folder {tmp_path} has subfolders with images (2023/jan), which are not read: list each in data.folders (with its repeats) to train it"
    ]
    # Links to the folder or one above it (a loop a sync tool made) are no subfolders: their images are the ones trained.
    (tmp_path / "2023" / "jan" / "up").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "again").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "2023" / "jan" / "here").symlink_to(tmp_path / "2023" / "jan", target_is_directory=True)
    assert [finding.message for finding in report_of(tmp_path).of_level(WARNING)] == [
        f"data folder {tmp_path} has subfolders with images (2023/jan), which are not read: list each in data.folders (with its repeats) to train it"
    ]


def test_a_subfolder_that_cannot_be_listed_is_passed_over(tmp_path, monkeypatch):
    """A drive's root-only lost+found beside the images: no image of the user's is there, and it stopped the check."""
    noise(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "lost+found").mkdir()
    listing = Path.iterdir

    def refused(folder):
        if folder.name == "lost+found":
            raise PermissionError(13, "Permission denied", str(folder))
        return listing(folder)

    monkeypatch.setattr(Path, "iterdir", refused)
    assert [example.source for example in report_of(tmp_path).usable] == [str(tmp_path / "a.png")]


def test_metadata_rows_match_their_own_file_and_a_row_twice_is_one_line(tmp_path):
    noise(tmp_path / "c.png")
    (tmp_path / "sub").mkdir()
    noise(tmp_path / "sub" / "c.png", seed=1)
    rows = [{"file_name": "sub/c.png", "text": "the nested one"}, {"file_name": "./d.png", "text": "d"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    noise(tmp_path / "d.png", seed=2)
    # c.png is not sub/c.png (it used to take the nested one's caption): the row names no image of the folder
    with pytest.raises(FinetuneError, match=r"metadata.jsonl line 1 names sub/c.png, which is not an image in its folder: fix file_name, or remove the row; "
                                            r"an image in a subfolder trains only as a data.folders entry, with a metadata file of its own$"):  # fmt: skip
        read_examples(DataConfig(image_dir=str(tmp_path)))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "d.png", "text": "d"}) + "\n" + json.dumps({"file_name": "d.png", "text": "e"}) + "\n")
    with pytest.raises(FinetuneError, match=r"metadata.jsonl line 2 names d.png again \(first in line 1\): keep one row per image$"):
        read_examples(DataConfig(image_dir=str(tmp_path)))
    # A path through the folder itself still names its image, as it always has: its own name, or absolute.
    rows = [{"file_name": f"{tmp_path.name}/c.png", "text": "c"}, {"file_name": str(tmp_path / "d.png"), "text": "d"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert sorted(e.caption for e in read_examples(DataConfig(image_dir=str(tmp_path)))) == ["c", "d"]
    # A list of captions is several, as the same folder given as data.dataset reads it (it was "'text' is list, not a string").
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "d.png", "text": ["d", "e"]}) + "\n" + json.dumps({"file_name": "c.png", "text": [1]}) + "\n")
    with pytest.raises(FinetuneError, match=r"line 2: 'text' is a list of int, not a string: write the caption as one string or a list of them$"):
        read_examples(DataConfig(image_dir=str(tmp_path)))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "d.png", "text": ["d", "e"]}) + "\n" + json.dumps({"file_name": "c.png", "text": "c"}) + "\n")
    assert sorted(e.caption for e in read_examples(DataConfig(image_dir=str(tmp_path)))) == ["c", "d\ne"]


def test_a_16_bit_file_holding_8_bit_values_is_not_trained_black(tmp_path):
    Image.fromarray(np.full((64, 64), 200, dtype=np.uint16)).save(tmp_path / "grey.png")  # as numpy or OpenCV write one
    (tmp_path / "grey.txt").write_text("grey")
    report = report_of(tmp_path)
    assert [f.message for f in report.of_level(CONVERTED)] == [f"image {tmp_path / 'grey.png'}: 16-bit (I;16): its values are 8-bit ones (none above 255), read as such"]
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    pixels = CaptionedImageDataset(load_examples(config), config, seed=0)[(0, 0)]["pixel_values"]
    assert float(pixels.mean()) == pytest.approx(200 / 127.5 - 1.0, abs=0.01)



def png_of_16_bit_rgb(path, values):
    """`values` (height, width, 3) as a 16-bit RGB PNG, which Pillow cannot write (numpy's cv2.imwrite of uint16 can)."""
    height, width, _ = values.shape
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))  # filter 0 (none) before each row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits per sample, colour type 2: RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_rgb_file_holding_8_bit_values_is_not_trained_black_and_a_16_bit_photo_is_as_before(tmp_path):
    """Pillow reads a 16-bit RGB PNG by each sample's top byte: of 8-bit values, 0 everywhere."""
    colour = np.random.default_rng(0).integers(1, 256, (64, 64, 3))
    png_of_16_bit_rgb(tmp_path / "eight.png", colour)
    png_of_16_bit_rgb(tmp_path / "photo.png", colour * 257)  # a real 16-bit photo: read by its top bytes, as before
    for name in ("eight", "photo"):
        (tmp_path / f"{name}.txt").write_text(name)
    report = report_of(tmp_path)
    assert [f.message for f in report.of_level(CONVERTED)] == [f"image {tmp_path / 'eight.png'}: 16-bit (RGB): its values are 8-bit ones (none above 255), read as such"]
    assert report.of_level(FATAL) == []
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    for example in load_examples(config):
        assert (np.asarray(decode(example)) == colour).all(), example.source


def test_captions_in_upper_case_files_and_of_several_lines(tmp_path):
    noise(tmp_path / "IMG_1.JPG")
    (tmp_path / "IMG_1.TXT").write_text("a photo")
    noise(tmp_path / "two.png", seed=1)
    (tmp_path / "two.txt").write_text("first line\nsecond line\n")
    report = report_of(tmp_path)
    assert [e.caption for e in report.usable] == ["a photo", "first line\nsecond line"] and report.of_level(FATAL) == []
    assert [f.message for f in report.of_level(CONVERTED)] == [
        f"image {tmp_path / 'two.png'}: caption of 2 lines, each a caption of its own: one line trains each epoch "
        "(to train them together, join them with commas on one line)"
    ]


def test_a_datasets_lists_of_captions_train_one_each_epoch_and_paths_for_images_are_one_line(tmp_path):
    import datasets

    from finetune.captions.captions import training_caption

    images = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue", "green")]
    # COCO's several captions per image: it stopped ("holds list, not text"), where diffusers' script draws one.
    captions = [["a dog", " ", "a brown\ndog"], ["a cat"], ["", " "]]
    datasets.Dataset.from_dict({"image": images, "text": captions}).save_to_disk(tmp_path / "lists")
    config = DataConfig(dataset=str(tmp_path / "lists"), resolution=64)
    examples = read_examples(config)
    assert [example.caption for example in examples] == ["a dog\na brown dog", "a cat", ""]  # an entry's line break is no second caption
    assert {training_caption(examples[0].caption, config, 0, epoch, 0) for epoch in range(20)} == {"a dog", "a brown dog"}
    report = inspect_examples(examples, config, "lists")
    assert [f.message for f in report.findings if "caption" in f.message] == [
        f"image dataset {tmp_path / 'lists'} row 0: caption of 2 lines (or list entries), each a caption of its own: one line trains each epoch "
        "(to train them together, join them with commas on one line)",
        f"dataset {tmp_path / 'lists'} row 2 has an empty caption: it trains as the empty prompt; write one in its caption column if that is not meant"]
    for cell, held in (([], "an empty list"), (["a", None], "a list of NoneType, str"), (3, "int")):
        datasets.Dataset.from_dict({"image": images[:1], "text": [cell]}).save_to_disk(tmp_path / held)
        with pytest.raises(FinetuneError, match=rf"row 0: caption column 'text' holds {held}, not text: give each row one caption or a list of them"):
            read_examples(DataConfig(dataset=str(tmp_path / held)))
    datasets.Dataset.from_dict({"image": ["a.png", "b.png"], "text": ["a", "b"]}).save_to_disk(tmp_path / "paths")
    with pytest.raises(FinetuneError, match=r"column 'image' \(data.image_column\) holds Value\('string'.*cast_column\('image', datasets.Image\(\)\)"):
        read_examples(DataConfig(dataset=str(tmp_path / "paths")))
    # A folder of images with .txt captions is a data.image_dir, not a dataset; a broken metadata row is one line.
    (tmp_path / "kohya").mkdir()
    noise(tmp_path / "kohya" / "a.png")
    (tmp_path / "kohya" / "a.txt").write_text("a")
    with pytest.raises(FinetuneError, match=r"is a folder of images with no metadata file: train it as data.image_dir="):
        read_examples(DataConfig(dataset=str(tmp_path / "kohya")))
    (tmp_path / "kohya" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a",}\n')
    with pytest.raises(FinetuneError, match=r"is a folder of images with a metadata file and .txt captions: train it as data.image_dir="):
        read_examples(DataConfig(dataset=str(tmp_path / "kohya")))
    (tmp_path / "kohya" / "a.txt").unlink()
    with pytest.raises(FinetuneError, match=r"^dataset folder .*kohya cannot be read \(.*\): fix its metadata.jsonl/metadata.csv"):
        read_examples(DataConfig(dataset=str(tmp_path / "kohya")))


def test_paths_may_start_with_the_home_folder_and_bad_settings_name_their_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert DataConfig(image_dir="~/photos").image_dir == str(tmp_path / "photos")
    # An environment variable, as a shell script has it (the output_dir was a folder named "$RUNS" in the current one).
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    assert DataConfig(image_dir="$RUNS/photos").image_dir == DataConfig(image_dir="${RUNS}/photos").image_dir == str(tmp_path / "runs" / "photos")
    with pytest.raises(ValueError, match=r"names the environment variable \$DATA_ROOT, which is not set: set it, or write the path out"):
        DataConfig(image_dir="${DATA_ROOT}/photos")
    (tmp_path / "$5 prints").mkdir()  # a folder whose own name holds a $
    assert DataConfig(image_dir=str(tmp_path / "$5 prints")).image_dir == str(tmp_path / "$5 prints")
    with pytest.raises(ValueError, match="data.bucketing is a section, not True: set data.bucketing.enabled: true"):
        DataConfig(image_dir="x", bucketing=True)
    for key in ("num_workers", "min_image_size"):
        with pytest.raises(ValueError, match=f"{key}\n  Input should be greater than or equal to"):
            DataConfig(image_dir="x", **{key: -1})


def test_a_108_megapixel_photo_is_no_decompression_bomb(tmp_path, monkeypatch):
    import finetune.data.images

    # As importing finetune.data.images (and so finetune.data.items) sets it; a demo test in this process may have lowered it for browser uploads.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", finetune.data.images.TRUSTED_IMAGE_PIXELS)
    Image.new("L", (12000, 9000)).save(tmp_path / "phone.png")  # a real phone's size; Pillow warns above 89M pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode(Example(str(tmp_path / "phone.png"), "x", lambda: Image.open(tmp_path / "phone.png"))).size == (12000, 9000)
    fresh = subprocess.run([sys.executable, "-c", "import finetune.data.items; from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert int(fresh.stdout.split()[-1]) == finetune.data.images.TRUSTED_IMAGE_PIXELS


def test_invalid_exif_orientations_are_not_said_to_rotate(tmp_path):
    image = Image.new("RGB", (64, 64))
    exif = image.getexif()
    exif[0x0112] = 9  # not an orientation: nothing is rotated
    image.save(tmp_path / "a.jpg", exif=exif)
    (tmp_path / "a.txt").write_text("a")
    assert report_of(tmp_path).of_level(CONVERTED) == []


def test_make_conditions_reads_captions_as_training_does(tmp_path):
    from finetune.controlnet.conditions import make_condition_folders

    (tmp_path / "in").mkdir()
    noise(tmp_path / "in" / "a.png")
    noise(tmp_path / "in" / "b.png", seed=1)
    (tmp_path / "in" / "a.txt").write_text("\ufeffa caption", encoding="utf-8")  # with a byte-order mark
    (tmp_path / "in" / "b.caption").write_text("b caption")  # sd-scripts' other sidecar
    make_condition_folders(tmp_path / "in", tmp_path / "out", "canny")
    rows = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [row["text"] for row in rows] == ["a caption", "b caption"]


def test_errors_from_loader_workers_and_closed_pipes_are_one_line(tmp_path, monkeypatch, capsys):
    import finetune.cli.main as cli

    worker = "Caught FinetuneError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  File ...\nfinetune.errors.FinetuneError: the real message"
    monkeypatch.setitem(cli.COMMANDS, "check-data", lambda args: (_ for _ in ()).throw(FinetuneError(worker)))
    assert main(["check-data", "--image-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: the real message\n"
    for i in range(600):  # a warning each (an empty caption): more output than a pipe holds once `head` has left
        Image.new("RGB", (64, 64), (i % 256, i // 256, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("")
    command = f"{sys.executable} -m finetune check-data --image-dir {tmp_path} --resolution 64 | head -1"
    finished = subprocess.run(command, shell=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert finished.stdout.startswith("data folder") and "Traceback" not in finished.stderr, finished.stderr[-500:]


def test_a_crop_that_keeps_little_of_its_image_is_said(tmp_path):
    noise(tmp_path / "strip.png", size=(1000, 64))
    noise(tmp_path / "photo.png", size=(96, 64), seed=1)  # 3:2, a crop keeps two thirds: fine
    for name in ("strip", "photo"):
        (tmp_path / f"{name}.txt").write_text(name)
    assert [f.message for f in report_of(tmp_path).of_level(WARNING)] == [
        f"image {tmp_path / 'strip.png'} is 1000x64: its 64x64 center crop keeps 6% of it; data.bucketing.enabled: true trains it near its own shape"
    ]


def test_an_animated_webp_or_png_is_said_to_train_its_first_frame(tmp_path):
    """A sticker or a short loop saved from the web: one frame of it trains, which the check says."""
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for name in ("loop.webp", "loop.png"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        (tmp_path / name).with_suffix(".txt").write_text("a loop")
        report = report_of(tmp_path)
        said = [f.message for f in report.findings if f.level == CONVERTED and f.source == str(tmp_path / name)]
        assert said == [f"image {tmp_path / name}: animated (3 frames): its first frame trains (save the frames to train as images of their own)"]
        red, green, blue = decode(report.usable[0]).convert("RGB").getpixel((0, 0))  # the first frame's (WebP is lossy)
        assert red > 200 and green < 50 and blue < 50
        (tmp_path / name).unlink()
    noise(tmp_path / "still.png")
    assert not report_of(tmp_path).of_level(CONVERTED)


def test_a_caption_that_is_a_list_written_as_text_is_said_to_train_as_that_text(tmp_path):
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        noise(tmp_path / name, seed=seed)
    # pandas' to_csv writes a list cell as its Python text: it trained as "['a dog', 'a brown dog']", unseen.
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"[\'a dog\', \'a brown dog\']"\nb.png,"[1girl, solo]"\nc.png,[]\n')
    warnings = [f.message for f in report_of(tmp_path).of_level(WARNING)]
    assert warnings == [f"image {tmp_path / 'a.png'}: its caption \"['a dog', 'a brown dog']\" is a list written as text, and trains as that text, "
                        "brackets and quotes too: write the captions as a list (a JSON list in a metadata.jsonl or a dataset's cell: one trains each epoch) or as one caption"]
