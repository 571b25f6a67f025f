"""A ControlNet's pairs from data.dataset: each row's image with its conditioning image, read from the column
controlnet.conditioning_column names (a column of images, or a data file's column of paths), chosen and checked before
any image decodes. A data folder's pairs, and the check of every pair, are finetune/controlnet/pairs.py's."""

from __future__ import annotations

import functools
from pathlib import Path

from finetune.config import ControlNetConfig, DataConfig
from finetune.data.dataset_images import require_image_column, row_image
from finetune.data.dataset_source import dataset_examples, open_dataset
from finetune.data.dataset_splits import row_labels
from finetune.data.image_paths import LOOKED_UP_ROWS, cast_image_paths, data_file_image_column, is_path_data_file, path_row_image
from finetune.data.sources import IMAGE_SUFFIXES, Example, saved_dataset
from finetune.errors import FinetuneError


def dataset_pairs(config: DataConfig, conditioning_column: str) -> list[tuple[Example, Example]]:
    """Every row's image example with its conditioning image's (from controlnet.conditioning_column, `conditioning_column`)."""
    opened = dataset = open_dataset(config)  # once: its images are read from it too, after its conditioning column is checked
    column = dataset_conditioning_column(dataset, config, conditioning_column)
    # A data file's column of paths (images.csv's conditioning_image) is read as its image column is, refused as it
    # is (a caption column, files not there) before any image decodes.
    labels = row_labels(config.dataset, config.dataset_split, dataset, saved_dataset(Path(config.dataset)))
    dataset, paths = cast_image_paths(dataset, config.dataset, column, "controlnet.conditioning_column", labels)
    require_image_column(dataset, config.dataset, column, "controlnet.conditioning_column")  # other paths would fail row by row
    conditionings = dataset.select_columns([column])
    return [
        (example, Example(source := f"{example.source} column '{column}'", "",
                          functools.partial(row_image, conditionings, row, column, source, config.dataset) if paths is None
                          else functools.partial(path_row_image, conditionings, row, column, source, config.dataset, paths[row])))  # fmt: skip
        for row, example in enumerate(dataset_examples(config, opened))
    ]


# What datasets names a folder's conditioning_file_name key (it reads `X_file_name` as column X, an image of the
# folder): the layout make-conditions writes, given as data.dataset in place of data.image_dir.
FOLDER_CONDITIONING_COLUMN = "conditioning"
# A table of paths (pairs.csv) written with a folder's metadata names: its conditioning_file_name column is the
# conditioning images', as its file_name column is the images' (image_paths.data_file_image_column).
TABLE_CONDITIONING_COLUMN = "conditioning_file_name"


def dataset_conditioning_column(dataset, config: DataConfig, column: str) -> str:
    """The dataset's column of conditioning images: `column` (controlnet.conditioning_column), else, where that is
    the default one and missing, the `conditioning` image column datasets makes of a folder's conditioning_file_name,
    or a data file's conditioning_file_name column of paths.
    Missing otherwise: one line naming the columns, and the override where one other image column is there."""
    names = dataset.column_names
    image_column = data_file_image_column(dataset, config.dataset, config.image_column)  # a table's file_name stands for `image`
    others = _image_columns(dataset, config.dataset, image_column)
    if column == image_column:  # each image would steer itself: a ControlNet that learns to copy its input, unseen
        fix = (f"set it to the conditioning images' column ({', '.join(repr(name) for name in others)})" if others else
               "the dataset has no other image column: add the conditioning images to it as a column of their own, and set it to that")  # fmt: skip
        raise FinetuneError(f"dataset {config.dataset}: controlnet.conditioning_column '{column}' is data.image_column too, so each image would be "
                            f"its own conditioning image: {fix}")  # fmt: skip
    if column in names:
        return column
    images = [name for name in names if type(dataset.features[name]).__name__ == "Image" and name != config.image_column]
    if column == ControlNetConfig().conditioning_column and FOLDER_CONDITIONING_COLUMN in images:
        return FOLDER_CONDITIONING_COLUMN
    if column == ControlNetConfig().conditioning_column and TABLE_CONDITIONING_COLUMN in names and is_path_data_file(config.dataset):
        return TABLE_CONDITIONING_COLUMN
    hint = f": set controlnet.conditioning_column={others[0]}" if len(others) == 1 else ""
    raise FinetuneError(f"dataset {config.dataset} has no conditioning column '{column}' (controlnet.conditioning_column); "
                        f"its columns are: {', '.join(repr(c) for c in names)}{hint}")  # fmt: skip


def _image_columns(dataset, name: str, image_column: str) -> list[str]:
    """The columns but `image_column` that may be the conditioning images': of decoded images, or in a table of paths
    (image_paths.py) of text whose first value names an image file."""
    texts = [column for column, feature in dataset.features.items() if getattr(feature, "dtype", None) in ("string", "large_string")]
    first = {column: next((value for value in dataset[column][:LOOKED_UP_ROWS] if value), "") for column in texts} if is_path_data_file(name) else {}
    return [column for column, feature in dataset.features.items()
            if column != image_column and (type(feature).__name__ == "Image" or Path(first.get(column, "")).suffix.lower() in IMAGE_SUFFIXES)]  # fmt: skip

