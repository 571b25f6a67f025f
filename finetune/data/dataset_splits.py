"""The rows of a `datasets` dataset that data.dataset_split names: a split (`train`), a slice of one
(`train[:10%]`, `train[100:]`) or a sum of them (`train+test`), as `load_dataset` reads that syntax; for a
save_to_disk folder too, which `load_from_disk` reads whole. A split or slice of no rows is said so, not
as a damaged dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.errors import FinetuneError


def require_split_syntax(name: str, spec: str) -> None:
    """Stop on a data.dataset_split that is no split name or slice (`train[:x]`), before any reading: `datasets`
    fails on it as on a damaged file."""
    from datasets.arrow_reader import ReadInstruction

    try:
        ReadInstruction.from_spec(spec)
    except (ValueError, AssertionError) as err:
        raise FinetuneError(f"dataset {name}: data.dataset_split '{spec}' is no split or slice ({err}): give a split's name, "
                            "or a slice of it such as train[:10%] or train[100:200]") from None  # fmt: skip


def no_rows_message(name: str, spec: str) -> str:
    if "[" in spec:
        return f"dataset {name} split '{spec}' has no rows: the slice selects none of them; widen data.dataset_split"
    return f"dataset {name} split '{spec}' has no rows: add rows to it, or give another split (data.dataset_split) or dataset (data.dataset)"


def saved_split_rows(name: str, spec: str):
    """The rows of save_to_disk folder `name` (a Dataset, its split `train`, or a DatasetDict) that `spec`
    names. A split of no rows, which save_to_disk writes without a data file and `load_from_disk` cannot
    read (an IndexError), has none; only the splits `spec` names are read."""
    import datasets
    from datasets.arrow_reader import ReadInstruction

    folders = saved_split_folders(Path(name))
    loaded, lengths = _saved_splits(name, spec)
    try:
        pieces = ReadInstruction.from_spec(spec).to_absolute(lengths)
    except ValueError:  # a split it does not have
        if not (Path(name) / "dataset_dict.json").is_file():
            raise FinetuneError(f"dataset {name} is a single split saved with save_to_disk (no split '{spec}' to pick): "
                                "remove data.dataset_split, or give a slice of it as train[...]") from None  # fmt: skip
        raise FinetuneError(f"dataset {name} has no split '{spec}' (has {', '.join(folders)}): set data.dataset_split") from None
    pieces = [piece for piece in pieces if piece.to > piece.from_]
    if not pieces:
        raise FinetuneError(no_rows_message(name, spec))
    rows = [loaded[piece.splitname] if (piece.from_, piece.to) == (0, lengths[piece.splitname])
            else loaded[piece.splitname].select(range(piece.from_, piece.to)) for piece in pieces]  # fmt: skip
    return rows[0] if len(rows) == 1 else datasets.concatenate_datasets(rows)


def split_names(spec: str) -> set[str]:
    """The splits a split spec reads: train and test of "train[:10%]+test"."""
    return {re.split(r"[\[(]", part, maxsplit=1)[0].strip() for part in re.split(r"\s*\+\s*", spec)}


def saved_split_folders(folder: Path) -> dict[str, Path]:
    """{split: its folder} of a save_to_disk folder: a DatasetDict's splits, or a Dataset's as `train`."""
    parts = folder / "dataset_dict.json"
    names = json.loads(parts.read_text(encoding="utf-8"))["splits"] if parts.is_file() else None
    return {split: folder / split for split in names} if names is not None else {"train": folder}


def _saved_splits(name: str, spec: str) -> tuple[dict, dict[str, int]]:
    """The splits of save_to_disk folder `name` that `spec` reads ({split: rows, None for one of no rows}), and their lengths."""
    splits = {split: _load_saved_split(path) for split, path in saved_split_folders(Path(name)).items() if split in split_names(spec)}
    return splits, {split: 0 if rows is None else len(rows) for split, rows in splits.items()}


def _load_saved_split(folder: Path):
    """One saved split, memory-mapped; None for one of no rows (save_to_disk wrote it without a data file)."""
    import datasets

    state = folder / "state.json"
    if state.is_file() and not json.loads(state.read_text(encoding="utf-8")).get("_data_files", True):
        return None
    return datasets.load_from_disk(str(folder))


def row_labels(name: str, spec: str, loaded, saved: bool) -> list[str]:
    """What each row of `loaded` (the rows `spec` names, of save_to_disk folder `name` if `saved`) is called in
    messages: its number in its split, and the split where that is not `train` ("12 of split 'test'"), so that a
    row of `train[100:]` is said as the one a user finds at 100 and up. Numbered from 0 where the lengths are not known."""
    from datasets.arrow_reader import ReadInstruction

    numbered = [str(row) for row in range(len(loaded))]
    if spec == "train":
        return numbered
    if saved:
        lengths = _saved_splits(name, spec)[1]
    else:  # those load_dataset read
        lengths = {split: info.num_examples for split, info in (loaded.info.splits or {}).items()}
    try:
        pieces = ReadInstruction.from_spec(spec).to_absolute(lengths)
    except ValueError:  # a split's length not known
        return numbered
    labels = [f"{row}" + (f" of split '{piece.splitname}'" if piece.splitname != "train" else "") for piece in pieces for row in range(piece.from_, piece.to)]
    return labels if len(labels) == len(loaded) else numbered
