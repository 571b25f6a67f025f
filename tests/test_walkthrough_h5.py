"""Conditioning images, metadata files and masks as users bring them: metadata saved by Excel in other
encodings, make-conditions over a folder with metadata columns of its own, and odd conditioning images
given to sample and the demo."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.errors import FinetuneError
from finetune.sources import read_examples


def noise(path, size=(64, 64), seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def captions(folder):
    return {e.source.rsplit("/", 1)[1]: e.caption for e in read_examples(DataConfig(image_dir=str(folder), resolution=64))}


@pytest.mark.parametrize("encoding, separator", [("utf-8-sig", ","), ("utf-16", ","), ("utf-16", "\t")])
def test_metadata_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path, encoding, separator):
    """Excel's "CSV UTF-8" starts with a byte-order mark; its "Unicode text" is UTF-16 with one, columns separated by tabs."""
    noise(tmp_path / "a.png")
    rows = [["file_name", "text"], ["a.png", "a café, by night"]]
    text = "\r\n".join(separator.join(f'"{cell}"' if "," in cell and separator == "," else cell for cell in row) for row in rows)
    (tmp_path / "metadata.csv").write_bytes(text.encode(encoding))
    assert captions(tmp_path) == {"a.png": "a café, by night"}
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_bytes(json.dumps({"file_name": "a.png", "text": "a café"}, ensure_ascii=False).encode(encoding))
    assert captions(tmp_path) == {"a.png": "a café"}


def test_metadata_in_another_encoding_is_one_line_naming_the_file(tmp_path):
    noise(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,a café\n".encode("cp1252"))  # Excel's plain "CSV" on Windows
    with pytest.raises(FinetuneError, match=f"^{re.escape(str(tmp_path / 'metadata.csv'))} is not UTF-8 text: save it as UTF-8 \\(Excel: 'CSV UTF-8'"):
        captions(tmp_path)
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "a café"}'.encode("cp1252"))
    with pytest.raises(FinetuneError, match=f"^{re.escape(str(tmp_path / 'metadata.jsonl'))} is not UTF-8 text"):
        captions(tmp_path)


def test_make_conditions_keeps_every_column_and_row_of_the_users_metadata(tmp_path):
    """Rewriting a folder's own metadata.jsonl in place (or writing another folder from a metadata.csv) adds the
    conditioning column: the user's other columns, and rows naming no image, stay."""
    from finetune.conditions import make_conditions

    folder = tmp_path / "photos"
    folder.mkdir()
    noise(folder / "a.png"), noise(folder / "b.png", seed=1)
    rows = [{"file_name": "a.png", "text": "a cat", "source": "flickr", "depth_file_name": "depth/a.png"},
            {"file_name": "b.png", "text": "a dog", "tags": ["dog", "grass"]}, {"file_name": "typo.png", "text": "a cow"}]  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    make_conditions(folder, folder, "luminance")
    written = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert written == [{**rows[0], "conditioning_file_name": "conditioning/a.png"}, {**rows[1], "conditioning_file_name": "conditioning/b.png"}, rows[2]]

    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,text,source\na.png,a cat,flickr\nb.png,a dog,own\n")
    make_conditions(folder, tmp_path / "out", "luminance", overwrite=True)
    written = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [row["source"] for row in written] == ["flickr", "own"] and [row["text"] for row in written] == ["a cat", "a dog"]
