"""The base model as the files a creator shares name it, and where this machine keeps it.

What a run writes that is meant to be shared (a LoRA's header, a ControlNet's or pipeline's finetune_metadata.json, the
model cards, `export`'s and `export-checkpoint`'s headers) names a local base by its folder or file name: the path as
training was given it (/home/alice/models/sd15) carried the user's folders into every uploaded copy, and a relative one
(finetune/assets/toyworld-base) meant nothing from another folder. A hub id is kept whole, and so is the one a hub
cache's snapshot folder records in its path (models--owner--name/snapshots/REV), the same files as that id.

The run's own record of where the base is, `base_paths.json` in its output_dir (beside recipe_as_run.yaml, which stays on
the machine too), maps each name to the absolute path training read: `sample`, `eval`, `merge` and the demo find the
base of an output in its run folder (or a checkpoint's) from there, from any working folder (finetune.sampling.adapter_records).
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

from finetune.models.model_source import spelled_as_hub_id

BASE_PATHS_FILE = "base_paths.json"
SHARED_BASE_KEYS = ("finetune.base_model", "finetune.base_config")  # the records that name a base (or its configs)
# The run's record is in its output_dir: a checkpoint's ControlNet (<run>/checkpoints/checkpoint-N/controlnet) is 3 below.
RECORD_DEPTH = 3


def shared_base_name(base: str) -> str:
    """What shared files call the base given (or recorded) as `base`: a hub id whole; a local folder or file by its name,
    or the hub id its hub cache folder records; a path recorded on another machine (an older output's) so too."""
    path = Path(os.path.expanduser(base))
    if not path.exists():
        if spelled_as_hub_id(base):
            return base
        # Another machine's hub cache folder is that hub id there too: its revision's folder name means nothing.
        recorded = (PureWindowsPath if "\\" in base else PurePosixPath)(base.rstrip("/\\"))
        return hub_id_of_snapshot(recorded) or recorded.name or base
    absolute = Path(os.path.abspath(path))  # not resolved: a link named sd15 is called sd15, not what it points at
    return hub_id_of_snapshot(absolute) or hub_id_of_snapshot(absolute.resolve()) or absolute.name


def hub_id_of_snapshot(folder: PurePath) -> str | None:
    """owner/name for a folder of the hub's cache (…/models--owner--name/snapshots/REV); None for any other."""
    parts = folder.parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    repo = parts[-3].removeprefix("models--").split("--")  # the cache writes owner/name as owner--name
    return "/".join(repo) if 1 <= len(repo) <= 2 and all(repo) else None


def shared_record(metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` as a shared file carries it: its base (and configs) by name (an older output's record held the path)."""
    return {key: shared_base_name(value) if key in SHARED_BASE_KEYS and value else value for key, value in metadata.items()}


def read_base_paths(folder: Path) -> dict[str, str] | None:
    """The run's record of where its base is, {name: absolute path}; None where `folder` holds none (or one not ours)."""
    try:
        paths = json.loads((folder / BASE_PATHS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {str(name): str(path) for name, path in paths.items() if isinstance(path, str)} if isinstance(paths, dict) else None


def record_base_paths(output_dir: Path, *given: str | None) -> None:
    """Where the local ones of `given` (model.pretrained, model.single_file_config) are, in the run's record, by the names
    its outputs record them by. The names an earlier run in this output_dir recorded are kept (its checkpoints name them)."""
    from finetune.outputs.atomic_files import atomic_write_text

    earlier = read_base_paths(output_dir)
    paths = dict(earlier or {})
    for value in filter(None, given):
        path = Path(os.path.expanduser(value))
        if path.exists():
            paths[shared_base_name(value)] = os.path.abspath(path)
    if paths and paths != earlier:
        atomic_write_text(output_dir / BASE_PATHS_FILE, json.dumps(paths, indent=2) + "\n")


def local_base_path(recorded: str, adapter: str) -> str | None:
    """The absolute path the run's record gives the base its output records as `recorded`: the record in the adapter's
    folder or the nearest one above it (up to its run's). None where there is none, or it names no such base."""
    start = Path(os.path.abspath(adapter))
    for folder in [start, *start.parents][: RECORD_DEPTH + 2]:  # a file adapter's own path is no folder: one more
        paths = read_base_paths(folder)
        if paths is not None:
            return paths.get(recorded)
    return None
