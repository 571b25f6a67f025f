"""A local data file's column of image file names (a spreadsheet saved as .csv, or a .jsonl or .parquet file, with
`file_name,text` or `image,caption` columns) read as its images: each path from the data file's folder (an absolute
one as it is), the column cast to datasets' Image() feature. Before any image is decoded the column is checked to
hold image paths, so that a caption column given as data.image_column is one line, not every caption opened as a file."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.data.images import unreadable_message
from finetune.data.sources import IMAGE_SUFFIXES, UNREAD_IMAGE_SUFFIXES
from finetune.errors import FinetuneError

# The data files whose text columns a creator writes by hand or from a spreadsheet (not datasets' own .arrow, nor a
# webdataset shard, whose images are in it).
PATH_DATA_FILES = (".csv", ".json", ".jsonl", ".parquet")
# imagefolder's name for a metadata file's column of images: read as data.image_column's default, `image`, where the
# data file has no column so named, as imagefolder reads it.
FILE_NAME_COLUMN = "file_name"
# The first rows' paths looked up before any image decodes: a column of paths read from the wrong folder is one line,
# not one per row. The rest are looked up by the data check, each missing one named with its row.
LOOKED_UP_ROWS = 5


def is_path_data_file(name: str) -> bool:
    """Whether data.dataset is a local data file whose text columns may name image files."""
    return Path(name).is_file() and Path(name).suffix.lower() in PATH_DATA_FILES


def data_file_image_column(loaded, name: str, column: str) -> str:
    """The column holding a data file's images: `column`, or its `file_name` column where `column` is the default `image` and it has none."""
    if column == "image" and column not in loaded.column_names and FILE_NAME_COLUMN in loaded.column_names and is_path_data_file(name):
        return FILE_NAME_COLUMN
    return column


def resolved_path(data_file: str, written: str) -> str:
    """Where an image path of a data file's row is read: from the data file's folder, so that training finds it wherever it
    starts. A path written on Windows (`photos\\0001.jpg`) is read with its backslashes as folders where no file has that name."""
    path = os.path.join(os.path.abspath(os.path.dirname(data_file)), written)  # an absolute `written` stays as it is
    if os.sep == "/" and "\\" in written and not os.path.lexists(path):
        return resolved_path(data_file, written.replace("\\", "/"))
    return path


def cast_image_paths(loaded, name: str, column: str, key: str, labels: list[str]):
    """(`loaded` with its column of image paths cast to datasets' Image(), each path made absolute from the data file's
    folder; the paths as written, per row), or (`loaded`, None) where `column` holds no text of a local data file.
    `labels`: each row as messages name it (its number in its split, dataset_splits.row_labels)."""
    import datasets

    if not is_path_data_file(name) or getattr(loaded.features[column], "dtype", None) not in ("string", "large_string"):
        return loaded, None
    written = loaded[column][:]  # [:]: the whole column as a list (a lazy Column reads row by row)
    require_image_paths(written, name, column, key, labels)
    absolute = [None if path is None else resolved_path(name, path) for path in written]
    cast = loaded.remove_columns([column]).add_column(column, absolute).cast_column(column, datasets.Image())
    return cast.select_columns(loaded.column_names), written  # the columns in their order


def require_image_paths(paths: list[str | None], name: str, column: str, key: str, labels: list[str]) -> None:
    """Stop, before any image decodes, if the first rows' values are no image file names (a caption column picked as
    the images') or none of their files is there (paths written from another folder)."""
    first = [(labels[row], path) for row, path in enumerate(paths) if path][:LOOKED_UP_ROWS]
    suffixes = IMAGE_SUFFIXES + UNREAD_IMAGE_SUFFIXES  # an unread kind is said by the data check, with its row
    for row, path in first:
        if "://" in path:
            raise FinetuneError(f"dataset {name} column '{column}' ({key}) holds web addresses (row {row}: {path[:200]}), not image files: "
                                f"download the images and list their files' paths in {name}")  # fmt: skip
        if Path(path).suffix.lower() not in suffixes:
            shown = path if len(path) <= 80 else path[:80] + "..."
            raise FinetuneError(f"dataset {name} column '{column}' ({key}) holds text, not image file names (row {row}: {shown!r}): "
                                f"set {key} to the column of image paths ({', '.join(IMAGE_SUFFIXES)} files, read from the data file's folder)")  # fmt: skip
    if first and not any(os.path.isfile(resolved_path(name, path)) for _, path in first):
        row, path = first[0]
        more = "" if len(first) == 1 else "; nor is the next one" if len(first) == 2 else f"; nor are the next {len(first) - 1}"
        raise FinetuneError(f"dataset {name} column '{column}' ({key}) names image files that are not there (row {row}: {path}, looked for at "
                            f"{resolved_path(name, path)}{more}): its paths are read from the data file's folder, {Path(name).absolute().parent}; "
                            "fix them, or move the data file to the folder they start from")  # fmt: skip


def path_row_image(images, row: int, column: str, source: str, data_file: str, written: str | None):
    """The decoded image of a data file's row whose cell names a file (`written`, as the row has it): a file that is not
    there, or that does not decode, is said naming the row and the path, as a folder's image is said by its file."""
    from finetune.data.dataset_images import row_image

    if not written:  # a null or empty cell: the data check names the row
        return None
    path = resolved_path(data_file, written)
    if not os.path.isfile(path):
        where = "not found" if os.path.isabs(written) else f"looked for at {path}, from the data file's folder"
        raise FinetuneError(f"image {source} is the file {written}, which is not there ({where}): put it there, or fix its path in {data_file}")
    if (suffix := Path(written).suffix.lower()) in UNREAD_IMAGE_SUFFIXES:  # as a folder's are not read: an animation, a print or phone format
        raise FinetuneError(f"image {source} is the file {written}, of a kind training does not read ({suffix}): convert it to PNG or JPEG")
    try:
        return row_image(images, row, column, source, data_file)
    except Exception as err:  # Pillow raises many types for a damaged file; read as a folder's is, by its bytes
        raise FinetuneError(unreadable_message(path, err, named=f"{source} ({written})")) from None
