"""File names as metadata rows and caption files find their images: by the exact name, else by one that
differs only in letter case or Unicode form, as a case-insensitive file system (macOS, Windows) finds it; and the
folder listings those lookups keep until a folder changes."""

from __future__ import annotations

import functools
import os
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from time import time_ns
from typing import TypeVar

from finetune.errors import FinetuneError

# A folder's listing is kept until the folder changes, as its mtime says; but the mtime moves once per tick of the file
# system's clock (2 s on FAT, 1 s on ext3, HFS+ and many network shares, a timer's few ms on ext4), so a file added or
# renamed in the tick the folder was listed in leaves it as it was. As git does with a "racily clean" index entry, a
# listing read within this long of the folder's last change is not kept: the folder is listed again at each use until it
# has been still for a tick (about this long of listings per change at most), and after that any change moves its mtime
# (unless the file system's clock runs more than a tick behind this machine's, as a network share's may).
FOLDER_TIME_TICK_NS = 2 * 10**9
# Folders whose listings each lookup keeps (a data folder, its masks folder, a ControlNet's conditioning folder, ...).
LISTINGS_KEPT = 64

Listing = TypeVar("Listing")


def folder_listing(read: Callable[[str], Listing]) -> Callable[[str], Listing]:
    """`read` (a folder's listing, by the folder's path) kept per folder until the folder changes: its inode, size and
    mtime are the key (on tmpfs, btrfs and XFS a folder's size moves with its entries too), and a listing read within
    FOLDER_TIME_TICK_NS of the folder's mtime is not kept. Thread-safe (the data check lists from several threads)."""
    kept: OrderedDict[str, tuple[tuple[int, int, int], Listing]] = OrderedDict()
    lock = threading.Lock()

    @functools.wraps(read)
    def listing(folder: str) -> Listing:
        listed_at = time_ns()  # before the stat and the listing: a change after either is later than this
        stat = os.stat(folder)
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with lock:
            if (hit := kept.get(folder)) is not None and hit[0] == key:
                kept.move_to_end(folder)
                return hit[1]
        names = read(folder)
        if stat.st_mtime_ns < listed_at - FOLDER_TIME_TICK_NS:
            with lock:
                kept[folder] = (key, names)
                kept.move_to_end(folder)
                while len(kept) > LISTINGS_KEPT:
                    kept.popitem(last=False)
        return names

    return listing


def name_key(name: str) -> str:
    """A file name as metadata rows are matched to it: in Unicode's composed form (NFC), as most tools write
    text, where macOS names files decomposed (NFD): `café.png` is then one name in both."""
    return unicodedata.normalize("NFC", name)


def metadata_key(file_name: str, folder: Path) -> str:
    """A metadata row's file_name as `folder`'s images are matched to it: its path relative to the folder,
    with `/` (`./a.png` and `a.png` are one; `sub/a.png` names an image in a subfolder, not `a.png`). A
    path through the folder itself (`photos/a.png` in photos/, or an absolute one) names its image."""
    key = PurePosixPath(str(file_name).strip().replace("\\", "/"))
    if key.is_absolute() and Path(key).parent.resolve() == folder.resolve():
        return name_key(key.name)
    if len(key.parts) > 1 and key.parts[-2] == folder.resolve().name and not (folder / key.parent).is_dir():
        return name_key(key.name)
    return name_key(key.as_posix().removeprefix("./"))


def row_image_key(file_name: str, folder: Path, where: str = "") -> str:
    """`metadata_key`, and for a file directly in `folder` the name of the file it names: its exact name, else
    the one file whose name differs only in letter case or Unicode form (`Cat.PNG` for `cat.png`), as a
    case-insensitive file system (macOS, Windows) opens it for `datasets`' imagefolder and as caption files
    are found: a metadata file means the same images on every system. A name that two files fit (`cat.png`
    and `CAT.png` on Linux, neither exactly) stops with `where` (the metadata file and row); a name no file
    fits is kept, for the check of rows without images to name."""
    key = metadata_key(file_name, folder)
    if "/" in key or not folder.is_dir():
        return key
    exact, loose = _names_by_loose_key(str(folder))
    if key in exact:
        return key
    fits = loose.get(loose_name_key(key), ())
    if len(fits) > 1:
        raise FinetuneError(f"{where or folder}: file_name '{key}' fits {len(fits)} files that differ only in letter case ({', '.join(fits)}) "
                            "and names none of them exactly: write the image's exact name")  # fmt: skip
    return fits[0] if fits else key


@folder_listing
def _names_by_loose_key(folder: str) -> tuple[frozenset[str], dict[str, tuple[str, ...]]]:
    """A folder's file names (`name_key`; not hidden ones), and those names by `loose_name_key` (several on a
    case-sensitive file system)."""
    names = sorted(name_key(name) for name in os.listdir(folder) if not name.startswith("."))
    loose: dict[str, tuple[str, ...]] = {}
    for name in names:
        loose[loose_name_key(name)] = (*loose.get(loose_name_key(name), ()), name)
    return frozenset(names), loose


def loose_name_key(name: str) -> str:
    """A file name as a caption file is found by it where its exact name is not there: composed, any case."""
    return name_key(name).casefold()


def loosely_named_file(path: Path) -> Path:
    """`path`, or where no file has that exact name, the one beside it whose name differs only in letter case or
    Unicode form (a metadata file written on macOS or Windows names `conditioning/0001.PNG` for `0001.png`), as
    caption files are found; `path` itself where neither is there, for the error that says so."""
    if path.is_file() or not path.parent.is_dir():
        return path
    names = file_names_by_loose_key(str(path.parent))
    return path.parent / names.get(loose_name_key(path.name), path.name)


@folder_listing
def file_names_by_loose_key(folder: str) -> dict[str, str]:
    """A folder's file names by their `loose_name_key`. Not `_names_by_loose_key`'s listing: that one holds the names as rows are
    matched (`name_key`, composed), this one each file's own name, the one that opens it (Linux opens a
    decomposed `café.png` only by its own bytes)."""
    return {loose_name_key(name): name for name in os.listdir(folder)}
