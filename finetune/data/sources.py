"""Where training images come from: a folder of images with captions (data.image_dir, data.folders) or a
`datasets` dataset (data.dataset), read into `Example`s: each image's source, caption and loader.

Reading lists images and captions without decoding any; finetune/data_check/check.py then decodes and checks
every one, and finetune/data/items.py makes training items of them.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable, NoReturn

from PIL import Image

from finetune.data.buckets import Size
from finetune.captions.captions import (apply_template, dataset_of_row, image_caption, require_own_sidecars,
                               require_rows_with_images, sidecar_path, template_needs_caption)  # fmt: skip
from finetune.captions.file_names import name_key
from finetune.captions.metadata_files import folder_captions, metadata_partner_files, metadata_subfolders
from finetune.config import DataConfig, FolderConfig
from finetune.data.folder_repeats import KOHYA_FOLDER, implausible_repeats_notes, name_repeats
from finetune.data_check.class_folders_inside import class_folder_inside_message, class_folders_inside, outside_class_folders
from finetune.errors import FinetuneError, looked_for_here

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp")
# Images that are in a folder but not read: animations, print and phone formats (convert them to PNG or JPEG).
UNREAD_IMAGE_SUFFIXES = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".psd")
ARCHIVE_SUFFIXES = (".zip", ".7z", ".rar", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")


@dataclass(frozen=True)
class Example:
    """One training image: where to find it (a file or a dataset row) and its caption."""

    source: str  # a file path, or "dataset row N"
    caption: str | None  # None: no caption was found (the check reports it)
    load: Callable[[], Image.Image]
    repeats: int = 1  # uses per epoch (data.folders); epoch_uses.expand_repeats lists the example this many times
    folder_index: int = 0  # which entry of data.folders it comes from
    size: Size | None = None  # upright (width, height), known once the check has decoded the image
    digest: str | None = None  # a hash of the decoded pixels, from the check: names its cached latents
    file_stamp: tuple[int, ...] | None = None  # the file's stat (images.file_stamp) when the check decoded it; None for dataset rows
    load_mask: Callable[[], Image.Image] | None = None  # its upright greyscale loss mask, from the check (data.loss_mask)
    mask_area: float | None = None  # the share of the image its loss mask trains
    mask_digest: str | None = None  # a hash of the mask's pixels, from the check: names its cached views
    mask_file_stamp: tuple | None = None  # a mask file's (path, *images.file_stamp) when the check read it (source files)


def source_folder(example: Example) -> Path:
    """The folder an example's image is in, or its dataset's path or name: how sd-scripts groups a LoRA's tags. Not
    the folder a link leads to: a data folder of links into a photo library is recorded under its own name."""
    dataset = dataset_of_row(example.source)
    return Path(dataset) if dataset is not None else Path(os.path.abspath(example.source)).parent


def read_examples(config: DataConfig) -> list[Example]:
    """Every image of the folders or the dataset once, unchecked (some may lack a caption)."""
    if config.image_dir:
        return _folder_examples(config)
    from finetune.data.dataset_source import dataset_examples  # it builds on this module's Example

    return dataset_examples(config)


# ---------------------------------------------------------------------------------------------------
# Sources


def check_folders_exist(config: DataConfig) -> None:
    """The data folder and each of its data.folders entries is a folder (before anything is read from them)."""
    root = Path(config.image_dir)
    if root.is_file():  # a dataset downloaded as an archive, not yet unpacked
        unpack = "an archive: unpack it and give the folder it holds" if root.name.lower().endswith(ARCHIVE_SUFFIXES) else "a file: give the folder that holds the images"
        raise FinetuneError(f"{config._image_dir_key} {root} is {unpack}")
    # A data.folders path is data.image_dir's subfolder, not the current folder's (an absolute path stays absolute).
    entries = [(root / entry.path, f"data.folders path '{entry.path}'", "" if Path(entry.path).is_absolute() else f" (read from data.image_dir, {root})")
               for entry in config.folders]  # fmt: skip
    for folder, key, where in [(root, config._image_dir_key, looked_for_here(root))] + entries:
        if not folder.is_dir():
            raise FinetuneError(f"data folder {folder} not found: check {key}{where}")
        if not os.access(folder, os.R_OK | os.X_OK):  # a volume another user owns (a container's): a traceback at its listing
            raise FinetuneError(f"data folder {folder} cannot be read (its permissions): make it readable to this user (chmod), or check {key}")


def _folder_examples(config: DataConfig) -> list[Example]:
    check_folders_exist(config)
    root = Path(config.image_dir)
    examples = []
    for index, settings in enumerate(config.folders or [FolderConfig(path=".", repeats=config._repeats)]):
        folder = root / settings.path
        images = folder_images(folder)
        if not images:
            refuse_a_folder_without_images(folder, config, settings)
        examples += [replace(example, folder_index=index) for example in _images_of_folder(folder, images, settings, config)]
    return examples


def refuse_a_folder_without_images(folder: Path, config: DataConfig, settings: FolderConfig) -> NoReturn:
    """A data folder holding no images training reads: what it holds instead (subfolders of images, photos of a kind
    not read, a metadata file naming images elsewhere, a saved dataset), and what to do."""
    key = config._image_dir_key if not config.folders else f"data.folders path '{settings.path}'"
    class_folders = class_folders_inside(folder, config)  # not to be named as the subject's folder
    if subfolders := outside_class_folders(image_subfolders(folder, config, SAID_SUBFOLDER_DEPTH), class_folders):
        raise FinetuneError(subfolders_message(folder, subfolders, config, settings.path if config.folders else None))
    if class_folders:
        raise FinetuneError(f"data folder {folder} has no images of the subject (put them directly in it); " + class_folder_inside_message(folder, config, *class_folders[0]))
    if unread := unread_images(folder, config)[0]:  # an iPhone's .HEIC photos: not "no images"
        raise FinetuneError(f"data folder {folder} has no images training reads, only {len(unread)} it does not {convert_unread(unread)}")
    if nested := nested_metadata_images(folder, config):
        raise FinetuneError(f"data folder {folder} has no images of its own: its metadata file names them in a subfolder ({nested[0]}), "
                            "and training reads the images beside the metadata file: move them there and drop the subfolder from their file_name")  # fmt: skip
    if saved := saved_or_data_files(folder):
        remedy = (f"DreamBooth reads image files: write its images to a folder and give that as {key}" if key.startswith("dreambooth.")
                  else f"train it as data.dataset={folder} (with data.image_dir=null)")  # fmt: skip
        raise FinetuneError(f"data folder {folder} holds a datasets dataset ({saved}), not image files: {remedy}")
    raise FinetuneError(f"data folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}): add some or fix {key}")


def folder_images(folder: Path) -> list[Path]:
    """The images training reads in `folder` (not its subfolders), by name. Hidden files are left out: macOS
    writes a `._name.jpg` of metadata beside each image it copies to a foreign drive. A broken link is listed,
    for the check to name it (is_file is false for it)."""
    return sorted(folder / entry.name for entry in _entries(folder)
                  if (entry.is_file() or entry.is_symlink()) and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and not entry.name.startswith("."))  # fmt: skip


def _entries(folder: Path) -> list[os.DirEntry]:
    """`folder`'s entries with the types its listing gives (no stat per file, but for links): a folder of 20,000 images and
    their captions was stat'ed file by file in each of the several listings a run makes."""
    with os.scandir(folder) as entries:
        return list(entries)


def nested_metadata_images(folder: Path, config: DataConfig) -> list[str]:
    """The file_names of `folder`'s metadata file that are images in a subfolder (diffusers' `images/0001.png`
    layout beside `conditioning_images/`): that subfolder is not read as images of its own, as it is named there."""
    return [name for name in folder_captions(folder, config.caption_column) if "/" in name and (folder / name).is_file()]


def data_folders(config: DataConfig) -> list[Path]:
    """The folders a folder dataset reads its images from, each once; none for a `datasets` dataset."""
    if not config.image_dir:
        return []
    folders: dict[Path, Path] = {}
    for settings in config.folders or [FolderConfig(path=".")]:
        folder = Path(config.image_dir) / settings.path
        if folder.is_dir():
            folders.setdefault(folder.resolve(), folder)
    return list(folders.values())


def image_subfolders(folder: Path, config: DataConfig, depth: int = 1, holding: Callable[[Path], list] = folder_images) -> list[Path]:
    """Subfolders of `folder` that hold images (`holding` lists them: `unread_image_files` for those of unread kinds), not its
    masks or conditioning images (nor a subfolder its metadata file points into: ControlNet's `conditioning_images/`),
    `depth` levels down (not into links below the first). A link to the folder or one above it is none: its images are here."""
    own = (config.loss_mask.folder, "conditioning", *metadata_subfolders(folder))
    found, above = [], {folder.resolve(), *folder.resolve().parents}
    for sub in sorted(folder / e.name for e in _entries(folder) if e.is_dir() and not e.name.startswith(".") and e.name not in own and (folder / e.name).resolve() not in above):
        try:
            found += ([sub] if holding(sub) else []) + (image_subfolders(sub, config, depth - 1, holding) if depth > 1 and not sub.is_symlink() else [])
        except PermissionError:  # a drive's root-only lost+found: none of the user's images are there
            continue
    return found


# How far down the check looks for images that are not read: a phone's export by year and month is two down.
SAID_SUBFOLDER_DEPTH = 3


def subfolder_names(folder: Path, subfolders: list[Path]) -> str:
    """The first five of `subfolders` as messages name them, relative to `folder` ("2023/jan" for one two down), and how
    many more."""
    names = [path.relative_to(folder).as_posix() for path in subfolders]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def subfolders_message(folder: Path, subfolders: list[Path], config: DataConfig, entry: str | None = None) -> str:
    """For a folder of image folders only, as sd-scripts' train_data_dir holds them (`10_sks dog`: 10 repeats);
    `entry` is the data.folders path that names it, if one does."""
    paths, names = [path.relative_to(folder).as_posix() for path in subfolders], subfolder_names(folder, subfolders)
    root = None if config.caption is not None else Path(config.image_dir)  # where uncaptioned folders get a template (not with data.caption)
    notes = "".join(f"; {note}" for note in implausible_repeats_notes([(path, len(folder_images(sub))) for path, sub in zip(paths, subfolders)]))
    if config._image_dir_key.startswith("dreambooth"):
        return (f"data folder {folder} has no images of its own, only subfolders with images ({names}): a concept trains one folder, "
                f"e.g. {concept_overrides(config._image_dir_key, folder / paths[0])}" + ("; each other subfolder its own concept" if paths[1:] else "") + notes)
    if entry is not None:  # only the images directly in a data.folders entry are read
        return (f"data folder {folder} has no images of its own, only subfolders with images ({names}): list each as its own data.folders "
                f"entry in place of path '{entry}', e.g. {folders_entries([(PurePosixPath(entry) / path).as_posix() for path in paths], root)}{notes}")  # fmt: skip
    return (f"data folder {folder} has no images of its own, only subfolders with images ({names}): list each with its repeats "
            f"in the recipe's data section, e.g. {folders_entries(paths, root)}{notes}")  # fmt: skip


def concept_overrides(instance_dir_key: str, subfolder: Path) -> str:
    """The overrides pointing a DreamBooth concept (`dreambooth.concepts.N.instance_dir`) at `subfolder`, quoted for a
    shell, with the repeats of an sd-scripts `10_sks dog` folder's name."""
    kohya = name_repeats(subfolder.name)
    repeats = f" {instance_dir_key.removesuffix('instance_dir')}repeats={kohya}" if kohya is not None else ""
    return shlex.quote(f"{instance_dir_key}={subfolder}") + repeats


def folders_entries(names: list[str], root: Path | None = None) -> str:
    """`folders: [...]` training the subfolders `names` (paths from image_dir), as the recipe's YAML (a flow
    list): also right for `check-data --image-dir`, which takes no overrides. With `root` (image_dir), an
    `N_name` folder with no caption at all gets `name` as its prompt, as sd-scripts prompts such images
    with the folder's class tokens."""
    entries = []
    for name in names:
        kohya = KOHYA_FOLDER.match(PurePosixPath(name).name)  # sd-scripts' N_name folders: N is the repeats
        entry = f"path: {json.dumps(name, ensure_ascii=False)}, repeats: {name_repeats(name) if kohya else 1}"
        if kohya and kohya.group(2).strip() and root is not None and uncaptioned_folder(root / name):
            entry += f", template: {json.dumps(kohya.group(2).strip(), ensure_ascii=False)}"
        entries.append(f"{{{entry}}}")
    return f"folders: [{', '.join(entries)}]"


def uncaptioned_folder(folder: Path) -> bool:
    """Whether no image of `folder` has a caption: no metadata file, no caption file beside any image."""
    metadata = any((folder / name).is_file() for name in ("metadata.jsonl", "metadata.csv"))
    return not metadata and all(sidecar_path(image) is None for image in folder_images(folder))


def unlisted_image_folders(config: DataConfig) -> list[Path]:
    """With data.folders: image_dir itself, its subfolders and those of each listed folder that hold images and
    that no entry lists (an sd-scripts user listing one of two `N_name` folders would not train the other,
    nor would `subject/closeups` train beside the listed `subject`, unseen)."""
    if not config.folders or not config.image_dir:
        return []
    root = Path(config.image_dir)
    listed = data_folders(config)
    candidates = ([root] if folder_images(root) else []) + image_subfolders(root, config, SAID_SUBFOLDER_DEPTH)
    candidates += [sub for folder in listed for sub in image_subfolders(folder, config, SAID_SUBFOLDER_DEPTH)]
    # One folder however its name is written (case or Unicode form, on file systems that ignore them), and once where
    # nested entries (a, a/b) both reach it: by device and inode, as os.path.samefile compares them, without comparing
    # every pair (a thousand day folders took seconds).
    found: dict[tuple[int, int], Path] = {}
    for folder in candidates:
        found.setdefault(_identity(folder), folder)
    listed_ids = {_identity(folder) for folder in listed}
    return [folder for key, folder in found.items() if key not in listed_ids]


def _identity(path: Path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def unread_images(folder: Path, config: DataConfig) -> tuple[list[Path], list[Path]]:
    """(unread_image_files, subfolders holding images) in `folder`: said, so that no image a user put there is left out
    unseen. Subfolders count for data.image_dir alone (without data.folders); its masks and conditioning folders are no such subfolder."""
    return unread_image_files(folder), [] if config.folders else image_subfolders(folder, config, SAID_SUBFOLDER_DEPTH)


def unread_image_files(folder: Path) -> list[Path]:
    """The image files in `folder` of kinds training does not read (a data folder's, a DreamBooth class folder's)."""
    files = sorted(folder / e.name for e in _entries(folder) if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in UNREAD_IMAGE_SUFFIXES)
    partners = metadata_partner_files(folder) if files else ()  # not ControlNet's 16-bit depth TIFFs: its metadata names them
    return [p for p in files if name_key(p.name) not in partners]


def convert_unread(files: list[Path]) -> str:
    """What each message says of `unread_image_files`: "(.gif, .heic, e.g. a.gif): convert them to PNG or JPEG"."""
    kinds = ", ".join(sorted({path.suffix.lower() for path in files}))
    return f"({kinds}, e.g. {files[0].name}): convert {'it' if len(files) == 1 else 'them'} to PNG or JPEG"


def _images_of_folder(folder: Path, images: list[Path], settings: FolderConfig, config: DataConfig) -> list[Example]:
    fixed_caption = config.caption
    reads_captions = fixed_caption is None and template_needs_caption(settings.template)
    metadata = folder_captions(folder, config.caption_column) if reads_captions else {}
    if reads_captions:
        require_rows_with_images(images, metadata)
        require_own_sidecars(images, metadata)
    examples = []
    for path in images:
        if not template_needs_caption(settings.template):
            caption = settings.template
        else:
            own = fixed_caption if fixed_caption is not None else image_caption(path, metadata)
            caption = None if own is None else apply_template(settings.template, own)
        examples.append(Example(str(path), caption, functools.partial(Image.open, path), repeats=settings.repeats))
    return examples


def saved_dataset(folder: Path) -> bool:
    """Whether save_to_disk wrote `folder`: a Dataset (dataset_info.json, state.json) or a DatasetDict (dataset_dict.json)."""
    return folder.is_dir() and any((folder / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json"))


def saved_or_data_files(folder: Path) -> str | None:
    """What a folder of no images holds if it is a `datasets` dataset: "a save_to_disk folder", "data files", or None."""
    if saved_dataset(folder):
        return "a save_to_disk folder"
    # Shards in it or one folder down (a hub repository's data/); not .json or .csv, which other folders hold too.
    return "data files" if any(path.suffix.lower() in (".parquet", ".arrow") for path in [*folder.glob("*"), *folder.glob("*/*")]) else None
