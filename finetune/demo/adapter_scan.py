"""Finding adapters in a folder for the demo: LoRA files (ours, diffusers' or kohya's layout),
pipeline folders (DreamBooth, full fine-tunes, merges) and ControlNet folders, each with the metadata
the trainer recorded, and a run's checkpoints by the outputs they hold.

Only headers and small JSON files are read here; nothing is loaded. Pickle files are listed as refused
with the reason (unpickling can run code), so a user sees why a file they expected is not usable.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from safetensors import safe_open

from finetune.checkpoints.run_files import CHECKPOINT_PATTERN, CONTROLNET_DIR, LORA_WEIGHTS_NAME, METADATA_FILE, PIPELINE_DIR, STATE_FILE, UNET_DIR
from finetune.config.run_recipe import run_recipe_file
from finetune.console import warn
from finetune.controlnet.folder import CONVERT_ORIGINAL_CONTROLNET, ORIGINAL_CONTROLNET_PREFIXES, conditioning_channels_problem, weights_variant
from finetune.errors import FinetuneError
from finetune.formats.dora import names_magnitudes
from finetune.formats.kohya_metadata import finetune_metadata_from_kohya
from finetune.formats.lora_kinds import unsupported_kind
from finetune.models.base_folder import files_ending, misnamed_weights_in
from finetune.sampling.adapter_records import saved_model_metadata

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Folders the trainer writes that hold no finished adapter (logs, sample grids).
SKIPPED_FOLDERS = {"logs", "samples", "sample", "__pycache__", "node_modules"}
# What a checkpoint holds besides its resumable state (checkpoint.save_outputs): the run's outputs at its step.
CHECKPOINT_OUTPUTS = {LORA_WEIGHTS_NAME, CONTROLNET_DIR, UNET_DIR, PIPELINE_DIR}
MAX_SCAN_DEPTH = 6
# What a demo load reads of a pipeline or ControlNet folder: configs, the tokenizer's files, safetensors weights (the demo
# loads no pickle, and no other framework's weights). A pipeline's parts as models.load_parts loads them.
LOADED_SUFFIXES = (".json", ".txt", ".safetensors")
PIPELINE_PARTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
BASE = "(base model)"
# The folder a run saves its pipeline or ControlNet in (RUN/pipeline, RUN/controlnet): listed by the run, as its LoRA is.
RUN_OUTPUT_FOLDERS = {"pipeline": PIPELINE_DIR, "controlnet": CONTROLNET_DIR}


@dataclass
class Adapter:
    """One entry of the adapters folder; `refused` says why it cannot be used (it is still listed)."""

    name: str
    kind: str  # "lora", "pipeline" (DreamBooth / full fine-tune) or "controlnet"
    path: Path
    layout: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    refused: str | None = None


def scan_adapters(root: Path, exclude: tuple[Path, ...] = ()) -> dict[str, Adapter]:
    """Every LoRA file, pipeline folder and ControlNet folder under `root`, by name (sorted)."""
    root = Path(root)
    excluded = {p.resolve() for p in exclude}
    found: list[Adapter] = []
    if not root.is_dir():
        return {}
    # A folder this user may not read (copied as another user, or chmod'ed) is said in one line and skipped: raised out of
    # the scan it would stop the demo, and os.walk alone skips one it cannot list without a word.
    # Links to folders are followed: runs gathered into one adapters folder as links (ln -s ../outputs/lora) were listed as
    # nothing ("0 adapters") without a word. Each folder once, by its real path: a link back up the tree is no loop.
    walked: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True, onerror=lambda err: _say_unreadable(err.filename, root) if isinstance(err, PermissionError) else None):
        if (real := os.path.realpath(folder)) in walked:
            dirs.clear()
            continue
        walked.add(real)
        here = Path(folder)
        try:
            found += _adapters_here(here, root, dirs, files, excluded)
        except PermissionError:  # a file in it, or its entries' stat (a folder of mode r--)
            dirs.clear()
            _say_unreadable(here, root)
    adapters: dict[str, Adapter] = {}
    for adapter in _without_copies_of_the_run(found):
        if adapter.name in adapters or adapter.name == BASE:
            adapter.name = _relative(adapter.path, root)
        adapters[adapter.name] = adapter
    return dict(sorted(adapters.items()))


def _adapters_here(here: Path, root: Path, dirs: list[str], files: list[str], excluded: set[Path]) -> list[Adapter]:
    """The adapters in one folder of the walk; `dirs` is narrowed to the folders to walk into."""
    depth = len(here.relative_to(root).parts)
    model = None if here.resolve() in excluded else _model_folder(here, root, files)
    if model is not None or depth >= MAX_SCAN_DEPTH or here.resolve() in excluded:
        dirs.clear()  # the files inside a model folder are its weights, not adapters
        return [model] if model is not None else []
    dirs[:] = _folders_to_scan(here, dirs)
    found = []
    for name in sorted(files):
        if _is_checkpoint(here) and name not in CHECKPOINT_OUTPUTS:
            continue
        path = here / name
        if name.lower().endswith(".safetensors"):  # (a Windows user's LoRA.SafeTensors too)
            adapter = _lora_file(path, root)
        elif name.lower().endswith(PICKLE_SUFFIXES):
            adapter = Adapter(_name(path, root), "lora", path, "pickle", refused="pickle checkpoint: only .safetensors files are loaded")
        else:
            continue
        found += [adapter] if adapter is not None else []
    return found


def _unreadable(path: str | os.PathLike | None, root: Path) -> str:
    """A folder or file this user may not read, as the scan says it: relative to the adapters folder."""
    return f"{os.path.relpath(path, root) if path else root} cannot be read by this user (permission denied)"


def _say_unreadable(path: str | os.PathLike | None, root: Path) -> None:
    warn(f"{_unreadable(path, root)}, so its adapters are not listed: give this user read access to it (chmod -R u+rX), then Rescan", by="this process")


def _without_copies_of_the_run(found: list[Adapter]) -> list[Adapter]:
    """A run's last checkpoint holds what the run itself saved: listed once, by the run's name."""
    by_path = {adapter.path: adapter for adapter in found}
    kept = []
    for adapter in found:
        parts = adapter.path.parts
        at = len(parts) - 1 - parts[::-1].index("checkpoints") if "checkpoints" in parts else None
        if at is not None and at + 1 < len(parts) and CHECKPOINT_PATTERN.match(parts[at + 1]):
            run_output = by_path.get(Path(*parts[:at], *parts[at + 2 :]))
            if run_output is not None and run_output.metadata.get("finetune.steps") == adapter.metadata.get("finetune.steps"):
                continue
        kept.append(adapter)
    return kept


def by_name(adapters: dict[str, Adapter], root: Path, name: str) -> Adapter | None:
    """The scanned adapter listed as `name`, or the pipeline or ControlNet whose folder under `root` is `name` (db/pipeline,
    edges/controlnet, listed as their runs db and edges: the names the demo listed before, in a saved request or a script).
    Names of the scan only, never a path."""
    if name in adapters or not isinstance(name, str):
        return adapters.get(name)
    folders = (adapter for adapter in adapters.values() if adapter.kind in RUN_OUTPUT_FOLDERS)
    return next((adapter for adapter in folders if _relative(adapter.path, Path(root)) == name), None)


def listed_name(adapters: dict[str, Adapter], root: Path, name: str | None, kind: str) -> str | None:
    """`name` as the list shows it (edges for edges/controlnet: `by_name`), which labels and notes say; one the scan does not
    know as an adapter of `kind` (the base, a name for another kind) stays as asked, as its error names it."""
    adapter = by_name(adapters, root, name) if name not in (BASE, "", None) else None
    return adapter.name if adapter is not None and adapter.kind == kind else name


def adapter_files_stamp(adapter: Adapter) -> tuple:
    """What tells an adapter's files from what they held when it was loaded, cheaply (a stat of each file a load reads,
    nothing read): each one's path, inode, size, modification and change time. A file replaced (renamed over, even within
    the file system's time resolution, or copied keeping its time: cp -p) has another inode or change time; one rewritten in
    place, another change time (a folder's own time did not do: a file rewritten in place leaves its folder as it was); a
    file added or taken away changes the list. Only the files a load reads (LOADED_SUFFIXES in the parts it loads): a
    hub pipeline's other weights (.bin, flax, fp16 and non-EMA copies beside the one loaded, a safety checker) took a
    stat each on every render. OSError where the adapter is gone."""
    if adapter.kind == "lora":
        return (_stat_stamp(adapter.path),)
    files = [Path(entry.path) for entry in _loaded_entries_of(adapter.path, adapter.kind) if entry.is_file()]
    return tuple(_stat_stamp(path) for path in sorted(files))


def _loaded_entries_of(folder: Path, kind: str) -> list[os.DirEntry]:
    """The entries a load of a pipeline or ControlNet folder reads (LOADED_SUFFIXES in the parts it loads)."""
    if kind == "pipeline":  # its parts, and its model_index.json (not the single-file checkpoints a hub clone has beside them)
        return _loaded_entries(folder, PIPELINE_PARTS, suffixes=(".json",))
    # a ControlNet, with the UNet its run saved beside it (inference.unlocked_decoder_folder)
    return _loaded_entries(folder) + _loaded_entries(folder.parent, (UNET_DIR,), suffixes=())


def _loaded_entries(folder: Path, parts: tuple[str, ...] = (), suffixes: tuple[str, ...] = LOADED_SUFFIXES) -> list[os.DirEntry]:
    """The entries of `folder` named with `suffixes` (in any letter case: a disk ignoring case loads model.SafeTensors), and
    those a load may read in its subfolders named in `parts` (a part that is a link to nothing among them), listed without
    a stat each (a listing says which entries are files, folders and links)."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name in parts and entry.is_dir():
                found += _loaded_entries(Path(entry.path))
            elif entry.name.lower().endswith(suffixes) or (entry.name in parts and entry.is_symlink()):
                found.append(entry)
    return found


def _link_to_nothing(folder: Path, root: Path, kind: str) -> str | None:
    """Why a pipeline or ControlNet holding a link to nothing among the files its load reads is refused (a hub cache's blob
    deleted, a folder moved): its load said the file 'damaged (No such file or directory ...)' on every render, naming
    neither the link nor where it points. A link to nothing that no load reads is left alone."""
    for entry in _loaded_entries_of(folder, kind):
        if entry.is_symlink() and not os.path.exists(entry.path):
            return f"{os.path.relpath(entry.path, root)} is a link to {os.readlink(entry.path)}, which is not there: put that file back, or remove the link, then Rescan"
    return None


def _stat_stamp(path: Path) -> tuple:
    status = path.stat()
    return str(path), status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _is_checkpoint(folder: Path) -> bool:
    """A checkpoint, also one copied out of its run (a step picked to keep) under another name."""
    return (folder / STATE_FILE).is_file()


def _folders_to_scan(here: Path, dirs: list[str]) -> list[str]:
    """A run's checkpoints are listed by their outputs only: the resumable state beside them (optimizer,
    DeepSpeed's pickle shards) is no adapter, nor is a checkpoint still being written."""
    if here.name == "checkpoints":
        return sorted(d for d in dirs if CHECKPOINT_PATTERN.match(d))
    if _is_checkpoint(here):
        return sorted(d for d in dirs if d in CHECKPOINT_OUTPUTS)
    return sorted(d for d in dirs if d not in SKIPPED_FOLDERS and not d.startswith("."))


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _name(path: Path, root: Path) -> str:
    """A training folder's LoRA is named after the folder; other files after their path, no suffix."""
    if path.name.startswith("pytorch_lora_weights.") and path.parent != root:
        return _relative(path.parent, root)
    return _relative(path.with_suffix(""), root)


def _lora_file(path: Path, root: Path) -> Adapter | None:
    """Read only the header (keys, shapes, metadata); a safetensors file without LoRA keys is skipped (a single-file
    ControlNet is listed as refused)."""
    try:
        with safe_open(str(path), "np") as f:  # "pt" imports torch, for a header
            keys = list(f.keys())
            meta = dict(f.metadata() or {})
            downs = [k for k in keys if k.endswith(("lora_down.weight", "lora.down.weight", "lora_A.weight"))]
            rank = str(f.get_slice(downs[0]).get_shape()[0]) if downs else "?"
    except Exception as err:  # noqa: BLE001 - any unreadable file is listed, not raised
        # What is wrong, and what to do: "(SafetensorError)" alone told neither of a copy cut short.
        detail = " ".join(str(err).split())[:100] or err.__class__.__name__
        return Adapter(_name(path, root), "lora", path, "?", refused=f"unreadable safetensors file ({detail}; cut short?): copy it again, then Rescan")
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        layout = "kohya"
        dim = meta.get("ss_network_dim")  # "Dynamic" for mixed ranks
        meta = finetune_metadata_from_kohya(meta)
        if dim:
            meta.setdefault("finetune.rank", dim)
    elif any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        layout = "diffusers"
    elif unsupported_kind(keys):  # e.g. an SDXL LoRA of its text encoders only (lora_te1_, lora_te2_)
        layout = "?"
    elif any(k.startswith(ORIGINAL_CONTROLNET_PREFIXES) for k in keys):  # listed, so the user sees why it is not offered
        return Adapter(_name(path, root), "controlnet", path, "original", refused=f"a single-file ControlNet in the original layout: {CONVERT_ORIGINAL_CONTROLNET}")
    else:
        return None
    refused = unsupported_kind(keys)
    if names_magnitudes(keys):  # ours record it; other trainers' files say it by their names
        meta["finetune.use_dora"] = "true"
    meta.setdefault("finetune.rank", rank)
    meta.setdefault("finetune.method", "lora")
    return Adapter(_name(path, root), "lora", path, layout, {k: v for k, v in meta.items() if k.startswith("finetune.")}, refused)


def _model_folder(folder: Path, root: Path, files: list[str]) -> Adapter | None:
    if "model_index.json" in files:
        return _model_entry(folder, root, "pipeline", _problem_or_unreadable(lambda: _pipeline_problem(folder, root), folder, root))
    if "config.json" in files:
        try:
            config = json.loads((folder / "config.json").read_text())
        except PermissionError:
            raise  # said by the scan: the folder may be a ControlNet, unlisted
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
            return None
        return _model_entry(folder, root, "controlnet", _problem_or_unreadable(lambda: _controlnet_problem(folder, root, config), folder, root))
    return None


def _problem_or_unreadable(problem: Callable[[], str | None], folder: Path, root: Path) -> str | None:
    """Why a pipeline or ControlNet folder cannot load, also where a part of it cannot be read by this user: that one is
    listed, refused naming the part, not raised out of the scan."""
    try:
        return problem()
    except PermissionError as err:
        return f"{_unreadable(err.filename or folder, root)}: give this user read access to it (chmod -R u+rX), then Rescan"


def _pipeline_problem(folder: Path, root: Path) -> str | None:
    parts = ("unet", "vae", "text_encoder")
    missing = [part for part in parts if not files_ending(folder / part, ".safetensors")]  # in any case (unet/...SafeTensors too)
    pickled = [part for part in missing if _holds_pickles(folder / part)]
    absent = [part for part in missing if part not in pickled]  # no weights at all: said to be pickles, they were looked for in vain
    # Weights in another letter case, which diffusers opens by their lowercase name alone: there where the disk ignores case.
    misnamed = next(filter(None, (misnamed_weights_in(folder / part, f"{part}/") for part in parts)), None)
    refused = (f"{', '.join(pickled)} weights are not .safetensors (pickle checkpoints are not loaded)" if pickled
               else f"no {', '.join(absent)} weights (a copy cut short?): copy the pipeline folder again" if absent else misnamed)  # fmt: skip
    try:  # a copy cut short, or a file edited by hand: loading it would fail only when chosen
        json.loads((folder / "model_index.json").read_text())
    except PermissionError:
        raise
    except (OSError, ValueError):
        refused = "its model_index.json is not readable JSON (a copy cut short?): copy the pipeline folder again"
    return _link_to_nothing(folder, root, "pipeline") or refused


def _controlnet_problem(folder: Path, root: Path, config: dict) -> str | None:
    has_weights = (folder / "diffusion_pytorch_model.safetensors").is_file() or bool(weights_variant(folder))
    refused = misnamed_weights_in(folder) or (None if has_weights else "no diffusion_pytorch_model.safetensors (pickle checkpoints are not loaded)")
    return _link_to_nothing(folder, root, "controlnet") or refused or conditioning_channels_problem(config)


def _model_entry(folder: Path, root: Path, kind: str, refused: str | None) -> Adapter:
    """A pipeline's or ControlNet's entry; a record beside it too large to be read refuses it, not the whole scan. A run's
    pipeline (DreamBooth's, a full fine-tune's: RUN/pipeline) or ControlNet (RUN/controlnet) is named after its run, as a
    run's LoRA is (`_name`): db and edges, not db/pipeline and edges/controlnet, which the demo takes too (`by_name`)."""
    try:
        metadata = _folder_metadata(folder)
    except FinetuneError as err:
        metadata, refused = {}, refused or str(err)
    name = _relative(folder.parent if folder.name == RUN_OUTPUT_FOLDERS[kind] and _is_run(folder.parent, root) else folder, root)
    return Adapter(name, kind, folder, "diffusers", metadata, refused)


def _is_run(folder: Path, root: Path) -> bool:
    """A run's output_dir (it holds the run's record) or one of its checkpoints, below the adapters folder: what names the
    pipeline or ControlNet it saved. Any other folder holding one (a user's models/controlnet) is no run, and was listed
    as the run `models`."""
    return folder != root and (_is_checkpoint(folder) or run_recipe_file(folder).is_file())


def _holds_pickles(folder: Path) -> bool:
    return folder.is_dir() and any(path.suffix.lower() in PICKLE_SUFFIXES for path in folder.iterdir())


def _folder_metadata(folder: Path) -> dict[str, str]:
    """What was saved with a ControlNet or pipeline (finetune_metadata.json) or, for a pipeline saved
    before that file was, the training run's recorded recipe (a checkpoint's: the recipe and step in its state)."""
    if (folder / METADATA_FILE).is_file():
        return saved_model_metadata(folder)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        state = json.loads((folder.parent / STATE_FILE).read_text())
        return {"finetune.method": str(state["recipe"]["method"]), "finetune.base_model": str(state["recipe"]["model.pretrained"]),
                "finetune.steps": str(state["step"])}
    with contextlib.suppress(OSError, ValueError, KeyError, AttributeError, TypeError, yaml.YAMLError):  # a recipe edited by hand may be anything
        recipe = yaml.safe_load(run_recipe_file(folder.parent).read_text())
        return {"finetune.method": str(recipe.get("method", "?")), "finetune.base_model": str(recipe["model"]["pretrained"]),
                "finetune.steps": str(recipe["train"]["max_steps"])}
    return {}
