"""A user's own folder of images as other trainers' tools leave it: the caption column they name, caption
files in other encodings and Unicode forms, metadata rows, subfolders and loss masks."""

import json
import re
import unicodedata

import numpy as np
import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.data.sources import read_examples, unread_images
from finetune.data_check.check import FATAL, inspect_examples
from finetune.errors import FinetuneError


def noise(path, size=(64, 64), seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def captions(folder, **settings):
    return {e.source.rsplit("/", 1)[1]: e.caption for e in read_examples(DataConfig(image_dir=str(folder), resolution=64, **settings))}


def metadata_refusal(folder, metadata: str, text: str, **settings) -> str:
    """What reading `folder`'s captions raises with `text` as its only metadata file (`metadata`: metadata.jsonl or metadata.csv)."""
    for name in ("metadata.jsonl", "metadata.csv"):
        (folder / name).unlink(missing_ok=True)
    (folder / metadata).write_text(text)
    with pytest.raises(FinetuneError) as raised:
        captions(folder, **settings)
    return str(raised.value)


def jsonl_row(**keys) -> str:
    return json.dumps(keys) + "\n"


IMAGEFOLDER_NAME = "(the image's file name, as datasets' imagefolder reads it)"


def test_a_folders_metadata_reads_the_caption_column(tmp_path):
    """data.caption_column names the caption's key in a folder's metadata.jsonl or column in its metadata.csv, as for a dataset."""
    noise(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "a dog"}) + "\n")
    assert captions(tmp_path, caption_column="caption") == {"a.png": "a dog"}
    expected = (f"{tmp_path / 'metadata.jsonl'} line 1: expected a JSON object with 'file_name' and 'text' (data.caption_column), "
                "but its keys are 'file_name', 'caption': set data.caption_column=caption to read the captions from it, or rename the key to 'text'")  # fmt: skip
    with pytest.raises(FinetuneError, match=f"^{re.escape(expected)}$"):
        captions(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,a cat\n")
    assert captions(tmp_path, caption_column="caption") == {"a.png": "a cat"}
    expected = (f"{tmp_path / 'metadata.csv'} must have a header row with 'file_name' and 'prompt' columns (has: file_name, caption): "
                "set data.caption_column=caption to read the captions from it, or rename the column to 'prompt'")  # fmt: skip
    with pytest.raises(FinetuneError, match=f"^{re.escape(expected)}$"):
        captions(tmp_path, caption_column="prompt")


def test_a_metadata_row_naming_its_image_under_another_key_is_not_told_to_set_the_caption_column(tmp_path):
    """{"image": "a.png", "text": ...}, as other tools write rows, was told "rename the key, or set data.caption_column", which
    reads captions only: the key to rename is named; a csv header alike."""
    noise(tmp_path / "a.png")
    assert metadata_refusal(tmp_path, "metadata.jsonl", jsonl_row(image="a.png", text="a dog")).endswith(
        f"but its keys are 'image', 'text': rename 'image' to 'file_name' {IMAGEFOLDER_NAME}")
    assert metadata_refusal(tmp_path, "metadata.jsonl", jsonl_row(path="a.png", caption="a dog")).endswith(
        f"name each image in a 'file_name' key {IMAGEFOLDER_NAME}, and its caption in 'text' (or set data.caption_column)")
    assert metadata_refusal(tmp_path, "metadata.csv", "image,text\na.png,a cat\n").endswith(
        f"(has: image, text): rename 'image' to 'file_name' {IMAGEFOLDER_NAME}")


def test_a_metadata_file_of_image_names_alone_is_told_to_add_the_captions(tmp_path):
    """A row or header with 'file_name' and nothing else was told to "rename the caption's key to 'text'": there is none."""
    noise(tmp_path / "a.png")
    assert metadata_refusal(tmp_path, "metadata.jsonl", jsonl_row(file_name="a.png")).endswith("but its keys are 'file_name': add each image's caption as a 'text' key")
    assert metadata_refusal(tmp_path, "metadata.csv", "file_name\na.png\n").endswith("(has: file_name): add each image's caption as a 'text' column")


def test_a_metadata_jsonl_row_that_is_no_json_says_how_to_write_one(tmp_path):
    """A row pretty-printed over several lines said only 'expected a JSON object' of its first line, '{'."""
    noise(tmp_path / "a.png")
    assert metadata_refusal(tmp_path, "metadata.jsonl", json.dumps({"file_name": "a.png", "text": "a dog"}, indent=2) + "\n") == (
        f"{tmp_path / 'metadata.jsonl'} line 1: expected a JSON object with 'file_name' and 'text' (Expecting property name enclosed "
        'in double quotes): write each row as one JSON object on one line, e.g. {"file_name": "0001.png", "text": "a photo of ..."}')  # fmt: skip


def test_caption_files_are_decoded_by_their_byte_order_mark(tmp_path):
    """Windows Notepad's "Unicode" is UTF-16 with a byte-order mark; "UTF-8 with BOM" has one too."""
    written = {"le.png": "\ufeffcafé, dog\r\n".encode("utf-16-le"), "be.png": "\ufeffcafé, cat".encode("utf-16-be"),
               "bom.png": "\ufeffcafé, cow".encode("utf-8"), "plain.png": "café, owl".encode("utf-8")}  # fmt: skip
    for seed, (name, raw) in enumerate(written.items()):
        noise(tmp_path / name, seed=seed)
        (tmp_path / name).with_suffix(".txt").write_bytes(raw)
    assert captions(tmp_path) == {"be.png": "café, cat", "bom.png": "café, cow", "le.png": "café, dog", "plain.png": "café, owl"}
    # Neither: one line naming the file.
    (tmp_path / "le.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(FinetuneError, match=f"^caption {re.escape(str(tmp_path / 'le.txt'))} is not UTF-8 text: save it as UTF-8"):
        captions(tmp_path)
    # A tool writing the system's code page wrote them all so: the line counts them, not one file a run.
    for name, caption in (("be.txt", "café"), ("bom.txt", "naïve")):
        (tmp_path / name).write_bytes(caption.encode("cp1252"))
    with pytest.raises(FinetuneError, match=r"^caption .* is not UTF-8 text \(nor are 2 more caption files in its folder\): save it as UTF-8"):
        captions(tmp_path)
    for name in ("be.txt", "bom.txt"):
        (tmp_path / name).write_text("cat")
    (tmp_path / "le.txt").write_bytes("\ufeffcafé".encode("utf-16-le")[:-1])  # cut in the middle of a character
    with pytest.raises(FinetuneError, match=f"^caption {re.escape(str(tmp_path / 'le.txt'))} is not UTF-16 text: save it as UTF-8"):
        captions(tmp_path)


def test_utf_16_text_without_a_byte_order_mark_is_one_line_not_a_caption_of_nul_characters(tmp_path):
    """Valid UTF-8 byte for byte ("a\\x00 \\x00d\\x00o\\x00g\\x00"), it trained as other tokens, unseen."""
    noise(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("a dog".encode("utf-16-le"))
    with pytest.raises(FinetuneError, match=f"^caption {re.escape(str(tmp_path / 'a.txt'))} holds NUL characters, as UTF-16 text without a byte-order mark"):
        captions(tmp_path)
    (tmp_path / "a.txt").unlink()
    (tmp_path / "metadata.jsonl").write_bytes((json.dumps({"file_name": "a.png", "text": "a dog"}) + "\n").encode("utf-16-be"))
    with pytest.raises(FinetuneError, match=f"^{re.escape(str(tmp_path / 'metadata.jsonl'))} holds NUL characters"):
        captions(tmp_path)


def test_a_caption_file_is_found_in_either_unicode_form_and_any_letter_case(tmp_path):
    """macOS writes names decomposed (NFD), most tools composed (NFC); Windows keeps IMG_1.Txt's case: the file is there."""
    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    noise(tmp_path / f"{nfd}.png"), noise(tmp_path / f"{nfc} 2.png", seed=1), noise(tmp_path / "IMG_1.JPG", seed=2), noise(tmp_path / "b.png", seed=3)
    (tmp_path / f"{nfc}.txt").write_text("composed caption")
    (tmp_path / f"{nfd} 2.txt").write_text("decomposed caption")
    (tmp_path / "img_1.Txt").write_text("a photo")
    (tmp_path / "b.CAPTION").write_text("a kohya caption")
    assert {unicodedata.normalize("NFC", name): caption for name, caption in captions(tmp_path).items()} == {
        f"{nfc}.png": "composed caption", f"{nfc} 2.png": "decomposed caption", "IMG_1.JPG": "a photo", "b.png": "a kohya caption"}
    # Two images of names that differ in case only, and one caption file: both would train with it.
    noise(tmp_path / "img_1.png", seed=4)
    with pytest.raises(FinetuneError, match=r"^images IMG_1.JPG and img_1.png share the caption file .*img_1.Txt: remove one image"):
        captions(tmp_path)


def test_a_null_caption_in_a_metadata_row_is_named_not_replaced_by_the_txt_file(tmp_path):
    """`"text": null` is no caption (diffusers' scripts stop on it too): the row says so, the .txt beside the image does not step in unseen."""
    noise(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("an older caption")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": None}) + "\n")
    expected = (f"{tmp_path / 'metadata.jsonl'} line 1: 'text' is null, so a.png has no caption: write it as a string "
                '("" trains the image uncaptioned), or remove the row to caption the image by its .txt file')  # fmt: skip
    with pytest.raises(FinetuneError, match=f"^{re.escape(expected)}$"):
        captions(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ""}) + "\n")
    assert captions(tmp_path) == {"a.png": ""}


def test_a_caption_mentioning_a_folder_does_not_hide_it_from_the_unread_subfolders(tmp_path):
    """Subfolders the metadata rows point into (ControlNet's conditioning images) are partners, not unread images; a caption's words are no path."""
    noise(tmp_path / "a.png"), (tmp_path / "style").mkdir(), noise(tmp_path / "style" / "b.png", seed=1)
    (tmp_path / "hints").mkdir(), noise(tmp_path / "hints" / "a.png", seed=2)
    rows = [{"file_name": "a.png", "text": "in the style/ of x, see hints/", "conditioning_image": "./hints/a.png"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    assert unread_images(tmp_path, config) == ([], [tmp_path / "style"])
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text,conditioning_image\na.png,\"style/, hints\",hints\\a.png\n")
    assert unread_images(tmp_path, config) == ([], [tmp_path / "style"])


def test_two_images_of_one_stem_finding_one_mask_by_it_is_one_line_naming_both(tmp_path):
    """a.png and a.jpg (captioned by metadata rows) with masks/a.png only: which image the mask was made for cannot be told."""
    noise(tmp_path / "a.png"), noise(tmp_path / "a.jpg", seed=1)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": name, "text": name}) + "\n" for name in ("a.png", "a.jpg")))
    (tmp_path / "masks").mkdir()
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "a.png")
    config = DataConfig(image_dir=str(tmp_path), resolution=64, loss_mask={"source": "files"})
    report = inspect_examples(read_examples(config), config, "data")
    assert [f.message for f in report.of_level(FATAL)] == [
        f"images a.png and a.jpg share the loss mask {tmp_path / 'masks' / 'a.png'}: name each image's mask by its full file name "
        "(masks/a.jpg for a.jpg), or remove one image (a copy?)"]  # fmt: skip
    Image.new("L", (64, 64), 128).save(tmp_path / "masks" / "a.jpg.png")
    (tmp_path / "masks" / "a.jpg.png").rename(tmp_path / "masks" / "a.jpg")  # a PNG of the full name: each image has its own
    report = inspect_examples(read_examples(config), config, "data")
    assert report.of_level(FATAL) == [] and sorted(e.mask_area for e in report.usable) == pytest.approx([128 / 255, 1.0])
    # Names that differ in case only: each finds its own mask by its exact name; with one mask between them, both would train with it.
    for path in (tmp_path / "a.jpg", tmp_path / "masks" / "a.jpg", tmp_path / "masks" / "a.png"):
        path.unlink()
    noise(tmp_path / "A.png", seed=2)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": name, "text": name}) + "\n" for name in ("a.png", "A.png")))
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "a.png")
    report = inspect_examples(read_examples(config), config, "data")
    assert [f.message for f in report.of_level(FATAL)] == [
        f"images a.png and A.png share the loss mask {tmp_path / 'masks' / 'a.png'}: name each image's mask by its full file name "
        "(masks/A.png for A.png), or remove one image (a copy?)"]  # fmt: skip
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "A.png")
    assert inspect_examples(read_examples(config), config, "data").of_level(FATAL) == []


def test_a_data_folders_entry_of_only_image_folders_names_them_and_the_entries_that_train_them(tmp_path):
    """Only the images directly in an entry's folder are read: sd-scripts' N_name folders one level down were 'no images'."""
    for name in ("10_sks dog", "1_style"):
        (tmp_path / "concepts" / name).mkdir(parents=True)
        noise(tmp_path / "concepts" / name / "a.png")
    config = DataConfig(image_dir=str(tmp_path), resolution=64, caption="a photo", folders=[{"path": "concepts", "repeats": 2}])
    expected = (f"data folder {tmp_path / 'concepts'} has no images of its own, only subfolders with images (10_sks dog, 1_style): "
                "list each as its own data.folders entry in place of path 'concepts', e.g. "
                'folders: [{path: "concepts/10_sks dog", repeats: 10}, {path: "concepts/1_style", repeats: 1}]')  # fmt: skip
    with pytest.raises(FinetuneError, match=f"^{re.escape(expected)}$"):
        read_examples(config)
    entries = [{"path": "concepts/10_sks dog", "repeats": 10}, {"path": "concepts/1_style"}]
    assert len(read_examples(DataConfig(image_dir=str(tmp_path), resolution=64, caption="a photo", folders=entries))) == 2
