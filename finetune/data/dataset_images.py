"""The images of a `datasets` dataset's column: which columns hold them (decoded images, not paths or bytes),
and each row's, read where `datasets` alone cannot (a path relative to the dataset's folder) or said in one line."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from finetune.errors import FinetuneError


def row_image(images, row: int, column: str, source: str, dataset: str) -> Image.Image | None:
    """The decoded image of a dataset row's cell. One that is a web address, not stored in the dataset, is
    downloaded by `datasets` at every read: when that fails (offline) it is said, not just the error. One stored
    as a file path (a parquet file written with pyarrow, a dataset cast from paths and not saved) `datasets` opens
    from the current folder: a relative path is read from the dataset's own folder where it is not there, so the
    run does not depend on where it starts; a file in neither is said with both."""
    try:
        return images[row][column]
    except Exception as err:
        import datasets

        path = images.cast_column(column, datasets.Image(decode=False))[row][column]["path"] or ""
        if "://" in path:
            raise FinetuneError(f"image {source} is the web address {path}, which cannot be read ({type(err).__name__}: {str(err)[:200]}): "
                                "datasets downloads it at every read; store the images in the dataset where they can be downloaded, "
                                "or check the connection") from None  # fmt: skip
        if not path or not isinstance(err, FileNotFoundError):
            raise
        # A hub id (owner/name) has no folder here: its first part was taken for one, and named as the dataset's folder.
        folder = Path(dataset) if Path(dataset).is_dir() else Path(dataset).parent if Path(dataset).is_file() else None
        if not os.path.isabs(path) and folder is not None and (folder / path).is_file():
            return Image.open(folder / path)
        looked = ("not found" if os.path.isabs(path) else f"looked for from the current folder and from the dataset's, {folder}" if folder is not None
                  else f"looked for from the current folder, {os.getcwd()}; the hub dataset {dataset} has no folder here to read it from")  # fmt: skip
        raise FinetuneError(f"image {source} is the file {path}, which is not there ({looked}): put it there, or fix its path in the dataset") from None


def require_image_column(loaded, name: str, column: str, key: str) -> None:
    """Stop if a dataset column holds something other than decoded images (file paths, undecoded bytes)."""
    feature = loaded.features[column]
    if type(feature).__name__ != "Image" or not getattr(feature, "decode", True):
        metadata = next((Path(name) / meta for meta in ("metadata.jsonl", "metadata.csv") if (Path(name) / meta).is_file()), None)
        if type(getattr(feature, "feature", None)).__name__ == "Image":  # a list of images per row: casting it to one image fails
            fix = f"give each row one image (e.g. the first, with dataset.map: {{'{column}': row['{column}'][0]}}) and save it with save_to_disk"
        elif metadata is not None and getattr(feature, "dtype", None) in ("string", "large_string"):  # a folder's file names: no Python needed
            # (a metadata.csv's text is a large_string: it was told to cast the column in Python)
            word = "column" if metadata.suffix == ".csv" else "key"
            fix = f"name its {word} '{column}_file_name' in {metadata} (datasets reads {word}s ending in _file_name as images of the folder)"
        else:
            # save_to_disk stores the files' bytes in the dataset (a csv or jsonl written again would hold the paths again).
            fix = f"cast it with dataset.cast_column('{column}', datasets.Image()), save it with save_to_disk (which stores the images in it) and train that folder"
        raise FinetuneError(f"dataset {name} column '{column}' ({key}) holds {feature}, not decoded images: {fix}, or set {key}")
