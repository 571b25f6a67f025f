"""The data check's record of what it read from each file, kept between runs: a resume, a second run or `finetune train`
after `finetune check-data` takes an unchanged file's results from it instead of decoding the file again (35-43 s for 120
phone photos on 2 cores, minutes for a thousand).

What the check reads from an image file depends on the file's bytes and this code alone (`ImageFacts`: its upright size,
its pixels' digest that keys the latent cache, Pillow's warnings, its conversions; a mask file's `MaskFacts`; a ControlNet's
conditioning image's `ConditioningFacts`; a DreamBooth run's class images are images like any other); what depends on the
recipe (its captions, too small for data.resolution, buckets, crops, copies) is worked out again from them at every
check. Each file's entry holds its stamp (size, mtime, ctime, inode: `finetune.data.images.file_stamp`): one whose stamp
is not the file's now is checked afresh, as is every file where the record is of another CHECK_VERSION, other code
(FACTS_CODE), or another Pillow (whose decoders make the pixels), unreadable, or not one at all. A file the check refuses
is not kept: it is read again at the next check, as the user fixes it. Deleting the record is safe: the next check
decodes every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import PIL
from PIL import Image

from finetune.distributed.process_env import main_process

RECORD_NAME = ".data_check.json"
# Bump whenever the check changes what it reads from a file: the digests, a conversion's or a Pillow warning's words, the
# facts kept. A record of another version is ignored (every file decoded again), never read as this version's.
CHECK_VERSION = 1
# The code that reads the facts: a record made by other code there (another finetune, an edit) is not taken either, so a
# change that forgot CHECK_VERSION re-decodes once rather than serving another code's lines or digests. controlnet/pairs.py
# reads the conditioning images (`read_conditioning`).
FACTS_CODE = ("data/*.py", "data_check/*.py", "controlnet/pairs.py")


def facts_code_files() -> list[Path]:
    """The source files of the modules that read what the record keeps (FACTS_CODE)."""
    package = Path(__file__).resolve().parents[1]
    return sorted(path for pattern in FACTS_CODE for path in package.glob(pattern))


def facts_code_digest() -> str:
    """A digest of `facts_code_files`."""
    digest = hashlib.blake2b(digest_size=16)
    for path in facts_code_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageFacts:
    """What the check reads from an image file that decodes (finetune/data_check/check.py `inspect`)."""

    size: tuple[int, int]  # upright (width, height)
    digest: str  # `pixel_digest` of its upright RGB pixels
    heard: tuple[str, ...]  # Pillow's warnings as it was read
    conversions: tuple[str, ...]  # `conversions(raw)`: what reading it as training does to it
    conversions_as_mask: tuple[str, ...]  # the same where its transparency is its loss mask (data.loss_mask.source alpha)
    turned: bool  # its EXIF orientation swaps width and height
    alpha_read: bool  # `alpha` was read (data.loss_mask.source alpha asks for it; other checks leave it out)
    alpha: tuple[float, str] | None = None  # its transparency's (area, digest); None: no alpha channel, or opaque everywhere


@dataclass(frozen=True)
class MaskFacts:
    """What the check reads from a loss mask file (data.loss_mask.source files)."""

    size: tuple[int, int]
    area: float  # `mask_area`
    digest: str  # `mask_digest`


@dataclass(frozen=True)
class ConditioningFacts:
    """What the check reads from a ControlNet's conditioning image that it can steer with (finetune/controlnet/pairs.py
    `check_conditioning`). Not `ImageFacts`: its pixels are read without colour management (they are data: depth, edges,
    labels), so its digest is not an image's of the same file, and no conversion of it is said."""

    size: tuple[int, int]  # upright (width, height)
    digest: str  # `pixel_digest` of its upright RGB pixels, not colour managed
    heard: tuple[str, ...]  # Pillow's warnings as it was read


Facts = ImageFacts | MaskFacts | ConditioningFacts


class CheckRecord:
    """The record at `path`: read at once, written by `save` (main process only)."""

    def __init__(self, path: Path, make_folder: bool = False):
        self.path, self.make_folder = path, make_folder
        self._old = _read_entries(path)
        self._new: dict[str, dict] = {}
        self._made: set[tuple[str, type]] = set()  # (file, kind) this check decoded (its facts in _new are of this check, not an earlier one)
        self._lock = threading.Lock()  # the check's threads take and keep entries at once
        self.taken: Counter[type] = Counter()  # by kind: the files whose facts came from the record, not decoded

    def facts(self, source: str, stamp: tuple[int, ...] | None, kind: type[Facts], with_alpha: bool = False) -> Facts | None:
        """The facts kept of the file `source` as of `stamp`, or None: not kept, kept at another stamp, not readable, or
        (`with_alpha`) kept without its transparency. Kept by this check too: DreamBooth concepts that share a folder read it once."""
        if stamp is None:  # a dataset row: no file to stamp
            return None
        path = os.path.abspath(source)
        with self._lock:
            kept = self._kept_at(path, stamp).get(kind.__name__)
        if not isinstance(kept, dict):
            return None
        try:
            facts = kind(**{name: tuple(value) if isinstance(value, list) else value for name, value in kept.items()})
        except TypeError:  # a field missing, or one of another check: checked afresh
            return None
        if not _well_formed(facts) or (with_alpha and not facts.alpha_read):
            return None
        with self._lock:
            self._new[path] = {**self._kept_at(path, stamp), kind.__name__: kept, "stamp": list(stamp)}
            self.taken[kind] += (path, kind) not in self._made  # said as unchanged since the last check
        return facts

    def keep(self, source: str, stamp: tuple[int, ...] | None, facts: Facts) -> None:
        """Keep `facts` of the file `source` as of `stamp`, beside what is kept of it as another kind at that stamp (a file
        read as two kinds, an image and a conditioning image, keeps both)."""
        if stamp is not None:
            path = os.path.abspath(source)
            with self._lock:
                self._new[path] = {**self._kept_at(path, stamp), type(facts).__name__: asdict(facts), "stamp": list(stamp)}
                self._made.add((path, type(facts)))

    def _kept_at(self, path: str, stamp: tuple[int, ...]) -> dict:
        """The kinds of facts kept of `path` as of `stamp`, by kind name: this check's over the earlier record's (lock held)."""
        entries = [entry for entry in (self._old.get(path), self._new.get(path)) if isinstance(entry, dict) and entry.get("stamp") == list(stamp)]
        return {name: value for entry in entries for name, value in entry.items() if name != "stamp"}

    def save(self) -> None:
        """Write the record where it may be: the entries this check took or made, and the earlier record's of files still
        there (another data folder's, in a shared train.cache_dir). Where it cannot be written, the next check decodes afresh."""
        if not main_process() or not self._new or not (self.make_folder or self.path.parent.is_dir()):
            return
        from finetune.outputs.atomic_files import atomic_write_text

        kept = {path: entry for path, entry in self._old.items() if path not in self._new and os.path.exists(path)}
        record = {"finetune_data_check": CHECK_VERSION, "code": facts_code_digest(), "pillow": PIL.__version__, "warnings": pillow_warning_actions(), "files": {**kept, **self._new}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(record, separators=(",", ":")))
        except OSError:  # a read-only or full disk: the run goes on, its next check decodes every file again
            pass


def _well_formed(facts: Facts) -> bool:
    """Whether kept facts hold values of their fields' types (a record edited by hand, or written by a broken disk, is not)."""
    strings = lambda values: isinstance(values, tuple) and all(isinstance(value, str) for value in values)  # noqa: E731
    sized = isinstance(facts.size, tuple) and len(facts.size) == 2 and all(isinstance(side, int) and side > 0 for side in facts.size)
    if isinstance(facts, MaskFacts):
        return sized and isinstance(facts.area, (int, float)) and isinstance(facts.digest, str)
    if isinstance(facts, ConditioningFacts):
        return sized and isinstance(facts.digest, str) and strings(facts.heard)
    alpha = facts.alpha is None or (isinstance(facts.alpha, tuple) and len(facts.alpha) == 2 and isinstance(facts.alpha[0], (int, float))
                                    and isinstance(facts.alpha[1], str))  # fmt: skip
    return (sized and isinstance(facts.digest, str) and strings(facts.heard) and strings(facts.conversions) and strings(facts.conversions_as_mask)
            and isinstance(facts.turned, bool) and isinstance(facts.alpha_read, bool) and alpha)  # fmt: skip


def _read_entries(path: Path) -> dict:
    """The record's entries by absolute path; none where it is missing, corrupt, of another check version or Pillow."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("finetune_data_check") != CHECK_VERSION or record.get("pillow") != PIL.__version__:
        return {}
    if record.get("code") != facts_code_digest():  # made by other code than this: its lines and digests may differ
        return {}
    if record.get("warnings") != pillow_warning_actions():  # kept under other warning filters: other warnings, or other images refused
        return {}
    files = record.get("files")
    return files if isinstance(files, dict) else {}


def pillow_warning_actions() -> list[str]:
    """What the warning filters do with Pillow's warnings, as the check hears them (finetune/data/image_warnings.py): raised
    (`python -W error`: the image is refused), ignored (`-W ignore`: nothing said), or said. A record made under other
    filters kept other warnings than this check would hear, so it is not taken (a filter on one message is not seen)."""
    from finetune.data.image_warnings import PILLOW_FOLDER, _others_action

    actions = [_others_action("", category, PILLOW_FOLDER + "Image.py", 0) for category in (UserWarning, Image.DecompressionBombWarning)]
    return [action if action in ("error", "ignore") else "said" for action in actions]


def recipe_record(recipe, make_folder: bool) -> CheckRecord:
    """The record of the recipe's run: beside its latent cache (train.cache_dir), else in its output_dir. `make_folder`:
    whether `save` makes that folder where it is not there (`finetune train`, which makes both; `finetune check-data` makes none)."""
    folder = Path(recipe.train.cache_dir).expanduser() if recipe.train.cache_dir else Path(recipe.output_dir).expanduser()
    return CheckRecord(folder / RECORD_NAME, make_folder)
