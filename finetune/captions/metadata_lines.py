"""A metadata.jsonl's or metadata.csv's lines, read one at a time: decoded as caption files are, each line's length
checked before it is held. A metadata file of gigabytes (extra columns of tags, scores, embeddings) was read whole,
decoded whole and split whole (2 GB: some 4 GB of memory) before its first row was checked; now only its rows'
captions stay, as they did before."""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path
from typing import Iterable, Iterator

from finetune.captions.cells import MAX_CAPTION_LENGTH, caption_too_long
from finetune.captions.text_encodings import caption_file_encoding, without_nul_characters
from finetune.errors import FinetuneError

LONGEST_ROW = 2 * MAX_CAPTION_LENGTH  # a caption, its file name and other columns
LINE_ENDS = ("\r\n", "\n", "\r")


def metadata_lines(path: Path, lenient: bool = False) -> Iterator[str]:
    """The lines of a metadata file, each with its line end, split at line ends alone (LF, CRLF, CR: not at U+2028 and the
    other breaks str.splitlines knows, which a JSON string or caption may hold), as `datasets` reads a metadata.jsonl.
    Decoded as caption files are (`caption_file_encoding`): Excel's "CSV UTF-8" starts with a byte-order mark, its
    "Unicode text" is UTF-16 with one; else UTF-8. A file in none of them (Excel's plain "CSV" on Windows is the system's
    code page), a NUL character (UTF-16 without a mark) or a line longer than LONGEST_ROW stops with one line naming it,
    the long line before it is held. `lenient`: undecodable bytes replaced and NUL characters kept, for looking through
    a file whose rows the caption reader reports."""
    with path.open("rb") as raw:
        encoding = caption_file_encoding(raw.read(4))
    with path.open(encoding=encoding, errors="replace" if lenient else "strict", newline="") as text:
        limit = LONGEST_ROW + 2  # a row of LONGEST_ROW and its CRLF: a line cut at the limit is too long
        for number in itertools.count(1):
            line = _read(text, limit, path, encoding)
            if not line:
                return
            ending = next((end for end in LINE_ENDS if line.endswith(end)), "")
            length = len(line) - len(ending)
            while len(line) == limit and not ending:  # counted to its end, not held: the error says how long it is
                line = _read(text, limit, path, encoding)
                ending = next((end for end in LINE_ENDS if line.endswith(end)), "")
                length += len(line) - len(ending)
            if length > LONGEST_ROW:
                raise FinetuneError(caption_too_long(f"{path} line {number}", length) + f" (a row holds at most {LONGEST_ROW:,})")
            yield line if lenient else without_nul_characters(line, str(path))


def _read(text: io.TextIOBase, limit: int, path: Path, encoding: str) -> str:
    try:
        return text.readline(limit)
    except UnicodeDecodeError:
        raise FinetuneError(f"{path} is not {encoding.removesuffix('-sig').upper()} text: save it as UTF-8 "
                            "(Excel: 'CSV UTF-8'; most editors offer it under 'encoding')") from None  # fmt: skip


def metadata_text(path: Path) -> str:
    """A metadata file's whole text, checked as `metadata_lines` checks it (for a reader that needs it whole)."""
    return "".join(metadata_lines(path))


class _CsvRows(csv.DictReader):
    """csv.DictReader that knows the line each row starts on (`row_line`; csv skips blank lines, the row is below them),
    and whose parse errors are one line naming the file and that line (a traceback before)."""

    def __init__(self, lines: Iterable[str], path: Path | str, lines_before: int = 0, **options):
        self.path, self.row_line, self._lines_read = path, None, lines_before  # `lines_before`: blank lines above `lines`
        self._last_filled, self._at_end = 0, False  # the last line read that is not blank; whether a row asked past the file's end
        super().__init__(self._numbered(lines), **options)

    def _numbered(self, lines: Iterable[str]) -> Iterator[str]:
        for line in lines:  # csv's reader takes them one at a time, as a row needs them
            self._lines_read += 1
            if line.rstrip("\r\n"):
                self.row_line = self._lines_read if self.row_line is None else self.row_line
                self._last_filled = self._lines_read
            yield line
        self._at_end = True

    @property
    def fieldnames(self) -> list[str] | None:
        try:
            names = super().fieldnames
        except csv.Error as err:  # read only here: the header's
            raise FinetuneError(self._runaway_quote(f"{err}: ", header=True)) from None
        # A quote the header never closes takes the rows below into one column's name, up to the file's end (where it
        # is shorter than csv's limit): no column's name holds a line end.
        if opened := next((name for name in names or [] if "\n" in name or "\r" in name), None):
            raise FinetuneError(f"{self.path} line {self.row_line}: the header opens a double quote before {opened.splitlines()[0]!r} that never closes, "
                                f"so the rows below are read as part of a column's name: {HEADER_QUOTE_ADVICE}")  # fmt: skip
        return names

    def __next__(self) -> dict:
        self.fieldnames  # the header first: the row starts below it
        self.row_line = None
        try:
            row = super().__next__()
        except csv.Error as err:
            raise FinetuneError(self._runaway_quote(f"{err}: ")) from None
        # A row ends at its line's end unless a quoted cell is open: one that asked for a line past the file's end holds a
        # quote never closed. Short of csv's field limit it took the rows below into its cell (a caption "of 2 lines", their
        # images without one); one on the last line took none, and is read as it was.
        if self._at_end and self._last_filled > self.row_line:
            raise FinetuneError(self._runaway_quote("", f" (to line {self._last_filled}, the end of the file)"))
        return row

    def _runaway_quote(self, error: str, reach: str = "", header: bool = False) -> str:
        # Past the field limit (`error`: csv's): a quote never closed runs on over the lines below, to the end of the file, where csv gives up.
        if header:
            return f"{self.path} line {self.row_line}: {error}the header opens a double quote that never closes, so it runs on over the lines below: {HEADER_QUOTE_ADVICE}"
        return (f"{self.path} line {self.row_line}: {error}a cell there opens a double quote that never closes, so it runs on over "
                f'the lines below{reach}; close the quote, or double a quote inside a caption ("")')  # fmt: skip


# A column's name needs no quotes (file_name, text, conditioning_file_name): a caption's doubled quote is no remedy here.
HEADER_QUOTE_ADVICE = "remove the quote from the header (column names need none), or close it after the column's name"


def csv_rows(lines: str | Iterable[str], path: Path | str) -> csv.DictReader:
    """A metadata.csv's rows by its header (`lines`: its text, or its `metadata_lines`; `path`: the file, with its folder, that
    its errors name), as every reader of one reads them: its header is its first line that is not blank (as pandas, which
    `datasets` reads it with, finds it), separated as `csv_delimiter` finds, and a space after a separator no part of the cell
    (", \"a, b\"" is the caption a, b, not '"a'). A cell may be as long as a row (csv's own limit is 131,072 characters)."""
    csv.field_size_limit(max(csv.field_size_limit(), LONGEST_ROW))
    lines = iter(io.StringIO(lines, newline="") if isinstance(lines, str) else lines)
    header, blank = next(lines, ""), 0
    while header and not header.rstrip("\r\n"):  # blank lines above the header: skipped, as csv skips them above a row
        header, blank = next(lines, ""), blank + 1
    return _CsvRows(itertools.chain([header], lines), path, blank, delimiter=csv_delimiter(header), skipinitialspace=True)


def csv_delimiter(header: str) -> str:
    """The header row's separator: a comma, else a tab (Excel's "Unicode text") or a semicolon (Excel's CSV where a
    comma is the decimal mark: German, French, ...), which the header holds in place of commas."""
    if "," in header:
        return ","
    return next((mark for mark in ("\t", ";") if mark in header), ",")
