"""Captions from a downloaded data set: a caption of megabytes (a log or a book saved as .txt, a metadata row of
gigabytes) was read whole and tokenized whole before being cut to 75 tokens, at the data check and as it trained
(8 MB: 49 s and 1.7 GB; 1 GB: hours, or all the memory). Past MAX_CAPTION_LENGTH it is one line naming the file,
row or dataset row, before the caption is parsed or tokenized; a caption file is not even read."""

from pathlib import Path

import pytest
from PIL import Image

from finetune.captions.cells import MAX_CAPTION_LENGTH, dataset_caption
from finetune.captions.overrides import shadowed_caption_files
from finetune.config import DataConfig
from finetune.data.sources import read_examples
from finetune.errors import FinetuneError

TOO_LONG = r"long, more than a caption finetune reads \(100,000 (characters|bytes); a caption trains its first 75 tokens"


def folder_of_two(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), "red").save(folder / f"{name}.png")
    return folder


def captions(folder: Path) -> dict[str, str]:
    return {Path(example.source).name: example.caption for example in read_examples(DataConfig(image_dir=str(folder)))}


def test_a_caption_file_past_the_bound_is_one_line_naming_it_and_is_not_read(tmp_path, monkeypatch):
    folder = folder_of_two(tmp_path)
    (folder / "a.txt").write_text("x" * MAX_CAPTION_LENGTH)
    (folder / "b.txt").write_text("x" * (MAX_CAPTION_LENGTH + 1))
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: pytest.fail(f"{path} was read") if path.name == "b.txt" else read(path))
    with pytest.raises(FinetuneError, match=rf"^caption {folder / 'b.txt'} is 100,001 bytes {TOO_LONG}") as raised:
        captions(folder)
    assert "\n" not in str(raised.value)
    monkeypatch.undo()
    (folder / "b.txt").write_text("a red square")
    assert captions(folder) == {"a.png": "x" * MAX_CAPTION_LENGTH, "b.png": "a red square"}


def test_a_metadata_row_of_megabytes_is_refused_by_its_line_before_it_is_parsed(tmp_path, monkeypatch):
    import json

    folder = folder_of_two(tmp_path)
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": "x" * (3 * MAX_CAPTION_LENGTH)}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text, **kw: pytest.fail("a row of megabytes was parsed") if len(text) > 2 * MAX_CAPTION_LENGTH else loads(text, **kw))
    with pytest.raises(FinetuneError, match=rf"^{folder / 'metadata.jsonl'} line 2 is 300,0\d\d characters {TOO_LONG}.*\(a row holds at most 200,000\)$"):
        captions(folder)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_metadata_caption_past_the_bound_is_refused_naming_its_row(tmp_path, kind):
    folder = folder_of_two(tmp_path)
    long = "x" * (MAX_CAPTION_LENGTH + 1)
    if kind == "jsonl":
        (folder / "metadata.jsonl").write_text(f'{{"file_name": "a.png", "text": "ok"}}\n{{"file_name": "b.png", "text": "{long}"}}\n')
        where = "line 2"
    else:
        (folder / "metadata.csv").write_text(f"file_name,text\na.png,ok\nb.png,{long}\n")
        where = "line 3"
    with pytest.raises(FinetuneError, match=rf"^the caption of {folder / f'metadata.{kind}'} {where} is 100,001 characters {TOO_LONG}"):
        captions(folder)


def test_a_dataset_caption_past_the_bound_is_refused_naming_its_row():
    long = "x" * (MAX_CAPTION_LENGTH + 1)
    assert dataset_caption("x" * MAX_CAPTION_LENGTH, "someone/images", "text", "7") == "x" * MAX_CAPTION_LENGTH
    for cell in (long, ["a red square", long]):
        with pytest.raises(FinetuneError, match=rf"^the caption of dataset someone/images row 7 is 100,0\d\d characters {TOO_LONG}"):
            dataset_caption(cell, "someone/images", "text", "7")


def test_a_caption_file_a_metadata_row_overrides_is_not_read_whole_to_be_compared(tmp_path, monkeypatch):
    folder = folder_of_two(tmp_path)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "ok"}\n')
    (folder / "b.txt").write_text("x" * (MAX_CAPTION_LENGTH + 1))
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: pytest.fail(f"{path} was read") if path.name == "b.txt" else read(path))
    assert "1 caption file (b.txt) differs from metadata.jsonl" in shadowed_caption_files(folder, DataConfig(image_dir=str(folder)))


def test_the_count_of_undecodable_caption_files_does_not_read_a_large_text_file_beside_them(tmp_path, monkeypatch):
    """One caption in a code page counts the folder's other undecodable .txt files for its message: a log of gigabytes
    among them (no caption of any image) was read whole to be counted."""
    folder = folder_of_two(tmp_path)
    (folder / "a.txt").write_bytes("caf\xe9".encode("cp1252"))
    (folder / "training-log.txt").write_bytes(b"\xff" * (MAX_CAPTION_LENGTH + 1))
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: pytest.fail(f"{path} was read") if path.name == "training-log.txt" else read(path))
    with pytest.raises(FinetuneError, match=rf"^caption {folder / 'a.txt'} is not UTF-8 text: save it as UTF-8"):
        captions(folder)
