"""A data folder's metadata file (metadata.jsonl or metadata.csv, as Hugging Face's imagefolder reads them): its
captions by image (columns file_name and text, or data.caption_column), each row checked as training reads it and
named in an error by its line; and, read leniently, the subfolders and partner files its rows name beside their images
(ControlNet's conditioning images). Where a caption comes from when a folder has no such file: `finetune.captions.captions`."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Iterator

from finetune.captions.cells import captions_of_list, kind_of, require_caption_length
from finetune.captions.file_names import name_key, row_image_key
from finetune.captions.metadata_lines import csv_rows, metadata_lines
from finetune.errors import FinetuneError


class RowCaptions(dict):
    """{image name: caption} read from a metadata file, with `places`: {image name: "PATH line N"}, for an error
    about a row to name it."""

    def __init__(self):
        super().__init__()
        self.places: dict[str, str] = {}


def _add_row(captions: RowCaptions, rows: dict[str, str], path: Path, where: str, file_name, caption: str | None) -> None:
    if not isinstance(file_name, str):
        raise FinetuneError(f"{path} {where}: 'file_name' is {type(file_name).__name__}, not a file name")
    key = row_image_key(file_name, path.parent, f"{path} {where}")
    if key in rows:
        raise FinetuneError(f"{path} {where} names {key} again (first in {rows[key]}): keep one row per image")
    rows[key] = where
    require_caption_length(caption, f"{path} {where}")
    if caption is not None:
        captions[key] = caption
    captions.places[key] = f"{path} {where}"


def read_metadata_captions(path: Path, require_text: bool = True, column: str = "text") -> RowCaptions:
    """{file name: caption} from a metadata.jsonl, the caption in `column` (data.caption_column); rows
    without it are an error unless not required."""
    if not path.is_file():
        return RowCaptions()
    captions, rows = RowCaptions(), {}
    one_row_per_line = f"write each row as one JSON object on one line, e.g. {json.dumps({'file_name': '0001.png', column: 'a photo of ...'})}"
    for line_number, line in enumerate(metadata_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:  # a row spread over lines (pretty-printed), a trailing comma, single quotes
            raise FinetuneError(f"{path} line {line_number}: expected a JSON object with 'file_name' and '{column}' ({err.msg}): "
                                f"{one_row_per_line}") from None  # fmt: skip
        if not isinstance(row, dict) or "file_name" not in row or (require_text and column not in row):
            found = f"its keys are {', '.join(repr(key) for key in row) or 'none'}" if isinstance(row, dict) else f"it is {type(row).__name__}"
            advice = _columns_advice(list(row), column, "key", require_text) if isinstance(row, dict) else one_row_per_line
            raise FinetuneError(f"{path} line {line_number}: expected a JSON object with 'file_name' and '{column}' (data.caption_column), "
                                f"but {found}: {advice}")  # fmt: skip
        text, file_name = row.get(column), row["file_name"]
        if text is None and column in row:  # null: said here, not read as "no row" (its .txt would caption it, unseen)
            raise FinetuneError(f"{path} line {line_number}: '{column}' is null, so {file_name} has no caption: write it as a string "
                                '("" trains the image uncaptioned), or remove the row to caption the image by its .txt file')  # fmt: skip
        text = text if (joined := captions_of_list(text)) is None else joined  # several captions, as a dataset's cell may hold
        if text is not None and not isinstance(text, str):
            raise FinetuneError(f"{path} line {line_number}: '{column}' is {kind_of(text)}, not a string: write the caption as one string or a list of them")
        _add_row(captions, rows, path, f"line {line_number}", file_name, text)
    return captions


def read_csv_captions(path: Path, column: str = "text") -> RowCaptions:
    """{file name: caption} from a metadata.csv with a header row naming file_name and `column` (data.caption_column)."""
    if not path.is_file():
        return RowCaptions()
    reader = csv_rows(metadata_lines(path), path)
    columns = reader.fieldnames or []
    if "file_name" not in columns or column not in columns:
        raise FinetuneError(f"{path} must have a header row with 'file_name' and '{column}' columns (has: {', '.join(columns) or 'none'}): "
                            f"{_columns_advice(columns, column, 'column')}")  # fmt: skip
    captions, rows = RowCaptions(), {}
    for row in reader:
        if row.get(None):  # cells past the header's: the separators of a caption not in quotes split it ("1girl" of 1girl, solo)
            raise FinetuneError(f"{path} line {reader.row_line} has more cells than its header ({', '.join(columns)}): {_quote_advice(reader.reader.dialect.delimiter)}")
        if row["file_name"]:
            _add_row(captions, rows, path, f"line {reader.row_line}", row["file_name"], (row[column] or "").strip())
    return captions


def _columns_advice(names: list[str], column: str, kind: str, require_text: bool = True) -> str:
    """What to do about a metadata row's keys (a csv header's columns, `kind`) that lack 'file_name' or the caption's
    `column`: data.caption_column reads the caption from another key, never the image's name from one."""
    others = [name for name in names if name not in ("file_name", column)]
    if "file_name" not in names:  # {"image": "0001.png", "text": ...}, as other tools write it
        rename = f"rename {others[0]!r} to 'file_name'" if len(others) == 1 else f"name each image in a 'file_name' {kind}"
        return f"{rename} (the image's file name, as datasets' imagefolder reads it)" + ("" if column in names or not require_text else
                                                                                       f", and its caption in '{column}' (or set data.caption_column)")  # fmt: skip
    if not others:  # {"file_name": ...} alone: no caption under any name
        return f"add each image's caption as a '{column}' {kind}"
    if len(others) == 1:  # {"file_name": ..., "caption": ...}
        return f"set data.caption_column={others[0]} to read the captions from it, or rename the {kind} to '{column}'"
    return f"rename the caption's {kind} to '{column}', or set data.caption_column to its name"


def _quote_advice(separator: str) -> str:
    """What to do about a caption that holds the file's column separator (a semicolon-separated file's "a dog; brown" split too)."""
    if separator == ",":
        return 'a caption with commas must be in double quotes ("1girl, solo, smile"), as a spreadsheet writes it'
    marks = "semicolons" if separator == ";" else "tabs"
    return f"this file separates its columns by {marks}: a caption with {marks} must be in double quotes, as a spreadsheet writes it"


def folder_captions(folder: Path, column: str = "text") -> RowCaptions:
    """The captions a folder's metadata file gives in `column` (data.caption_column), {} without one; both
    kinds at once is ambiguous."""
    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file() and table.is_file():
        raise FinetuneError(f"data folder {folder} has both metadata.jsonl and metadata.csv: keep one of them")
    return read_metadata_captions(jsonl, column=column) if jsonl.is_file() else read_csv_captions(table, column)


def metadata_file(folder: Path) -> Path | None:
    """The folder's metadata file, as its images' captions are read from it: metadata.jsonl, else metadata.csv; None without one."""
    return next((folder / name for name in ("metadata.jsonl", "metadata.csv") if (folder / name).is_file()), None)


def metadata_rows(folder: Path) -> Iterator[dict]:
    """The rows of the folder's metadata file (`metadata_file`: a JSON object per line, or a CSV row under its header),
    one at a time, read leniently: a line that is no JSON object is left out (`folder_captions` reports it), undecodable bytes replaced."""
    path = metadata_file(folder)
    if path is None:
        return
    lines = metadata_lines(path, lenient=True)
    if path.suffix == ".csv":
        yield from csv_rows(lines, path)
        return
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield row


def metadata_subfolders(folder: Path) -> set[str]:
    """The subfolders of `folder` that its metadata file's rows name files in (ControlNet's
    `conditioning_images/0001.png`): by each row's values that are the path of a file there, so a caption
    that mentions `style/` names no folder. Read leniently: `folder_captions` reports a broken row."""
    values = (value for row in metadata_rows(folder) for value in row.values())
    paths = (PurePosixPath(value.strip().replace("\\", "/").removeprefix("./")) for value in values if isinstance(value, str))
    return {path.parts[0] for path in paths if len(path.parts) > 1 and (folder / path).is_file()}


def metadata_partner_files(folder: Path) -> set[str]:
    """The files directly in `folder` that its metadata file's rows (metadata.jsonl or metadata.csv, `metadata_rows`)
    name beside their image (ControlNet's `"conditioning_file_name": "0001_depth.tif"`): read with their images, so no
    file training leaves unread. Not a file with a row of its own: that is an image.
    Names as `row_image_key` finds their files (`0_Edges.PNG` is `0_edges.png`, as training reads it), in `name_key`
    form: compare `name_key(path.name)`."""
    names: set[str] = set()
    own: set[str] = set()
    for row in metadata_rows(folder):
        paths = {key: value.strip().replace("\\", "/").removeprefix("./") for key, value in row.items() if isinstance(value, str)}
        own |= {_file_named(paths["file_name"], folder)} if "file_name" in paths else set()
        names |= {_file_named(path, folder) for key, path in paths.items() if key != "file_name" and path and "/" not in path}
    return names - own


def _file_named(name: str, folder: Path) -> str:
    """`row_image_key`, read leniently: a name two files fit loosely stays as written (`folder_captions` says so)."""
    try:
        return row_image_key(name, folder)
    except FinetuneError:
        return name_key(name)
