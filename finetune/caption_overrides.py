"""Caption files that a folder's metadata rows override: the row trains, the file is not read, which the data
check says where the two differ."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.caption_cells import MAX_CAPTION_LENGTH
from finetune.captions import SIDECAR_SUFFIXES, caption_file_names, folder_captions, metadata_file, sidecar_path, template_needs_caption
from finetune.config import DataConfig, FolderConfig
from finetune.file_names import loose_name_key, name_key
from finetune.sources import folder_images
from finetune.text_encodings import caption_file_encoding


def shadowed_caption_files(folder: Path, config: DataConfig) -> str | None:
    """A warning for caption files beside images whose metadata row gives another caption, or None: the row
    trains and the file is not read (a tagger's .txt files written into a folder that has a metadata.jsonl)."""
    entries = config.folders or [FolderConfig(path=".")]
    if config.caption is not None or not any(template_needs_caption(entry.template) and os.path.samefile(Path(config.image_dir) / entry.path, folder)
                                             for entry in entries):  # fmt: skip
        return None  # its captions are not read at all
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
