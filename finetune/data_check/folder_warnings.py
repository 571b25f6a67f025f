"""The data check's warnings about a dataset's folders rather than its images (finetune/data_check/check.py): caption files that
name no image or are shadowed, images of kinds training does not read, subfolders of images that are not read, folders
no data.folders entry lists, and a DreamBooth class folder inside an instance folder. Nothing a user put there is left
out unseen."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from finetune.captions.overrides import imageless_caption_files, shadowed_caption_files
from finetune.config import DataConfig
from finetune.counts import counted
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
    return said


def folder_entry_path(folder: Path, root: Path) -> str:
    """`folder` as a data.folders path: from image_dir `root` ("." for itself, "subject/closeups"), else absolute."""
    inside = os.path.relpath(os.path.abspath(folder), os.path.abspath(root))
    return os.path.abspath(folder) if inside == ".." or inside.startswith(".." + os.sep) else PurePosixPath(Path(inside)).as_posix()
