"""What a LoRA's or ControlNet's training run recorded (its base model, steps, the configs of a single-file base), read
from the LoRA file's header and the ControlNet's finetune_metadata.json without torch: `sample`, `eval` and `merge`
without --base find the recorded base, and say one that is not there, before torch and diffusers load (10 s of CPU);
`check-data` says a lora.init_from that is no LoRA from its path and header alike."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME, METADATA_FILE, record_text, resolve_lora_file
from finetune.controlnet.folder import resolve_controlnet_folder
from finetune.errors import FinetuneError, looked_for_here
from finetune.formats.kohya_metadata import finetune_metadata_from_kohya
from finetune.formats.lora_kinds import lora_layout
from finetune.models.model_source import looks_like_hub_id, spelled_as_hub_id
from finetune.outputs.base_names import BASE_PATHS_FILE, local_base_path, shared_base_name


def lora_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """A LoRA file's tensor names and metadata, from its header alone (safe_open's "np": "pt" imports torch); one line
    for a file that is no readable safetensors file, as loading it says."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise FinetuneError(f"LoRA {path} is not a readable safetensors file ({str(err).splitlines()[0][:120]}): a truncated download? get it again") from None


def lora_record(lora: str) -> dict[str, str]:
    """What LoRA `lora` (a file or a run's folder) records, as `finetune.formats.kohya.load_lora` reads it: sd-scripts' ss_ keys
    as ours. A file of a kind not loaded here (LyCORIS, SDXL, no LoRA at all) is one line, from its names."""
    path = resolve_lora_file(lora)
    keys, metadata = lora_header(path)
    return finetune_metadata_from_kohya(metadata) if lora_layout(path, keys) == "kohya" else metadata


def initial_lora_file(source: str) -> Path:
    """lora.init_from's LoRA file, checked from its path and header alone: not there, a folder holding no LoRA, a file
    of another kind (a LyCORIS or SDXL file, no LoRA at all) are one line each. What needs its tensors' values (NaN or
    infinite ones, alphas) is checked as it loads (`finetune.methods.lora_init.read_initial_lora`)."""
    if not Path(source).exists():
        raise FinetuneError(f"lora.init_from {source} not found: give a LoRA .safetensors file or a training folder holding {LORA_WEIGHTS_NAME}{looked_for_here(source)}")
    try:  # a folder holding no LoRA (a run's checkpoints/, a checkpoint without its outputs) is said to be what it is, as sample says it
        path = resolve_lora_file(source)
    except FinetuneError as err:
        raise FinetuneError(f"lora.init_from: {err}") from None
    lora_layout(path, lora_header(path)[0])
    return path


def saved_model_metadata(folder: Path) -> dict[str, str]:
    """What training (or merge) recorded beside a ControlNet or pipeline folder (base, steps, prediction type,
    clip skip); {} for one from elsewhere. A file too large to be ours is one line (`record_text`)."""
    path = folder / METADATA_FILE
    try:
        metadata = json.loads(record_text(path)) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def adapter_base(lora: str | None, controlnet: str | None, key: str = "finetune.base_model") -> str | None:
    """The base model a LoRA's (else a ControlNet's) training run recorded, if any (`key`: another record of it)."""
    if lora:
        return lora_record(lora).get(key)  # sd-scripts' files: their ss_sd_model_name
    if controlnet:
        return saved_model_metadata(resolve_controlnet_folder(controlnet)).get(key)
    return None


def same_model(a: str | None, b: str | None) -> bool:
    """Two spellings of one base model (a hub id, or a path written relative or absolute)."""
    if a is None or b is None:
        return False
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def recorded_base(lora: str | None, controlnet: str | None) -> str:
    """The base model a LoRA's or ControlNet's training run recorded, for a command given no --base."""
    recorded = adapter_base(lora, controlnet)
    if not recorded:
        adapter = f" ({lora or controlnet} records none)" if lora or controlnet else ""
        raise FinetuneError(f"pass --base MODEL: the base model to use{adapter}")
    found = found_from_adapter(recorded, lora or controlnet)
    if found is None and (local := local_base_path(recorded, lora or controlnet)) is not None:  # its run folder copied or moved, its base not
        raise FinetuneError(f"pass --base MODEL: {lora or controlnet} was trained on {local} (its run's {BASE_PATHS_FILE}), which is not there "
                            f"from here, nor a folder of its name ({recorded}) above it: give where that base is now")  # fmt: skip
    if found is None and recorded == shared_base_name(recorded) and not spelled_as_hub_id(recorded):  # a file taken out of its run folder
        raise FinetuneError(f"pass --base MODEL: {lora or controlnet} records the base by its name only, {recorded} (shared files name no folders), "
                            "and no folder above it holds one of that name")
    if found is None:
        raise FinetuneError(f"pass --base MODEL: {lora or controlnet} records the base {recorded}, which is not there from here")
    return found


def recorded_base_config(lora: str | None, controlnet: str | None) -> str | None:
    """The configs a run on a single-file base described it with (model.single_file_config), found as its
    base is; None where it recorded none or they are not there."""
    recorded = adapter_base(lora, controlnet, key="finetune.base_config")
    return found_from_adapter(recorded, lora or controlnet) if recorded else None


def found_from_adapter(recorded: str, adapter: str) -> str | None:
    """The base a run recorded, as found from here; None if not found (said before torch loads, not by loading). Its
    outputs name a local base by its name (finetune.outputs.base_names): the run's own record beside them gives its path; an
    older output's record is the path or hub id training was given."""
    local = local_base_path(recorded, adapter)
    found = _found(local, adapter) if local is not None else None
    return found if found is not None else _found(recorded, adapter)


def _found(recorded: str, adapter: str) -> str | None:
    """A path or hub id as found from here, or None."""
    if Path(recorded).exists():
        return recorded
    # A relative path, from the folder training ran in (outputs usually sit below it); `models/sd15` reads
    # like a hub id too, so the folders come first. An absolute one not there (a project folder moved, or copied to
    # another machine, base and outputs together) by its trailing parts, the longest first: /home/alice/proj/models/sd15
    # is found as proj/models/sd15, else models/sd15, else sd15, in the folders above the adapter.
    folders = Path(adapter).resolve().parents
    for tail in [recorded] if not is_absolute_anywhere(recorded) else _tails(recorded):
        for folder in folders:
            if (folder / tail).exists():
                return str(folder / tail)
    return recorded if looks_like_hub_id(recorded) else None


def is_absolute_anywhere(recorded: str) -> bool:
    """Absolute here, or on Windows (C:\\models\\sd15, recorded by a run there)."""
    return Path(recorded).is_absolute() or PureWindowsPath(recorded).is_absolute()


def _tails(recorded: str) -> list[str]:
    """An absolute path's trailing parts, the longest first, without its root (or drive)."""
    path = PureWindowsPath(recorded) if PureWindowsPath(recorded).is_absolute() else PurePosixPath(recorded)
    parts = path.parts[1:]
    return [str(PurePosixPath(*parts[start:])) for start in range(len(parts))]
