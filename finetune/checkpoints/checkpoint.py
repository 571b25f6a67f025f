"""Checkpoints that survive crashes: written under a temporary name, renamed when complete.

A checkpoint folder `checkpoints/checkpoint-<step>` only ever appears whole, so `--resume latest`
never picks a half-written one. Inside: accelerate's state (optimizer, LR scheduler, RNG states of
every process), the trainable parameters only (a LoRA checkpoint is megabytes, not the whole UNet),
and `trainer_state.json`, written last: the step, the recipe, where the data order and the noise draws stand, and
the records a resume compares (its data, processes, length). Older checkpoints are removed past checkpoint.keep_last.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME, SCALER_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from finetune.checkpoints.earlier_run import remove_checkpoint
from finetune.checkpoints.pickles import refuse_unknown_objects
from finetune.checkpoints.resume_changes import changed_settings
from finetune.checkpoints.resume_checks import DEEPSPEED_FOLDER  # defined where a resume is checked without torch
from finetune.checkpoints.run_files import PARTIAL, REMOVED, STATE_FILE, checkpoint_folder, list_checkpoints, read_state
from finetune.distributed.processes import unwrap
from finetune.errors import FinetuneError
from finetune.outputs.atomic_files import atomic_write_text, failed_write, flush_to_disk, replace_folder
from finetune.outputs.full_disk import disk_full, room_text, size_on_disk, size_text


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def register_trainable_only_hooks(accelerator: Accelerator) -> None:
    """Make accelerate's save_state/load_state store just the parameters that train, not frozen weights."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                tensors = trainable_state_dict(unwrap(accelerator, model))
                save_file(tensors, os.path.join(output_dir, f"trainable_{i}.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            tensors = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            unwrapped = unwrap(accelerator, model)
            expected = trainable_state_dict(unwrapped)
            if set(tensors) != set(expected):
                raise FinetuneError(
                    f"checkpoint {input_dir} does not match this recipe's trainable parameters "
                    f"({len(tensors)} saved, {len(expected)} expected): resume with the recipe that wrote it"
                )
            for name, tensor in tensors.items():
                if tensor.shape != expected[name].shape:
                    raise FinetuneError(
                        f"checkpoint {input_dir} holds {name} of shape {tuple(tensor.shape)}, this recipe's is "
                        f"{tuple(expected[name].shape)} (another lora.rank?): resume with the recipe that wrote it"
                    )
            unwrapped.load_state_dict(tensors, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: Path,
    step: int,
    state: dict,
    keep_last: int,
    extra: Callable[[Path], None] | None = None,
    **save_options,
) -> Path:
    """Collective: every process calls it. Returns the final folder. `extra(folder)`, also called on every
    process (it may gather sharded weights), writes more files before the folder is complete;
    `save_options` go to accelerate's save_state."""
    final = checkpoint_folder(checkpoints_dir, step)
    partial = checkpoints_dir / f"{PARTIAL}{final.name}"
    try:
        if accelerator.is_main_process:
            for prefix in (PARTIAL, REMOVED):  # what a killed run left
                for stale in checkpoints_dir.glob(f"{prefix}checkpoint-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial), **save_options)
        accelerator.wait_for_everyone()
        if extra is not None:
            extra(partial)
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # Last, once every other file is on the disk, and whole or not at all: a folder that holds it is complete, even one a
            # kill (or a power cut) left before its rename into place (`run_files.interrupted_checkpoints` resumes it then).
            atomic_write_text(flush_to_disk(partial) / STATE_FILE, json.dumps({**state, "step": step}, indent=2))
    except BaseException as err:  # a second Ctrl-C too: the half-written folder would keep its space until the next save
        written = size_on_disk(partial)  # (before it goes: what the line says a first checkpoint needs, at least)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        if not failed_write(err):
            raise
        if line := _full_disk_line(err, checkpoints_dir, final, written):
            raise FinetuneError(line) from None
        raise FinetuneError(
            f"could not write checkpoint {final} ({type(err).__name__}: {str(err).splitlines()[0][:100]}): make room or fix the "
            f"permissions of {checkpoints_dir}, then --resume latest (the last complete checkpoint is kept)"
        ) from None
    if accelerator.is_main_process:
        replace_folder(partial, final)
        for old in list_checkpoints(checkpoints_dir)[:-keep_last] if keep_last > 0 else []:
            remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def _full_disk_line(err: BaseException, checkpoints_dir: Path, final: Path, written: int) -> str | None:
    """What a save the disk filled under says: the room the checkpoint needs (the size of the last complete one, of the same
    run and so of the same files; for a first checkpoint, what it had written when the disk filled, at least), and the last
    complete checkpoint, which is kept. None for a failed write that is no full disk (permissions)."""
    previous = list_checkpoints(checkpoints_dir)[-1:]
    needed = size_on_disk(previous[0]) if previous else written
    if not disk_full(err, checkpoints_dir, needed):
        return None
    need = f"about {size_text(needed)}, as {previous[0].name}" if previous else f"at least {size_text(needed)}, what it had written when the disk filled"
    kept = f"{previous[0].name}, the last complete checkpoint, is kept" if previous else "none was complete yet: it starts at step 0"
    return (f"no space left on the disk of {checkpoints_dir}{room_text(checkpoints_dir)} for {final.name}, which needs {need}: "
            f"make room, then --resume latest ({kept}; the unfinished {final.name} was removed)")


def damaged_file(err: Exception) -> bool:
    """Whether loading failed on a missing, cut-off or garbled file (a crash or a full disk while it was
    written), rather than on a bug: torch.load's zip reader, pickle, safetensors, accelerate's file count."""
    words = ("PytorchStreamReader", "zip archive", "custom checkpoints", "Ran out of input")
    return isinstance(err, (FileNotFoundError, EOFError, pickle.UnpicklingError, SafetensorError)) or (
        isinstance(err, RuntimeError) and any(w in str(err) for w in words))


def unreadable_files(folder: Path) -> list[str]:
    """The files of a checkpoint that cannot be opened: safetensors by their header, torch.save's by their zip."""
    bad = []
    for file in sorted(folder.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(file):
                bad.append(file.name)
        except (SafetensorError, OSError):
            bad.append(file.name)
    return bad


def damaged_process_files(path: Path, processes: int) -> list[str]:
    """The files of checkpoint `path` that one process each reads at a resume, missing or cut short: the random states of its
    first `processes` (missing or cut short, accelerate skips one with a log line: the run would draw other dropout masks, another
    curve; a process the checkpoint had none for, in a run of more, starts its own: that resume says so), and DeepSpeed's shards.
    Every process checks all of them, so that each says the same line: found by one alone, its error was said by no one (each
    machine's first process says errors) while the others went on into the run and waited for it."""
    own = [path / f"{RNG_STATE_NAME}_{index}.pkl" for index in range(processes)] + sorted((path / DEEPSPEED_FOLDER).glob("zero_pp_rank_*.pt"))
    return [file.name for file in own if not zipfile.is_zipfile(file)]


def load_checkpoint(accelerator: Accelerator, path: Path, current_settings: dict | None = None, **load_options) -> dict:
    """Restore the state saved in `path`; return its trainer state. A checkpoint of other trained modules
    or parameter groups (a text encoder, LoRA+ switched on or off) is one line naming what changed."""
    state = read_state(path)  # its engine (DeepSpeed's stage, the processes) was checked before anything loaded: finetune.distributed.deepspeed_checks
    scaler = accelerator.scaler
    if scaler is not None and not (path / SCALER_NAME).is_file():
        # An fp16 run (the loss scaler) resuming a bf16 or fp32 checkpoint, as a bf16 run moved to a GPU
        # without bf16 does: accelerate would fail on the missing file; the scale starts afresh instead.
        accelerator.scaler = None
    if damaged := damaged_process_files(path, min(state.get("processes") or 1, accelerator.num_processes)):
        raise FinetuneError(f"checkpoint {path} is damaged or incomplete ({', '.join(damaged)}: missing or cut short): move it out of "
                            f"{path.parent} and resume from the one before it")
    refuse_unknown_objects(path, path / DEEPSPEED_FOLDER)  # files accelerate and DeepSpeed unpickle whole: nothing but what they write
    try:
        accelerator.load_state(str(path), **load_options)
    except Exception as err:
        # torch's optimizer: "... different number of parameter groups" / "... doesn't match the size of
        # optimizer's group"; the load hook: a trainable_<i> file for a module the checkpoint did not train.
        other_modules = isinstance(err, (ValueError, FileNotFoundError)) and any(
            words in str(err) for words in ("parameter group", "optimizer's group", "trainable_"))
        changed = changed_settings(state.get("recipe"), current_settings or {})
        if other_modules and (changed or not isinstance(err, FileNotFoundError)):
            raise FinetuneError(
                f"checkpoint {path} was written for other trained modules or parameter groups than this recipe's"
                + (f" (changed since: {', '.join(changed)})" if changed else "") + ": resume with the settings that wrote it"
            ) from None
        if damaged_file(err):
            named = [Path(err.filename).name] if getattr(err, "filename", None) else unreadable_files(path)
            raise FinetuneError(
                f"checkpoint {path} is damaged or incomplete ({', '.join(named) + ': ' if named else ''}{type(err).__name__}: "
                f"{str(err).splitlines()[0][:100]}): move it out of {path.parent} and resume from the one before it"
            ) from None
        raise
    finally:
        accelerator.scaler = scaler
    return state
