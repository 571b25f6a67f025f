"""Caption files that train nothing, which the data check says: those a folder's metadata rows override (the row
trains, the file is not read) where the two differ, those that name no file of their folder, and a folder's captions that one
prompt for every image leaves unread."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.captions.captions import SIDECAR_SUFFIXES, caption_file_names, other_entry_stems, sidecar_path, template_needs_caption
from finetune.captions.cells import MAX_CAPTION_LENGTH
from finetune.captions.file_names import loose_name_key, name_key
from finetune.captions.metadata_files import folder_captions, metadata_file, metadata_rows
from finetune.captions.text_encodings import caption_file_encoding
from finetune.config import DataConfig, FolderConfig
from finetune.data.sources import folder_images


def shadowed_caption_files(folder: Path, config: DataConfig) -> str | None:
    """A warning for caption files beside images whose metadata row gives another caption, or None: the row
    trains and the file is not read (a tagger's .txt files written into a folder that has a metadata.jsonl)."""
    if not _reads_captions(folder, config):
        return None
    # Caption files' names, any case, from the listing sidecar_path reads too: a folder captioned by its metadata file alone has
    # none, and its metadata file was parsed again and its 20,000 images each looked for one (two suffixes, exact and loose names).
    caption_files = caption_file_names(folder)
    if not caption_files:
        return None
    rows, shadowed = folder_captions(folder, config.caption_column), []
    for image in folder_images(folder) if rows else []:
        if not any(loose_name_key(image.stem + suffix) in caption_files for suffix in SIDECAR_SUFFIXES):
            continue
        if name_key(image.name) in rows and (sidecar := sidecar_path(image)) is not None:
            shadowed += [sidecar] if _file_text(sidecar) != rows[name_key(image.name)].strip() else []
    if not shadowed:
        return None
    return (f"data folder {folder}: {len(shadowed)} caption file{'s' if len(shadowed) > 1 else ''} ({', '.join(p.name for p in shadowed[:3])}"
            f"{', ...' if len(shadowed) > 3 else ''}) differ{'s' if len(shadowed) == 1 else ''} from {metadata_file(folder).name}, whose rows caption "
            "those images and train: the files are not read; remove the metadata file to train them, or the files to keep the rows")  # fmt: skip


def imageless_caption_files(folder: Path, config: DataConfig) -> str | None:
    """A warning for caption files named after no file of their folder (0002.txt, its image removed, or renamed
    002.jpg), or None: they train nothing, and nothing else would say so. A caption file beside a file of another
    kind (anim.txt beside anim.gif) is not one: the check says that image is not read."""
    if not _reads_captions(folder, config) or not (caption_files := caption_file_names(folder)):
        return None
    stems = other_entry_stems(folder)
    alone = sorted(name for name in caption_files.values() if not name.startswith(".") and loose_name_key(Path(name).stem) not in stems)
    if not alone:
        return None
    one = len(alone) == 1
    return (f"data folder {folder}: {len(alone)} caption file{'' if one else 's'} ({', '.join(alone[:3])}{', ...' if len(alone) > 3 else ''}) "
            f"name{'s' if one else ''} no image in it and train{'s' if one else ''} nothing: rename {'it' if one else 'each'} as its image "
            f"(0001.jpg's caption is 0001.txt), or remove {'it' if one else 'them'}")  # fmt: skip


def unread_captions_line(folder: Path, config: DataConfig) -> str | None:
    """'captions: ...' where one prompt for every image (a DreamBooth concept's instance_prompt, data.caption) leaves the
    folder's caption files and metadata file unread, or None. Not a warning, as that is often meant; but a DreamBooth folder
    captioned for sd-scripts, which reads captions there, trained on its instance prompt alone without a word."""
    if not config.caption:  # "": uncaptioned on purpose (a VAE's images); None: the captions are read
        return None
    stems = other_entry_stems(folder)
    files = [name for name in caption_file_names(folder).values() if not name.startswith(".") and loose_name_key(Path(name).stem) in stems]
    unread = ([f"{len(files)} caption file{'' if len(files) == 1 else 's'} ({', '.join(sorted(files)[:2])}{', ...' if len(files) > 2 else ''})"] if files else [])
    # A metadata file's rows with a caption column (a ControlNet's is read all the same, for its conditioning images).
    if (metadata := metadata_file(folder)) is not None and any(config.caption_column in row for row in metadata_rows(folder)):
        unread.append(f"{metadata.name}'s {config.caption_column!r} column")
    if not unread:
        return None
    concept = config.dreambooth_concept
    key, remedy = (f"{concept}.instance_prompt", f"{concept}.use_captions: true") if concept else ("data.caption", "data.caption: null")
    return f"captions: not read from {' and '.join(unread)} in {folder}: every image trains as {config.caption!r} ({key}); {remedy} trains with them"


def _reads_captions(folder: Path, config: DataConfig) -> bool:
    """Whether training reads the captions of `folder` (no data.caption, and a template with {caption} there)."""
    entries = config.folders or [FolderConfig(path=".")]
    return config.caption is None and any(template_needs_caption(entry.template) and os.path.samefile(Path(config.image_dir) / entry.path, folder)
                                          for entry in entries)  # fmt: skip


def _file_text(sidecar: Path) -> str | None:
    """A caption file's text as `sidecar_caption` reads it, or None where it is no text in its encoding (nor, then, the
    row's caption). Not `sidecar_caption` itself: its error counts every other undecodable caption file of the folder, so
    a folder of Windows-1252 files beside a metadata.jsonl was read once per file (1500 files: over two minutes)."""
    if sidecar.stat().st_size > MAX_CAPTION_LENGTH:  # no caption (`caption_file_bytes`): not read whole to be compared
        return None
    raw = sidecar.read_bytes()
    try:
        return raw.decode(caption_file_encoding(raw)).strip()
    except UnicodeDecodeError:
        return None
