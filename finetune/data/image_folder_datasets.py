"""A folder of images given as data.dataset, which `datasets` reads with its imagefolder builder: its data-file
matching searches the folder dozens of times at every load (2 to 3 ms per file: 5 s for 2,000 tiny images, 8 to 12 s
for 4,000, measured on 2 shared cores), where data.image_dir lists it once. Said as a warning where data.image_dir reads the same images and captions."""

from __future__ import annotations

from pathlib import Path

from finetune.captions.metadata_files import metadata_file, metadata_rows, metadata_subfolders
from finetune.config import DataConfig
from finetune.data.sources import folder_images, saved_dataset, unread_images

# Fewer images load in seconds either way.
SLOW_IMAGE_FOLDER_COUNT = 2000


def image_dir_advice(config: DataConfig) -> str | None:
    """The warning for a data.dataset folder of more than SLOW_IMAGE_FOLDER_COUNT images that data.image_dir reads
    the same: its images all beside one metadata.jsonl or metadata.csv (the captions both read by data.caption_column;
    imagefolder's metadata.parquet data.image_dir does not read), the whole default split, no other image columns
    (`*_file_name` keys, ControlNet's conditioning images) nor images in subfolders or of kinds only imagefolder reads."""
    if config.dataset is None or config.image_dir is not None:
        return None
    folder = Path(config.dataset)
    if not folder.is_dir() or saved_dataset(folder) or (folder / "metadata.parquet").exists():
        return None
    images = folder_images(folder)
    metadata = metadata_file(folder)
    if len(images) <= SLOW_IMAGE_FOLDER_COUNT or metadata is None or any((folder / name).exists() for name in ("metadata.jsonl", "metadata.csv") if name != metadata.name):
        return None
    if config.dataset_split != "train" or config.dataset_config is not None or config.image_column != "image":
        return None
    if any(unread_images(folder, config)) or metadata_subfolders(folder) or any(key != "file_name" and key.endswith("_file_name") for row in metadata_rows(folder) for key in row):
        return None
    return (f"dataset {folder} is a folder of {len(images)} images, which datasets' imagefolder searches for its files at every load "
            f"(about 2 ms an image): data.image_dir: {folder} (with data.dataset: null) reads the same images and their captions "
            f"({metadata.name}) without that cost")
