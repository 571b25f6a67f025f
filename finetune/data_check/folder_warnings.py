"""The data check's warnings about a dataset's folders rather than its images (finetune/data_check/check.py): caption files that
name no image or are shadowed, images of kinds training does not read, subfolders of images that are not read, folders
no data.folders entry lists, a DreamBooth class folder inside an instance folder, and an sd-scripts `N_name` folder given
whole, whose N is read as no repeats. Nothing a user put there is left out unseen."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from finetune.captions.overrides import imageless_caption_files, shadowed_caption_files
from finetune.config import DataConfig
from finetune.counts import counted
from finetune.data.folder_repeats import YEARS, name_repeats
from finetune.data.sources import convert_unread, data_folders, folder_images, subfolder_names, unlisted_image_folders, unread_images
from finetune.data_check.class_folders_inside import class_folder_inside_message, class_folders_inside, outside_class_folders


def folder_warnings(config: DataConfig) -> list[tuple[Path, str]]:
    """(folder, message) of each warning about the folders `config` reads."""
    said = []
    for folder in data_folders(config):
        for message in (shadowed_caption_files(folder, config), imageless_caption_files(folder, config)):
            said += [(folder, message)] if message else []
        files, subfolders = unread_images(folder, config)
        if files:
            said.append((folder, f"data folder {folder} has {counted(len(files), 'image')} training does not read {convert_unread(files)}"))
        class_folders = class_folders_inside(folder, config)  # said as what they are: no concept of their own
        said += [(folder, class_folder_inside_message(folder, config, key, path)) for key, path in class_folders]
        if subfolders := outside_class_folders(subfolders, class_folders):
            remedy = "add each as a concept of its own" if config.dreambooth_concept else "list each in data.folders (with its repeats)"
            said.append((folder, f"data folder {folder} has subfolders with images ({subfolder_names(folder, subfolders)}), which are not read: {remedy} to train it"))
    for folder in unlisted_image_folders(config):
        path = folder_entry_path(folder, Path(config.image_dir))
        count, entry = len(folder_images(folder)), "{path: .}" if path == "." else f"{{path: {json.dumps(path, ensure_ascii=False)}}}"
        said.append((folder, f"data folder {folder} holds {counted(count, 'image')} that no data.folders entry lists: {'it does' if count == 1 else 'they do'} "
                             f"not train (add {entry} with its repeats to data.folders to train {'it' if count == 1 else 'them'})"))  # fmt: skip
    if message := repeats_in_name_warning(config):
        said.append((Path(config.image_dir), message))
    return said


def repeats_in_name_warning(config: DataConfig) -> str | None:
    """sd-scripts trains a folder named `10_name` 10 times an epoch; given whole as data.image_dir (or a concept's
    instance_dir), it trained once an epoch here, unsaid: an sd-scripts user's epochs (train.max_epochs,
    checkpoint.every_n_epochs) came out 10 times shorter. Not for a year (`2024_trip`), nor where repeats are set."""
    key = config._image_dir_key
    if not config.image_dir or config.folders or config._repeats != 1 or not (key in ("data.image_dir", "--image-dir") or key.endswith(".instance_dir")):
        return None
    repeats = name_repeats(os.path.basename(os.path.abspath(config.image_dir)))
    if repeats is None or repeats <= 1 or repeats in YEARS:
        return None
    setting = f"{key.removesuffix('.instance_dir')}.repeats={repeats}" if key.endswith(".instance_dir") else f"data.folders: [{{path: ., repeats: {repeats}}}]"
    return (f"data folder {config.image_dir} is named as sd-scripts' N_name folders are, which sd-scripts trains {repeats} times an epoch; "
            f"{key} trains each of its images once an epoch: for sd-scripts' epochs set {setting} (or leave it, where {repeats} is part of its name)")


def folder_entry_path(folder: Path, root: Path) -> str:
    """`folder` as a data.folders path: from image_dir `root` ("." for itself, "subject/closeups"), else absolute."""
    inside = os.path.relpath(os.path.abspath(folder), os.path.abspath(root))
    return os.path.abspath(folder) if inside == ".." or inside.startswith(".." + os.sep) else PurePosixPath(Path(inside)).as_posix()
