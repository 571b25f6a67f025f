"""A metadata file is read a line at a time: a metadata.jsonl or metadata.csv of gigabytes (extra columns of tags,
scores, embeddings) was read whole, decoded whole and split whole before its first row was checked (190 MB: 409 MB of
memory, 2 GB: some 4 GB). Now a row is checked as it is read and only the captions stay; the one-line errors name the
file and line as before, a line of megabytes among them before it is held."""

import json
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from finetune.captions.captions import split_at_line_ends
from finetune.captions.metadata_files import folder_captions, metadata_rows
from finetune.captions.metadata_lines import metadata_lines
from finetune.errors import FinetuneError

ROWS = 40
NOTES = 100_000  # an extra column of each row: 4 MB of file, none of it a caption


def folder_with_metadata(tmp_path: Path, kind: str, notes: int = NOTES) -> Path:
    for index in range(ROWS):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{index}.png")
    if kind == "jsonl":
        rows = (json.dumps({"file_name": f"{index}.png", "text": f"photo {index}", "notes": "x" * notes}) + "\n" for index in range(ROWS))
    else:
        rows = ["file_name,text,notes\n", *(f"{index}.png,photo {index},{'x' * notes}\r\n" for index in range(ROWS))]
    (tmp_path / f"metadata.{kind}").write_text("".join(rows), newline="")
    return tmp_path


def peak_bytes(read) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = read()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_large_metadata_file_is_read_a_row_at_a_time(tmp_path, kind):
    folder = folder_with_metadata(tmp_path, kind)
    size = (folder / f"metadata.{kind}").stat().st_size
    captions, peak = peak_bytes(lambda: folder_captions(folder))
    assert captions == {f"{index}.png": f"photo {index}" for index in range(ROWS)}
    assert peak < size / 4, f"reading {size:,} bytes of metadata held {peak:,}"  # the whole file read: twice its size or more
    rows, peak = peak_bytes(lambda: sum(1 for _ in metadata_rows(folder)))  # the lenient reader, which looks for subfolders and partner files
    assert rows == ROWS and peak < size / 4, f"looking through {size:,} bytes of metadata held {peak:,}"


def test_a_line_of_megabytes_is_refused_by_its_number_and_length_without_being_held(tmp_path):
    folder = folder_with_metadata(tmp_path, "jsonl", notes=10)
    with (folder / "metadata.jsonl").open("a") as metadata:
        metadata.write("{" + "x" * 8_000_000 + "\r\n")
    with pytest.raises(FinetuneError) as raised:
        peak_bytes(lambda: folder_captions(folder))
    assert str(raised.value).startswith(f"{folder / 'metadata.jsonl'} line {ROWS + 1} is 8,000,001 characters long")
    assert str(raised.value).endswith("(a row holds at most 200,000)")
    tracemalloc.start()
    with pytest.raises(FinetuneError):
        folder_captions(folder)
    assert tracemalloc.get_traced_memory()[1] < 2_000_000
    tracemalloc.stop()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_lines_split_at_line_ends_alone_whatever_the_encoding(tmp_path, encoding):
    """LF, CRLF and CR end a line (a CRLF cut by the reader's blocks too); U+2028 and U+0085 inside a caption do not."""
    ends = ["\r\n", "\n", "\r"]
    text = "".join("é" * (index * 37 % 5000) + "a\u2028b\x85c" + ends[index % 3] for index in range(60)) + "last"
    (tmp_path / "metadata.jsonl").write_bytes(text.encode(encoding))
    assert [line.rstrip("\r\n") for line in metadata_lines(tmp_path / "metadata.jsonl")] == split_at_line_ends(text)


def test_an_undecodable_line_far_into_the_file_stops_with_one_line_naming_the_file(tmp_path):
    folder = folder_with_metadata(tmp_path, "jsonl", notes=1000)
    with (folder / "metadata.jsonl").open("ab") as metadata:
        metadata.write(b'{"file_name": "0.png", "text": "caf\xe9"}\n')
    with pytest.raises(FinetuneError, match=rf"^{folder / 'metadata.jsonl'} is not UTF-8 text: save it as UTF-8 \(Excel: 'CSV UTF-8'"):
        folder_captions(folder)
    assert sum(1 for _ in metadata_rows(folder)) == ROWS + 1  # the lenient reader replaces the byte


def test_a_csv_cell_as_long_as_a_row_reads_and_a_quote_never_closed_is_one_line(tmp_path):
    """csv's own limit is 131,072 characters a cell: a metadata.csv whose extra column held more (an embedding, a long
    tag list), though its row was within bounds, stopped with csv's traceback; a quote never closed ran on to the end of
    the file and did so too, far below the line at fault."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,text,notes\na.png,a cat," + "x" * 150_000 + "\n")
    assert folder_captions(tmp_path) == {"a.png": "a cat"}
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a cat\n' + "".join(f"{name}.png,{name * 150_000}\n" for name in "bc"))
    with pytest.raises(FinetuneError, match=rf'^{tmp_path / "metadata.csv"} line 2: field larger than field limit \(200000\): a cell there opens a '
                                            r'double quote that never closes, so it runs on over the lines below; close the quote'):  # fmt: skip
        folder_captions(tmp_path)


def test_a_quote_never_closed_names_the_line_its_row_starts_on_for_every_reader(tmp_path):
    """A reader that iterates the rows without asking for the header first (metadata_rows, make-conditions' _input_rows)
    named the header's line 1 for a quote opened in the first row, whose line is 2; an open quote in the header is line 1."""
    from finetune.captions.metadata_lines import csv_rows

    table = tmp_path / "metadata.csv"
    table.write_text('file_name,text\na.png,"a cat\n' + "".join(f"{name}.png,{name * 150_000}\n" for name in "bc"))
    with pytest.raises(FinetuneError, match=rf"^{table} line 2: field larger than field limit"):
        list(metadata_rows(tmp_path))
    table.write_text('file_name,"text\n' + "".join(f"{name * 150_000}\n" for name in "bc"))
    with pytest.raises(FinetuneError, match=rf"^{table} line 1: field larger than field limit"):
        list(csv_rows(metadata_lines(table), table))



def test_a_quote_never_closed_in_a_controlnet_metadata_csv_header_names_the_file_with_its_folder(tmp_path):
    """ControlNet's reader of conditioning file names said 'metadata.csv line 1: ...' of a header's open quote: not which
    folder's file (a user with several data folders, or a check-data of several sources, could not tell)."""
    from finetune.controlnet.pairs import _conditioning_files

    table = tmp_path / "pairs" / "metadata.csv"
    table.parent.mkdir()
    table.write_text('file_name,"conditioning_file_name,text\n' + "".join(f"{name * 150_000}\n" for name in "bc"))
    with pytest.raises(FinetuneError, match=rf"^{table} line 1: field larger than field limit"):
        _conditioning_files(table.parent)

def test_a_bad_csv_row_below_blank_lines_is_said_at_its_own_line(tmp_path):
    """csv skips blank lines: a row's error named the blank line above it (a quote never closed) or counted rows, not
    lines ('row 3' for the row on line 5). Each names the line the row starts on, as a metadata.jsonl's do."""
    from finetune.captions.metadata_files import read_csv_captions

    table = tmp_path / "metadata.csv"
    table.write_text("file_name,text\na.png,a cat\n\n\nb.png,1girl, solo\n")
    with pytest.raises(FinetuneError, match=rf"^{table} line 5 has more cells than its header"):
        read_csv_captions(table)
    table.write_text("file_name,text\r\na.png,a cat\r\n\r\nb.png,a cat\r\nc.png,\"a dog\r\nand a cat\"\r\n\r\na.png,a bird\r\n")
    with pytest.raises(FinetuneError, match=rf"^{table} line 8 names a.png again \(first in line 2\): keep one row per image"):
        read_csv_captions(table)
    table.write_text('file_name,text\na.png,a cat\n\n\nb.png,"a dog\n' + "".join(f"{name}.png,{name * 150_000}\n" for name in "cd"))
    for read in (read_csv_captions, lambda path: list(metadata_rows(path.parent))):
        with pytest.raises(FinetuneError, match=rf"^{table} line 5: field larger than field limit"):
            read(table)
    table.write_text('file_name,"text\n' + "".join(f"{name * 150_000}\n" for name in "bc"))  # in the header, read first
    with pytest.raises(FinetuneError, match=rf"^{table} line 1: field larger than field limit"):
        read_csv_captions(table)


def test_a_csv_header_below_blank_lines_is_read_as_the_header(tmp_path):
    """A metadata.csv starting with a blank line (an export, a hand edit) was read as a header of no columns ('has: none'),
    though csv skips blank lines above a row and pandas, which datasets reads it with, above the header too. Each row's
    line is still its own."""
    from finetune.captions.metadata_files import read_csv_captions

    table = tmp_path / "metadata.csv"
    table.write_text("\n\r\nfile_name;text\na.png;a cat\n")
    assert read_csv_captions(table) == {"a.png": "a cat"}
    table.write_text("\n\nfile_name,text\na.png,a cat\nb.png,1girl, solo\n")
    with pytest.raises(FinetuneError, match=rf"^{table} line 5 has more cells than its header"):
        read_csv_captions(table)
    table.write_text('\nfile_name,"text\n' + "".join(f"{name * 150_000}\n" for name in "bc"))  # in the header
    with pytest.raises(FinetuneError, match=rf"^{table} line 2: field larger than field limit"):
        read_csv_captions(table)


def test_a_quote_never_closed_in_a_short_metadata_csv_header_is_one_line_saying_to_remove_it(tmp_path):
    """Short of csv's field limit, a header's open quote took the rows below into a column's name: the error dumped the
    file over many lines ("has: file_name, conditioning_file_name,text\\n0.png,..."), and said to double a quote inside
    a caption, which a header holds none of."""
    from finetune.captions.metadata_files import read_csv_captions

    table = tmp_path / "metadata.csv"
    table.write_text('file_name,"text\na.png,a cat\nb.png,a dog\n')
    advice = r"remove the quote from the header \(column names need none\), or close it after the column's name$"
    with pytest.raises(FinetuneError, match=rf"^{table} line 1: the header opens a double quote before 'text' that never closes, so the rows below are read as "
                                            rf"part of a column's name: {advice}"):  # fmt: skip
        read_csv_captions(table)
    table.write_text('file_name,"text\n' + "".join(f"{name * 150_000}\n" for name in "bc"))  # past the limit: csv's own error
    with pytest.raises(FinetuneError, match=rf"^{table} line 1: field larger than field limit \(200000\): the header opens a double quote that never closes, so it "
                                            rf"runs on over the lines below: {advice}"):  # fmt: skip
        read_csv_captions(table)


def test_a_quote_never_closed_in_a_row_of_a_short_metadata_csv_is_one_line_naming_its_row(tmp_path):
    """Short of csv's field limit, a row's open quote took the rows below into its caption: check-data said "caption of
    2 lines" for its image and "no caption" for the next, nothing of the quote. A quoted caption of several lines that
    closes, and an open quote on the last line with no row below it to take, read as they did."""
    for name in "abc":
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{name}.png")
    table = tmp_path / "metadata.csv"
    table.write_text('file_name,text\na.png,"a cat\nb.png,a dog\n\nc.png,a bird\n')
    said = (rf'^{table} line 2: a cell there opens a double quote that never closes, so it runs on over the lines below \(to line 5, the '
            r'end of the file\); close the quote, or double a quote inside a caption \(""\)$')  # fmt: skip
    with pytest.raises(FinetuneError, match=said):
        folder_captions(tmp_path)
    with pytest.raises(FinetuneError, match=said):  # the lenient reader too (ControlNet's partner files)
        list(metadata_rows(tmp_path))
    table.write_text('file_name,text\na.png,"a cat\non a mat"\nb.png,"a dog\n')
    assert folder_captions(tmp_path) == {"a.png": "a cat\non a mat", "b.png": "a dog"}
