"""A `datasets` dataset as training's images (data.dataset): a hub name, a local folder or data file, or a save_to_disk
folder, opened with its split and config, its image and caption columns checked, its rows read into `Example`s (the
pixels are decoded when used). Folders of images are finetune/data/sources.py's; the rows a split names, dataset_splits.py's;
a data file's column of image paths (a spreadsheet's images.csv), image_paths.py's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from pathlib import Path

from finetune.captions.captions import DATASET_ROW
from finetune.captions.cells import dataset_caption
from finetune.captions.metadata_lines import csv_delimiter
from finetune.config import DataConfig
from finetune.data.dataset_images import require_image_column, row_image
from finetune.data.image_paths import cast_image_paths, data_file_image_column, path_row_image
from finetune.data.dataset_splits import no_rows_message, require_split_syntax, row_labels, saved_split_rows
from finetune.data.folder_repeats import implausible_repeats_notes
from finetune.data.sources import Example, folder_images, folders_entries, image_subfolders, saved_dataset
from finetune.errors import FinetuneError
from finetune.library_noise import quiet_data_file_read_errors, quiet_local_dataset_bars
from finetune.models.model_source import TRUE_VALUES, hub_offline_by

# A data file given as data.dataset, by the `datasets` builder that reads it: load_dataset(path) itself reads
# folders only ("Couldn't find any data file" for a file that is there).
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json", ".tar": "webdataset"}
# Builders load_dataset(name) takes as a name, which read the data files of the current folder without data_files.
FORMAT_BUILDERS = {*DATA_FILE_BUILDERS.values(), "imagefolder", "webdataset", "text"}


def open_dataset(config: DataConfig):
    """The `datasets.Dataset` of `config.dataset` (hub name, local folder or data file, or save_to_disk folder), split chosen."""
    import datasets

    name = config.dataset
    saved = saved_dataset(Path(name))
    folder = Path(name).is_dir() and not saved
    builder = DATA_FILE_BUILDERS.get(Path(name).suffix.lower()) if Path(name).is_file() else None
    if Path(name).is_file() and builder is None and Path(name).suffix != ".py":  # (a loading script: said below)
        raise FinetuneError(f"dataset {name} is a file of no kind datasets reads as data: give a {', '.join(DATA_FILE_BUILDERS)} file, "
                            "a folder of them or of images with a metadata.jsonl, or a save_to_disk folder")  # fmt: skip
    if name in FORMAT_BUILDERS and not Path(name).exists():
        raise FinetuneError(f"data.dataset '{name}' is a kind of data file, not a dataset: give the path of the file or folder "
                            "(e.g. data.dataset=my_data/train.parquet, or data.dataset=my_data)")  # fmt: skip
    if config.dataset_config is not None and (saved or builder):  # not silently ignored: a config there is none of
        kind = "a save_to_disk folder" if saved else "a data file"
        raise FinetuneError(f"dataset {name} is {kind}, which has no configs (no '{config.dataset_config}' to pick): remove data.dataset_config")
    if folder and folder_images(Path(name)):
        metadata = any((Path(name) / meta).is_file() for meta in ("metadata.jsonl", "metadata.csv"))
        if not metadata or any(Path(name).glob("*.txt")):  # datasets would read the .txt captions as a text dataset of their lines
            raise FinetuneError(f"dataset {name} is a folder of images with " + ("a metadata file and .txt captions" if metadata else "no metadata file")
                                + f": train it as data.image_dir={name} (with data.dataset=null)")  # fmt: skip
    subfolders = image_subfolders(Path(name), config) if folder and not folder_images(Path(name)) else []
    if any(any(subfolder.glob("*.txt")) for subfolder in subfolders):  # sd-scripts' N_name folders: read as text too
        raise FinetuneError(f"dataset {name} is a folder of image folders with .txt captions, which datasets reads as a text dataset of their lines: "
                            f"train it as data.image_dir={name} (with data.dataset=null), with {folders_entries([path.name for path in subfolders])} in the recipe's data section"
                            + "".join(f"; {note}" for note in implausible_repeats_notes([(path.name, len(folder_images(path))) for path in subfolders])))  # fmt: skip
    require_split_syntax(name, config.dataset_split)
    try:
        with quiet_local_dataset_bars() if Path(name).exists() else contextlib.nullcontext():  # a hub dataset's downloads keep theirs
            if saved:
                return saved_split_rows(name, config.dataset_split)
            elif builder:
                with quiet_data_file_read_errors(builder):  # its own line of a bad row, twice: the one below says it
                    loaded = datasets.load_dataset(builder, data_files=name, split=config.dataset_split, **_csv_separator(name, builder))
            else:
                loaded = datasets.load_dataset(name, config.dataset_config, split=config.dataset_split)
    except FinetuneError:
        raise
    except FileNotFoundError as err:
        raise FinetuneError(f"dataset {name} not found: {str(err).splitlines()[0]}") from None
    except ConnectionError:
        # Said whole: a mistyped local path (my_data/trian) is looked up on the hub too. Offline by choice (the Makefile's
        # HF_HUB_OFFLINE=1, exported), no network would help: say which, by the variable that made it so.
        why, fix = ((f"downloads are off ({offline})", f"download it once with network (run without {offline})") if (offline := datasets_offline_by()) else
                    ("the hub cannot be reached", "download it where the hub can be reached"))  # fmt: skip
        raise FinetuneError(f"dataset {name} is no folder or file here ({Path(name).absolute()} not found), and as a hub dataset it is not in "
                            f"the local cache and {why}: check the path, or {fix}") from None  # fmt: skip
    except Exception as err:  # datasets' builders raise many kinds (pyarrow's ArrowInvalid, a ValueError, on a malformed metadata row)
        if isinstance(err, ValueError) and "Unknown split" in str(err):
            # As a save_to_disk folder's is said: "(has train)", not datasets' 'Unknown split "test". Should be one of ['train'].'
            splits = re.search(r"Should be one of \[(.*)\]", str(err))
            has = "has " + ", ".join(split.strip(" '\"") for split in splits.group(1).split(",")) if splits else str(err).splitlines()[0]
            raise FinetuneError(f"dataset {name} has no split '{config.dataset_split}' ({has}): set data.dataset_split") from None
        if isinstance(err, ValueError) and "corresponds to no data" in str(err):  # an empty data file, or a slice of none of its rows
            raise FinetuneError(no_rows_message(name, config.dataset_split)) from None
        if isinstance(err, ValueError) and (configs := re.search(r"Config name is missing.*available configs: \[(.*?)\]", str(err), re.S)):
            raise FinetuneError(f"dataset {name} has several configs ({configs.group(1)}): pick one with data.dataset_config") from None
        if isinstance(err, ValueError) and "BuilderConfig" in str(err):  # a hub dataset's or a folder's, as for a split
            raise FinetuneError(f"dataset {name} has no config '{config.dataset_config}' ({str(err).splitlines()[0]}): set data.dataset_config") from None
        if not Path(name).exists():  # a hub dataset: a failure this does not know keeps its traceback
            raise
        raise FinetuneError(_unreadable_dataset_message(name, saved, err)) from None
    return loaded  # a Dataset: load_dataset with a split names one


def _csv_separator(name: str, builder: str) -> dict[str, str]:
    """The `sep` of a .csv data file whose header is separated by semicolons (Excel's CSV where a comma is the decimal
    mark: German, French, ...) or tabs, as a folder's metadata.csv is read; datasets reads commas alone (its pandas
    failed on such a file's first caption with a comma)."""
    if builder != "csv":
        return {}
    with open(name, encoding="utf-8-sig", errors="replace") as file:
        header = file.readline()
    return {} if (separator := csv_delimiter(header)) == "," else {"sep": separator}


def datasets_offline_by() -> str | None:
    """The variable that keeps `datasets` off the hub, as `NAME=value`, or None where it goes there. As datasets decides (its
    config.py): HF_DATASETS_OFFLINE where it is set, whatever else is (=0 goes online under HF_HUB_OFFLINE=1), else
    huggingface_hub's offline mode: HF_HUB_OFFLINE where it is not empty, else TRANSFORMERS_OFFLINE."""
    if (value := os.environ.get("HF_DATASETS_OFFLINE")) is not None:
        return f"HF_DATASETS_OFFLINE={value}" if value.upper() in TRUE_VALUES else None
    return hub_offline_by()


def _unreadable_dataset_message(name: str, saved: bool, err: Exception) -> str:
    """A local dataset that `datasets` fails to read: a save_to_disk folder cut short, a damaged data file, a
    malformed metadata row."""
    cause = err.__cause__ or err
    reason = f"{type(cause).__name__}: {str(cause).splitlines()[0][:200]}"
    if "scripts are no longer supported" in str(cause):  # datasets 4 and later
        return (f"dataset {name} cannot be read ({reason}): the installed datasets runs no loading scripts; write the dataset "
                "out with save_to_disk or to_parquet where a datasets older than 4 runs its script, and train that")  # fmt: skip
    if saved:
        return f"dataset {name} (a save_to_disk folder) cannot be read ({reason}): save it again (a copy cut short?)"
    if Path(name).is_file():
        return f"dataset file {name} cannot be read ({reason}): fix or replace it"
    if any((Path(name) / meta).is_file() for meta in ("metadata.jsonl", "metadata.csv")):
        return (f"dataset folder {name} cannot be read ({reason}): fix its metadata.jsonl/metadata.csv "
                "(each row one JSON object with file_name and text strings)")  # fmt: skip
    return f"dataset folder {name} cannot be read ({reason}): fix or replace its damaged data file"


def dataset_examples(config: DataConfig, opened=None) -> list[Example]:
    """Every row of `config.dataset` once, as an Example (checked: its columns, rows, and captions of text), from
    `opened` where the caller has opened it (a ControlNet's pairs read their conditioning column from it first)."""
    name = config.dataset
    loaded = open_dataset(config) if opened is None else opened
    image_column = data_file_image_column(loaded, name, config.image_column)
    _require_column(loaded, name, image_column, "data.image_column")
    labels = row_labels(name, config.dataset_split, loaded, saved_dataset(Path(name)))
    # Before the caption column is looked for: its hint offers the columns of text, which a data file's paths are not.
    loaded, paths = cast_image_paths(loaded, name, image_column, "data.image_column", labels)
    if config.caption is None:
        _require_column(loaded, name, config.caption_column, "data.caption_column")
    columns = loaded.column_names
    if len(loaded) == 0:
        raise FinetuneError(no_rows_message(name, config.dataset_split))
    require_image_column(loaded, name, image_column, "data.image_column")
    if config.caption is None and (classes := getattr(loaded.features[config.caption_column], "names", None)):  # a ClassLabel: numbers
        raise FinetuneError(_class_numbers_message(name, config.caption_column, classes))
    if config.caption is None and type(feature := loaded.features[config.caption_column]).__name__ in ("Image", "Audio", "Video"):  # not decoded, row by row, to fail at the first
        texts = [repr(c) for c in columns if getattr(loaded.features[c], "dtype", None) in ("string", "large_string")]
        raise FinetuneError(f"dataset {name} caption column '{config.caption_column}' (data.caption_column) holds {type(feature).__name__.lower()}s, not text: "
                            f"set data.caption_column to the captions' column ({', '.join(texts) or 'it has no column of text: set data.caption for one prompt'})")  # fmt: skip
    # [:]: the whole column as a list (datasets 4+ gives a lazy Column, whose rows read one by one took 1 ms each)
    captions = [config.caption] * len(loaded) if config.caption is not None else loaded[config.caption_column][:]
    images = loaded.select_columns([image_column])
    return [
        Example(source := DATASET_ROW.format(name=name, row=labels[row]), dataset_caption(captions[row], name, config.caption_column, labels[row]),
                functools.partial(row_image, images, row, image_column, source, name) if paths is None
                else functools.partial(path_row_image, images, row, image_column, source, name, paths[row]))  # fmt: skip
        for row in range(len(loaded))
    ]


def _require_column(loaded, name: str, column: str, key: str) -> None:
    if column not in (columns := loaded.column_names):
        raise FinetuneError(f"dataset {name} has no column '{column}' ({key}); its columns are: {', '.join(repr(c) for c in columns)}" + _column_hint(loaded, key))


def _column_hint(loaded, key: str) -> str:
    """What to set for a missing column: the one column of its kind where there is one (of images for
    data.image_column, of text for data.caption_column); for captions also data.caption, one prompt for every image."""
    features = loaded.features
    if key == "data.image_column":
        images = [c for c in loaded.column_names if type(features[c]).__name__ == "Image"]
        return f": set data.image_column={images[0]}" if len(images) == 1 else ""
    texts = [c for c in loaded.column_names if getattr(features[c], "dtype", None) in ("string", "large_string")]
    if not texts:
        return ": it has no column of text; set data.caption for one prompt for every image"
    column = f"data.caption_column={texts[0]}" if len(texts) == 1 else "data.caption_column to the captions' column"
    return f": set {column}, or data.caption for one prompt for every image"


def _class_numbers_message(name: str, column: str, classes: list[str]) -> str:
    """A ClassLabel caption column (datasets reads a folder of class folders so): how to prompt each class."""
    named = ", ".join(classes[:5]) + (" ..." if len(classes) > 5 else "")
    if not Path(name).is_dir():
        return f"dataset {name} caption column '{column}' holds class numbers ({named}), not text: write a caption column from the class names (with dataset.map)"
    return (f"dataset {name} caption column '{column}' holds class numbers ({named}), not text: train the folder as data.image_dir={name} "
            f"(with data.dataset=null) with a data.folders entry per class folder and its prompt, e.g. "
            f"folders: [{{path: {classes[0]}, template: \"a photo of {classes[0]}\"}}, ...]")  # fmt: skip

