"""A metadata row finds its image as a case-insensitive file system (macOS, Windows) would open it for
`datasets`' imagefolder, and as .txt captions are found: by the exact name, else by the one file whose name
differs only in letter case (finetune/captions/file_names.py). A row that fits no image, or two, stops training and
check-data alike with one line naming the metadata file and the row."""

import json
import re

import pytest

from finetune.cli.main import main
from finetune.config import DataConfig
from finetune.controlnet.pairs import _conditioning_files
from finetune.data.sources import read_examples
from finetune.data_check.check import inspect_examples
from finetune.errors import FinetuneError
from odd_images import captioned, noise


def write_rows(folder, rows, name="metadata.jsonl"):
    (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def captions(folder):
    return {example.source.rsplit("/", 1)[1]: example.caption for example in read_examples(DataConfig(image_dir=str(folder), resolution=64))}


def check_data(folder, capsys):
    code = main(["check-data", "--image-dir", str(folder), "--resolution", "64"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_refused_by_training_and_check_data(read, expected: str, folder, capsys) -> None:
    """`read()` (what training reads) raises exactly the line `expected`, and check-data of `folder` says it as an error."""
    with pytest.raises(FinetuneError, match=f"^{re.escape(expected)}$"):
        read()
    code, output = check_data(folder, capsys)
    assert code == 2 and f"error: {expected}" in output


def test_a_row_in_other_letter_case_captions_its_image_in_training_and_in_check_data(tmp_path, capsys):
    noise(64, 64, seed=1).save(tmp_path / "cat.png")
    noise(64, 64, seed=2).save(tmp_path / "dog.jpg")
    write_rows(tmp_path, [{"file_name": "Cat.PNG", "text": "a cat"}, {"file_name": "./DOG.JPG", "text": "a dog"}])
    assert captions(tmp_path) == {"cat.png": "a cat", "dog.jpg": "a dog"}
    code, output = check_data(tmp_path, capsys)
    assert code == 0 and "warning" not in output and "error" not in output
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\nCAT.png,a cat\ndog.JPG,a dog\n")
    assert captions(tmp_path) == {"cat.png": "a cat", "dog.jpg": "a dog"}


def test_the_exact_name_wins_over_one_in_other_case(tmp_path):
    """On Linux cat.png and Cat.png are two images: a row naming one exactly is that one's, the other keeps its .txt."""
    captioned(tmp_path, "cat.png", caption="its own text")
    captioned(tmp_path, "Cat.png", caption="the other's text")
    if len(list(tmp_path.iterdir())) < 4:
        pytest.skip("a case-insensitive file system holds one of cat.png and Cat.png")
    write_rows(tmp_path, [{"file_name": "Cat.png", "text": "from the row"}])
    assert captions(tmp_path) == {"Cat.png": "from the row", "cat.png": "its own text"}


def test_a_row_that_fits_two_images_only_loosely_is_one_line_naming_the_row(tmp_path, capsys):
    captioned(tmp_path, "cat.png")
    captioned(tmp_path, "CAT.png")
    if len(list(tmp_path.iterdir())) < 4:
        pytest.skip("a case-insensitive file system holds one of cat.png and CAT.png")
    write_rows(tmp_path, [{"file_name": "Cat.png", "text": "which?"}])
    expected = (f"{tmp_path / 'metadata.jsonl'} line 1: file_name 'Cat.png' fits 2 files that differ only in letter case (CAT.png, cat.png) "
                "and names none of them exactly: write the image's exact name")  # fmt: skip
    assert_refused_by_training_and_check_data(lambda: captions(tmp_path), expected, tmp_path, capsys)


def test_a_row_naming_no_image_stops_training_and_check_data_naming_the_row(tmp_path, capsys):
    captioned(tmp_path, "a.png")
    noise(64, 64, seed=9).save(tmp_path / "b.png")
    write_rows(tmp_path, [{"file_name": "b.png", "text": "found"}, {"file_name": "c.jpg", "text": "a typo"}, {"file_name": "notes.txt", "text": "x"}])
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    expected = (f"{tmp_path / 'metadata.jsonl'} line 2 names c.jpg, which is not an image in its folder (and 1 more: notes.txt): "
                "fix file_name, or remove the row")  # fmt: skip
    assert_refused_by_training_and_check_data(lambda: read_examples(config), expected, tmp_path, capsys)

    (tmp_path / "metadata.csv").write_text("file_name,text\nb.png,found\nsub/a.png,nested\n")
    (tmp_path / "metadata.jsonl").unlink()
    with pytest.raises(FinetuneError, match=r"metadata\.csv line 3 names sub/a\.png, which is not an image in its folder: fix file_name, or remove the "
                                            r"row; an image in a subfolder trains only as a data.folders entry"):  # fmt: skip
        read_examples(config)
    # A row naming an image of a kind training does not read: it is there, so the line says what it is and what to do.
    (tmp_path / "loop.gif").write_bytes(b"GIF89a")
    (tmp_path / "metadata.csv").write_text("file_name,text\nb.png,found\nloop.gif,a loop\n")
    with pytest.raises(FinetuneError, match=r"metadata\.csv line 3 names loop\.gif, a \.gif file, which training does not read: convert it to PNG or "
                                            r"JPEG and write its new name in file_name, or remove the row$"):  # fmt: skip
        read_examples(config)
    (tmp_path / "loop.gif").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\nb.png,found\n")  # every row an image: nothing to say
    assert inspect_examples(read_examples(config), config, "data").findings == []


def test_two_rows_for_one_image_in_two_letter_cases_are_one_image_twice(tmp_path):
    noise(64, 64, seed=1).save(tmp_path / "cat.png")
    write_rows(tmp_path, [{"file_name": "cat.png", "text": "one"}, {"file_name": "CAT.PNG", "text": "two"}])
    with pytest.raises(FinetuneError, match=r"metadata\.jsonl line 2 names cat\.png again \(first in line 1\): keep one row per image"):
        captions(tmp_path)


def test_a_controlnet_row_in_other_letter_case_finds_its_image_as_its_caption_does(tmp_path):
    noise(64, 64, seed=1).save(tmp_path / "a.png")
    (tmp_path / "conditioning").mkdir()
    noise(64, 64, seed=2).save(tmp_path / "conditioning" / "a.png")
    write_rows(tmp_path, [{"file_name": "A.PNG", "conditioning_file_name": "conditioning/a.png", "text": "x"}])
    assert _conditioning_files(tmp_path) == {"a.png": "conditioning/a.png"}
