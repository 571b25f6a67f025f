"""The encodings caption files and metadata files come in: UTF-8, or the one a byte-order mark announces."""

from __future__ import annotations

import codecs
from pathlib import Path

from finetune.errors import FinetuneError

# Byte-order marks and the encodings they announce (the marks are not part of the caption): Windows
# Notepad's "Unicode" is UTF-16 with one, its "UTF-8 with BOM" starts with one too. UTF-32's marks come
# first, as UTF-32 LE's starts with UTF-16 LE's.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip


def caption_file_encoding(raw: bytes) -> str:
    """The encoding of a caption file's bytes: the one its byte-order mark announces, else UTF-8."""
    return next((encoding for mark, encoding in BYTE_ORDER_MARKS if raw.startswith(mark)), "utf-8-sig")


def without_nul_characters(text: str, named: str) -> str:
    """`text`, unless it holds NUL characters: valid UTF-8, but UTF-16 written without a byte-order mark reads
    so ("a\\x00 \\x00c\\x00a\\x00t\\x00"), and would train as a caption of other tokens, unseen."""
    if "\x00" in text:
        raise FinetuneError(f"{named} holds NUL characters, as UTF-16 text without a byte-order mark does: save it as UTF-8 "
                            "(most editors offer it under 'encoding')")  # fmt: skip
    return text


def undecodable_files(paths: list[Path]) -> int:
    """How many of `paths` are not text in the encoding their byte-order mark (or its absence) says. A file past
    MAX_CAPTION_LENGTH bytes (no caption: a log beside the images) is not read to be counted, nor counted."""
    from finetune.captions.cells import MAX_CAPTION_LENGTH

    count = 0
    for path in paths:
        if path.stat().st_size > MAX_CAPTION_LENGTH:
            continue
        raw = path.read_bytes()
        try:
            raw.decode(caption_file_encoding(raw))
        except UnicodeDecodeError:
            count += 1
    return count
