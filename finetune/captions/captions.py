"""Captions: where they are read from, per-folder templates, and the caption an item trains with each epoch.

A folder's captions come from (first match wins) `data.caption`, the folder's metadata.jsonl or
metadata.csv (columns file_name and text, or data.caption_column, as Hugging Face's imagefolder reads them: read by
`finetune.captions.metadata_files`), or a .txt
(else .caption) file beside the image, by its exact name or one that differs only in letter case or Unicode form. A
metadata row that names no image, or a caption file two images would share, stops the data check
(`require_rows_with_images`, `require_own_sidecars`). A folder's `template` then wraps the caption.

At training time (`training_caption`) a caption of several lines trains one of its lines, and tags are shuffled and
dropped per item, each drawn from a generator of its own seeded by (seed, epoch, index), so enabling either never
changes the crops and flips an image gets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from finetune.captions.cells import caption_file_bytes
from finetune.captions.file_names import folder_listing, loose_name_key, name_key
from finetune.captions.metadata_files import RowCaptions
from finetune.captions.text_encodings import caption_file_encoding, undecodable_files, without_nul_characters
from finetune.config import DataConfig
from finetune.errors import FinetuneError

CAPTION_PLACEHOLDER = "{caption}"
DATASET_ROW = "dataset {name} row {row}"  # the source of a dataset's example (a folder's is its file's path)
# Stream number of the tag-shuffle generator, beside item_rng's (seed, epoch, index) stream.
TAG_STREAM = 1
LINE_STREAM = 2  # the generator that picks one line of a caption of several


def split_at_line_ends(text: str) -> list[str]:
    """The lines of a text split at line ends alone (LF, CRLF, CR), as `datasets` reads a metadata.jsonl and sd-scripts
    a caption of several lines: str.splitlines also splits at U+2028, U+0085 and other characters a JSON string or a
    caption may hold (text pasted from a web page), which cut a metadata.jsonl row, or a caption, in two."""
    return re.split(r"\r\n?|\n", text)


# sd-scripts datasets often keep captions in `.caption` files; `.txt` is read first where both are.
SIDECAR_SUFFIXES = (".txt", ".caption")


def image_caption(image_path: Path, metadata: dict[str, str]) -> str | None:
    """An image's own caption as training reads it: its row of the folder's metadata (`metadata`, by
    `name_key`), else its .txt sidecar; None where it has neither."""
    key = name_key(image_path.name)
    return metadata[key] if key in metadata else sidecar_caption(image_path)


def sidecar_path(image_path: Path) -> Path | None:
    """The caption file beside an image that `sidecar_caption` reads, if any: its stem with a SIDECAR_SUFFIXES
    suffix, by that exact name, else by one that differs only in letter case (IMG_1.JPG's IMG_1.TXT, a.Txt)
    or Unicode form (macOS writes `café` decomposed, most tools composed), as a case-insensitive file
    system finds it and metadata rows are matched (`name_key`). Two images led to one file stop the check
    (`require_own_sidecars`)."""
    for suffix in SIDECAR_SUFFIXES:
        if (sidecar := image_path.with_suffix(suffix)).is_file():
            return sidecar
        if (name := caption_file_names(image_path.parent).get(loose_name_key(image_path.stem + suffix))) is not None:
            return image_path.parent / name
    return None


def caption_file_names(folder: Path) -> dict[str, str]:
    """A folder's caption files' names by `loose_name_key`: one listing until the folder changes."""
    return _caption_listing(str(folder))[0]


def other_entry_stems(folder: Path) -> frozenset[str]:
    """The stems (`loose_name_key`) of a folder's entries that are no caption files (its images, a .gif, a subfolder): what
    a caption file may be named after. From `caption_file_names`' listing: one listing of the folder for both."""
    return _caption_listing(str(folder))[1]


@folder_listing
def _caption_listing(folder: str) -> tuple[dict[str, str], frozenset[str]]:
    with os.scandir(folder) as listing:
        entries = list(listing)
    captions = {loose_name_key(e.name): e.name for e in entries if e.name.lower().endswith(SIDECAR_SUFFIXES) and e.is_file()}
    return captions, frozenset(loose_name_key(Path(e.name).stem) for e in entries if not e.name.lower().endswith(SIDECAR_SUFFIXES))


def sidecar_caption(image_path: Path) -> str | None:
    sidecar = sidecar_path(image_path)
    if sidecar is None:
        return None
    raw = caption_file_bytes(sidecar)
    encoding = caption_file_encoding(raw)
    try:
        return without_nul_characters(raw.decode(encoding), f"caption {sidecar}").strip()
    except UnicodeDecodeError:
        # A tool that wrote one in the system's code page wrote them all so: the count saves a run per file.
        others = undecodable_files([p for p in sidecar.parent.iterdir() if p.name.lower().endswith(SIDECAR_SUFFIXES) and p.is_file()]) - 1
        more = f" (nor are {others} more caption files in its folder)" if others > 0 else ""
        raise FinetuneError(f"caption {sidecar} is not {encoding.removesuffix('-sig').upper()} text{more}: "
                            "save it as UTF-8 (most editors offer it under 'encoding')") from None  # fmt: skip


def require_own_sidecars(images: list[Path], metadata: dict[str, str]) -> None:
    """Stop where two images (0001.png and 0001.jpg) would both take their caption from one file (0001.txt):
    most likely one is a converted copy or the caption was meant for one of them only."""
    readers: dict[Path, Path] = {}
    for image_path in images:
        sidecar = None if name_key(image_path.name) in metadata else sidecar_path(image_path)
        if sidecar is None:
            continue
        if sidecar in readers:
            raise FinetuneError(f"images {readers[sidecar]} and {image_path.name} share the caption file {sidecar}: remove one image (a copy?), "
                                "or rename it with a caption file of its own, or caption each in a metadata.jsonl row")  # fmt: skip
        readers[sidecar] = image_path.name


def require_rows_with_images(images: list[Path], metadata: RowCaptions) -> None:
    """Stop at a metadata row that names no image of its folder (a typo, an image removed or renamed, a file in a
    subfolder, which is not read): its caption would train nothing, and `datasets`' imagefolder stops at it too."""
    own = {name_key(path.name) for path in images}
    unmatched = [name for name in metadata if name not in own]  # in row order
    if not unmatched:
        return
    more = f" (and {len(unmatched) - 1} more: {', '.join(unmatched[1:4])}{', ...' if len(unmatched) > 4 else ''})" if len(unmatched) > 1 else ""
    nested = "; an image in a subfolder trains only as a data.folders entry, with a metadata file of its own" if "/" in unmatched[0] else ""
    if (kind := unread_kind(images[0].parent / unmatched[0])) is not None:  # there, but not "not an image in its folder"
        raise FinetuneError(f"{metadata.places[unmatched[0]]} names {unmatched[0]}, a {kind} file, which training does not read{more}: "
                            "convert it to PNG or JPEG and write its new name in file_name, or remove the row")  # fmt: skip
    raise FinetuneError(f"{metadata.places[unmatched[0]]} names {unmatched[0]}, which is not an image in its folder{more}: "
                        f"fix file_name, or remove the row{nested}")  # fmt: skip


def unread_kind(path: Path) -> str | None:
    """The suffix of an image file that is there but of a kind training does not read (an animated .gif, an iPhone's .heic), or None."""
    from finetune.data.sources import UNREAD_IMAGE_SUFFIXES  # here: sources.py builds on this module

    return path.suffix.lower() if path.suffix.lower() in UNREAD_IMAGE_SUFFIXES and path.is_file() else None


def dataset_of_row(source: str | Path) -> str | None:
    """The dataset a `datasets` row's source (DATASET_ROW) names; None for an image file, whose path may start
    with "dataset " too (a folder named "dataset v2")."""
    row = re.fullmatch(DATASET_ROW.format(name="(.+)", row=r"\d+(?: of split '.+')?"), str(source))  # "12 of split 'test'": dataset_splits.row_labels
    return row.group(1) if row else None


# Captions kept in JSON files no folder's captions are read from: a metadata.json (for metadata.jsonl), and sd-scripts'
# fine-tuning metadata as its scripts name it (merge_captions_to_metadata.py's meta_cap.json, and its later steps').
UNREAD_CAPTION_JSON = ("metadata.json", "meta_cap.json", "meta_cap_dd.json", "meta_clean.json", "meta_lat.json")


def missing_caption_message(source: str | Path, alternative: str = "set data.caption to one prompt for all images") -> str:
    """`source` is an image file, or a `datasets` row ("dataset NAME row N"); `alternative` is the other fix."""
    from finetune.captions.metadata_files import metadata_file

    if dataset_of_row(source) is not None:
        return f"{source} has no caption (a null cell): fill the caption column, or {alternative}"
    image_path = Path(source)
    message = f"image {image_path} has no caption: add {image_path.with_suffix('.txt').name}, a metadata.jsonl or metadata.csv entry, or {alternative}"
    # Each image was told to add a metadata.jsonl beside the metadata.json its captions were written in, which went unnamed.
    if metadata_file(image_path.parent) is None and (unread := [name for name in UNREAD_CAPTION_JSON if (image_path.parent / name).is_file()]):
        message += (f" ({' and '.join(unread)} beside it {'is' if len(unread) == 1 else 'are'} not read: a folder's captions in JSON are "
                    "read from metadata.jsonl, one object a line with file_name and text)")
    return message


def empty_caption_message(source: str, caption: str, config: DataConfig, folder_index: int = 0) -> str | None:
    """The warning for an image whose own caption (its .txt, metadata row or dataset cell) is empty, or None.

    Not an error: ControlNet data (make-conditions' output) trains uncaptioned images on purpose. In a
    data.folders entry with a template the image trains as the template alone, which still deserves a
    word: a caption file left empty is more often forgotten than meant. data.caption "" is meant."""
    template = config.folders[folder_index].template if config.folders else None
    if config.caption is not None or not template_needs_caption(template):  # a fixed prompt: captions are not read
        return None
    if caption.strip() != apply_template(template, "").strip():
        return None
    if dataset_of_row(source) is not None:
        return f"{source} has an empty caption: it trains as the empty prompt; write one in its caption column if that is not meant"
    trains_as = f"as its folder's template alone ({caption!r})" if template else "as the empty prompt"
    return f"image {source} has an empty caption: it trains {trains_as}; write one in its .txt or metadata row if that is not meant"


def caption_alternative(config: DataConfig, folder_index: int = 0) -> str:
    """What else captions an image of data.folders entry `folder_index` than a caption of its own: the
    entry's template (data.caption would prompt every folder's images alike)."""
    if not config.folders:
        return config._caption_alternative
    return f"give data.folders path '{config.folders[folder_index].path}' a template (the prompt of its images)"


def template_needs_caption(template: str | None) -> bool:
    return template is None or CAPTION_PLACEHOLDER in template


def caption_lines(caption: str) -> list[str]:
    """The captions one caption text holds: each of its non-blank lines (see `training_caption`)."""
    return [line.strip() for line in split_at_line_ends(caption) if line.strip()]


def apply_template(template: str | None, caption: str) -> str:
    # str.replace rather than str.format: captions and templates may hold other braces.
    if template is None:
        return caption
    lines = caption_lines(caption)
    if len(lines) > 1:  # each line is a caption of its own, and each gets the template
        return "\n".join(template.replace(CAPTION_PLACEHOLDER, line) for line in lines)
    return template.replace(CAPTION_PLACEHOLDER, caption)


def edit_tags(caption: str, keep_tokens: int, rng: np.random.Generator, shuffle: bool = True, dropout: float = 0.0, separator: str | None = None) -> str:
    """The comma-separated tags of `caption` after those kept in place (`kept_in_place`): shuffled, then each left out
    with probability `dropout`."""
    kept, rest, end = kept_in_place(caption, keep_tokens, separator)
    if shuffle:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    if dropout > 0:
        rest = [tag for tag, draw in zip(rest, rng.random(len(rest))) if draw >= dropout]
    return ", ".join(kept + rest + end)


def kept_in_place(caption: str, keep_tokens: int, separator: str | None = None) -> tuple[list[str], list[str], list[str]]:
    """A caption's tags as (kept first, shuffled and dropped, kept last). Where it holds `separator`
    (data.keep_tokens_separator), as sd-scripts splits it: the tags before it stay first, and a second one keeps the tags
    after it last; the separators are left out. Else the first `keep_tokens` tags stay first."""
    if separator and separator in caption:
        first, _, rest = caption.partition(separator)
        middle, _, last = rest.partition(separator)
        return _tags(first), _tags(middle), _tags(last)
    tags = _tags(caption)
    return tags[:keep_tokens], tags[keep_tokens:], []


def _tags(text: str) -> list[str]:
    return [tag for tag in (part.strip() for part in text.split(",")) if tag]


def tags_move_in(captions: list[str], config: DataConfig) -> bool:
    """Whether data.shuffle_tags or tag_dropout can change any line of `captions`: tags past those kept in place
    (`kept_in_place`), two to shuffle, one to drop."""
    least, separator = 1 if config.tag_dropout else 2, config.keep_tokens_separator
    lines = [line for caption in captions for line in caption_lines(caption)]  # as training picks one (`training_caption`)
    edited = [line for line in lines if "," in line or (separator and separator in line)]  # the others train as written
    return any(len(kept_in_place(line, config.keep_tokens, separator)[1]) >= least for line in edited)


def unmoved_tags_warning(captions: list[str], config: DataConfig) -> str | None:
    """A warning where data.shuffle_tags or tag_dropout is on and changes none of `captions` (sentences, which have no
    commas, or no more tags than data.keep_tokens), or None: the switch is on and nothing is shuffled or dropped."""
    on = [f"data.{key}" for key in ("shuffle_tags", "tag_dropout") if getattr(config, key)]
    if not on or not captions or tags_move_in(captions, config):
        return None
    acts = {"data.shuffle_tags": "shuffles", "data.tag_dropout": "drops"}
    act = f"they {' and '.join(acts[key].removesuffix('s') for key in on)}" if len(on) > 1 else f"it {acts[on[0]]}"
    after = ", or".join(([f" after the first data.keep_tokens ({config.keep_tokens})"] if config.keep_tokens else [])
                        + ([" after data.keep_tokens_separator where a caption holds it"] if config.keep_tokens_separator else []))  # fmt: skip
    needed = "one" if config.tag_dropout else "two"  # a tag to drop, two to swap
    return (f"warning: {' and '.join(on)} {'change' if len(on) > 1 else 'changes'} no caption: {act} the comma-separated tags{after}, and no "
            f"caption has {needed} or more of them (a sentence without commas is left as it is): write captions as tags ('sks, dog, grass, sunny')"
            + (", or lower data.keep_tokens" if config.keep_tokens else "") + f", or set {' and '.join(on)} off")  # fmt: skip


# The keep_tokens_separator sd-scripts' documentation writes, and kohya datasets' captions hold.
SD_SCRIPTS_SEPARATOR = "|||"


def unread_separator_warning(captions: list[str], config: DataConfig) -> str | None:
    """A warning where captions hold sd-scripts' keep_tokens_separator '|||' and data.keep_tokens_separator is not set, so
    its bars train as words (a kohya dataset brought here), or None."""
    holding = next((caption for caption in captions if SD_SCRIPTS_SEPARATOR in caption), None)
    if holding is None or config.keep_tokens_separator is not None:
        return None
    return (f"warning: captions hold '{SD_SCRIPTS_SEPARATOR}' (e.g. '{holding}'), sd-scripts' keep_tokens_separator, which trains here as words: "
            f"set data.keep_tokens_separator: '{SD_SCRIPTS_SEPARATOR}' with data.shuffle_tags: true to keep the tags before it in place, "
            "or remove it from the captions")  # fmt: skip


def tag_warnings(captions: list[str], config: DataConfig) -> list[str]:
    """What a run's start and check-data say of how the captions' tags are read (`unmoved_tags_warning`, `unread_separator_warning`)."""
    return [line for line in (unmoved_tags_warning(captions, config), unread_separator_warning(captions, config)) if line]


def training_caption(caption: str, config: DataConfig, seed: int, epoch: int, index: int) -> str:
    """The caption item `index` trains with in `epoch`: one line of a caption of several (each line is a
    caption of the image, as SimpleTuner and sd-scripts' enable_wildcard read them), its tags shuffled
    (data.shuffle_tags) and dropped (data.tag_dropout) past those kept in place, the same on every process."""
    caption = caption_line(caption, seed, epoch, index)
    separator = config.keep_tokens_separator
    if not (config.shuffle_tags or config.tag_dropout) or ("," not in caption and not (separator and separator in caption)):
        return caption
    rng = np.random.default_rng([seed, epoch, index, TAG_STREAM])
    return edit_tags(caption, config.keep_tokens, rng, config.shuffle_tags, config.tag_dropout, separator)


def caption_line(caption: str, seed: int, epoch: int, index: int) -> str:
    """The caption itself, or for a caption of several lines the line item `index` trains with in `epoch`."""
    lines = caption_lines(caption)
    return lines[np.random.default_rng([seed, epoch, index, LINE_STREAM]).integers(len(lines))] if len(lines) > 1 else caption


def scored_caption(caption: str, config: DataConfig, seed: int, index: int) -> str:
    """The caption a held-out item (validation.loss_images) is scored with: as written (the line of epoch 0 of
    a caption of several), its tags neither shuffled nor dropped and never emptied by caption dropout, so the
    validation loss is the captioned loss and compares across runs whatever those settings are. A
    data.keep_tokens_separator is left out, as training leaves it out: it marks tags, it is not one."""
    line = caption_line(caption, seed, 0, index)
    separator = config.keep_tokens_separator
    if separator and separator in line:
        return ", ".join(tag for part in kept_in_place(line, 0, separator) for tag in part)
    return line
