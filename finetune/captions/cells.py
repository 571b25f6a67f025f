"""Caption cells that are not one string: a `datasets` caption column's cell, or a metadata.jsonl row's text.
A list of strings (COCO's five captions per image) is several captions of its image, as a caption of several
lines is (finetune/captions/captions.py); a cell of anything else is one line naming what it holds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from finetune.errors import FinetuneError

# The longest caption read: a caption trains its first 75 tokens (225 with model.max_token_length; some 1,000 characters),
# and this is a hundred times that. Past it is no caption (a log, a book, a file of another kind renamed): a caption
# is tokenized whole before it is cut, at the data check and as it trains (8 MB: 49 s and 1.7 GB; 1 GB: hours, or
# the machine's memory), and a caption file or metadata row is read whole.
MAX_CAPTION_LENGTH = 100_000


def caption_too_long(where: str, length: int, unit: str = "characters") -> str:
    return (f"{where} is {length:,} {unit} long, more than a caption finetune reads ({MAX_CAPTION_LENGTH:,} {unit}; a caption "
            "trains its first 75 tokens, or 225 with model.max_token_length): shorten it, or remove it if it is no caption")  # fmt: skip


def caption_file_bytes(path: Path) -> bytes:
    """A caption file's bytes, where it is no longer than MAX_CAPTION_LENGTH bytes (checked before it is read)."""
    if (size := path.stat().st_size) > MAX_CAPTION_LENGTH:
        raise FinetuneError(caption_too_long(f"caption {path}", size, "bytes"))
    return path.read_bytes()


def require_caption_length(caption: str | None, where: str) -> None:
    """`caption` (of a metadata row or dataset row, named by `where`) within MAX_CAPTION_LENGTH, else one line."""
    if caption is not None and len(caption) > MAX_CAPTION_LENGTH:
        raise FinetuneError(caption_too_long(f"the caption of {where}", len(caption)))


def dataset_caption(value, name: str, column: str, row: str) -> str | None:
    """A dataset's caption cell: None is a missing caption (fatal in the check), not "None"; a blank one trains
    as the empty prompt (a warning in the check), as an empty .txt does. A list of captions (COCO's five per
    image) is several captions of its image, as the lines of one are: one trains each epoch (diffusers'
    train_text_to_image draws one at random too); not its Python text "['a', 'b']"."""
    if (joined := captions_of_list(value)) is not None:
        require_caption_length(joined, f"dataset {name} row {row}")
        return joined
    if value is not None and not isinstance(value, str):
        raise FinetuneError(f"dataset {name} row {row}: caption column '{column}' holds {kind_of(value)}, not text: give each row one caption "
                            "or a list of them (with dataset.map), or set data.caption_column")  # fmt: skip
    require_caption_length(value, f"dataset {name} row {row}")
    return value


def captions_of_list(value) -> str | None:
    """A list of caption strings as one caption of several lines (None for anything else): each entry one caption (its
    own line breaks too); blank ones are none, and a list of only those is an empty caption."""
    if isinstance(value, list) and value and all(isinstance(entry, str) for entry in value):
        return "\n".join(caption for entry in value if (caption := re.sub(r"\r\n?|\n", " ", entry).strip()))
    return None


def kind_of(value) -> str:
    """What a caption cell holds that is no text: "int", "an empty list", "a list of NoneType, str"."""
    if isinstance(value, list):
        return "a list of " + ", ".join(sorted({type(entry).__name__ for entry in value})) if value else "an empty list"
    return type(value).__name__


def list_text_message(source: str, caption: str) -> str | None:
    """The warning for a caption that is a list written as text ("['a dog', 'a brown dog']": pandas' to_csv writes a
    list cell so), or None: it would train as that text, brackets and quotes too, unseen."""
    text = caption.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):  # "[1girl, solo]": tags in brackets, no list
        return None
    if not isinstance(value, list) or not value or not all(isinstance(entry, str) for entry in value):
        return None
    return (f"image {source}: its caption {text[:80]!r} is a list written as text, and trains as that text, brackets and quotes too: "
            "write the captions as a list (a JSON list in a metadata.jsonl or a dataset's cell: one trains each epoch) or as one caption")  # fmt: skip
