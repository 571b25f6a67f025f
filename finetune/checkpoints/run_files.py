"""What a training run writes that other commands are pointed at: its checkpoints, its LoRA file, its ControlNet and
pipeline folders, by name, and finding them. Kept apart from finetune.checkpoints.checkpoint, finetune.sampling.inference and the methods
(which import torch, diffusers and peft: seconds) so that a command says a mistyped --lora, --resume or input folder
before those load; they import these names from here."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from finetune.errors import FinetuneError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PARTIAL = ".partial-"  # a checkpoint being written: .partial-checkpoint-N, renamed checkpoint-N once complete
REMOVED = ".removed-"  # one rotated out: renamed .removed-checkpoint-N, then deleted
STATE_FILE = "trainer_state.json"  # a checkpoint's step and recipe: a checkpoint folder holding it is complete
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # a LoRA run's output, in its output_dir and each checkpoint
CONTROLNET_DIR, UNET_DIR = "controlnet", "unet"  # a ControlNet run's outputs (the UNet: with controlnet.unlock_unet_decoder)
PIPELINE_DIR = "pipeline"  # a full or DreamBooth run's whole pipeline
METADATA_FILE = "finetune_metadata.json"  # beside a saved pipeline or ControlNet: what trained it, for sample, eval and the demo
# A record finetune writes beside what it made (METADATA_FILE, make-conditions' conditioning.json) holds a few settings:
# one past the bound safetensors puts on a header (which holds a LoRA's same record) is none of ours, and is not read.
MAX_RECORD_BYTES = 100_000_000


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders never match the pattern)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def interrupted_checkpoints(checkpoints_dir: Path) -> dict[Path, Path]:
    """checkpoint-N -> the whole folder a kill left of it, for each N that has no checkpoint-N, oldest first. A save writes
    `.partial-checkpoint-N`, complete once it holds trainer_state.json (written last, whole, once the other files are on the
    disk: `checkpoint.save_checkpoint`), then renames it; a kill before that left it there, and one between the two renames of
    a replacement (`atomic_files.replace_folder`) left the old folder aside as `.checkpoint-N.old` too: the new one where it is
    complete, else the old one. Reads only: every process of a run finds the same, and resumes from there; once they have
    loaded it, the main process puts it back (`earlier_run.put_back_interrupted_checkpoints`)."""
    if not checkpoints_dir.is_dir():
        return {}
    found = {}
    saved = {path.name.removeprefix(PARTIAL) for path in checkpoints_dir.glob(f"{PARTIAL}checkpoint-*")}
    for name in saved | {path.name[1 : -len(".old")] for path in checkpoints_dir.glob(".checkpoint-*.old")}:
        final = checkpoints_dir / name
        if not CHECKPOINT_PATTERN.match(name) or os.path.lexists(final):
            continue
        for whole in (checkpoints_dir / f"{PARTIAL}{name}", checkpoints_dir / f".{name}.old"):  # the new one first
            if _complete(whole):
                found[final] = whole
                break
    return dict(sorted(found.items(), key=lambda item: int(CHECKPOINT_PATTERN.match(item[0].name).group(1))))


def _complete(folder: Path) -> bool:
    """Whether `folder` holds a trainer state that can be read: one a kill cut short as an older finetune wrote it is not."""
    if not (folder / STATE_FILE).is_file():
        return False
    try:
        read_state(folder)
    except FinetuneError:
        return False
    return True


def resumable_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints and those a kill left under other names (`interrupted_checkpoints`), each by its name
    (checkpoint-N, which the latter take once put back), oldest first."""
    found = list_checkpoints(checkpoints_dir) + list(interrupted_checkpoints(checkpoints_dir))
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume(resume: str | None, checkpoints_dir: Path) -> Path | None:
    """`latest` -> newest complete checkpoint (None if there is none yet); a path must be a checkpoint. One a kill left
    under another name (`interrupted_checkpoints`) is that folder, until the run has loaded it and puts it back."""
    if resume is None:
        return None
    interrupted = interrupted_checkpoints(checkpoints_dir)
    if resume == "latest":
        found = resumable_checkpoints(checkpoints_dir)
        return interrupted.get(found[-1], found[-1]) if found else None
    path = Path(resume)
    if not path.exists() and path.parent.resolve() == checkpoints_dir.resolve() and checkpoints_dir / path.name in interrupted:
        return interrupted[checkpoints_dir / path.name]
    if not path.exists():
        raise FinetuneError(f"--resume {resume}: no such folder ({newest_checkpoint(checkpoints_dir)}); use 'latest' or a checkpoints/checkpoint-N folder")
    if not (path / STATE_FILE).is_file():
        raise FinetuneError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); use 'latest' or a checkpoints/checkpoint-N folder")
    return path


def say_fresh_start(checkpoints_dir: Path) -> None:
    """Where `--resume latest` found no checkpoint the run starts at step 0, as a first run (a job that always passes it
    runs one command the first time and after a stop): said once. `finetune train` says it before its data check (said
    once the model stack had loaded, a mistyped output_dir was told minutes late on a large folder), train() for callers
    that do not come through the command, which within `checks_kept` is the same run: said by the first alone."""
    from finetune.console import say
    from finetune.data_check.checked_once import kept_check

    unfinished = sorted(checkpoints_dir.glob(f"{PARTIAL}checkpoint-*")) if checkpoints_dir.is_dir() else []
    # A first save a kill or a crash cut short: without a word, the run seemed to have lost its checkpoint.
    cut_short = (f" ({', '.join(path.name for path in unfinished)}: a save a kill or a crash cut short, without its {STATE_FILE}, which "
                 f"no resume can take; the run's first save removes it)") if unfinished else ""  # fmt: skip
    kept_check(f"fresh start in {checkpoints_dir}", lambda: say(f"--resume latest: no checkpoint in {checkpoints_dir} yet, starting at step 0{cut_short}"))


def newest_checkpoint(checkpoints_dir: Path) -> str:
    """What a checkpoint path that is not there is told instead: the newest one there is, or that there is none yet."""
    found = list_checkpoints(checkpoints_dir)
    return f"the newest in {checkpoints_dir} is {found[-1].name}" if found else f"{checkpoints_dir} holds none yet"


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer state; a damaged file (a crash or a full disk while it was written) is one line."""
    problem = "not a JSON object"
    try:
        state = json.loads(record_text(checkpoint / STATE_FILE))
    except (OSError, ValueError) as err:
        state, problem = None, f"{type(err).__name__}: {err}"
    except FinetuneError:  # larger than any state finetune writes: read whole, a damaged file's gigabytes filled the memory
        state, problem = None, f"more than the {MAX_RECORD_BYTES // 1_000_000} MB a record of finetune's holds"
    if not isinstance(state, dict):
        raise FinetuneError(f"checkpoint {checkpoint} is damaged ({STATE_FILE}: {problem}): move it out of "
                            f"{checkpoint.parent} and resume from the one before it")
    return state


def record_text(path: Path) -> str:
    """The text of a record finetune wrote beside what it made (`MAX_RECORD_BYTES`), no more of it read than that: a larger
    one (a damaged file, or another tool's under that name) is one line naming it. OSError and ValueError as reading
    raises them (not there, not UTF-8), for callers that take an unreadable record for none."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        text = file.read(MAX_RECORD_BYTES + 1) if size <= MAX_RECORD_BYTES else b""
    if size > MAX_RECORD_BYTES or len(text) > MAX_RECORD_BYTES:  # (the second: a file still growing as it was read)
        raise FinetuneError(f"{path} holds {max(size, len(text)):,} bytes, more than finetune records there (a few settings; at most "
                            f"{MAX_RECORD_BYTES // 1_000_000} MB): a damaged file, or another tool's: move it out of {path.parent}")  # fmt: skip
    return text.decode()


def checkpoint_step(checkpoint: Path) -> int:
    return read_state(checkpoint).get("step", 0)


def checkpoint_folder(checkpoints_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` stands once complete (CHECKPOINT_PATTERN reads its name)."""
    return checkpoints_dir / f"checkpoint-{step}"


def resolve_lora_file(lora: str) -> Path:
    """A LoRA file, a training output folder, or a folder holding one .safetensors file (`finetune export`'s)."""
    path = Path(lora)
    if path.is_dir():
        # A checkpoint's other .safetensors files are resumable state (trainable_0, ema), never the LoRA.
        # A model folder's (config.json: a ControlNet's) single file is not a LoRA either.
        candidates = [] if (path / STATE_FILE).is_file() or (path / "config.json").is_file() else sorted(
            entry for entry in path.iterdir() if entry.suffix.lower() == ".safetensors")  # (a glob would miss a LoRA.SafeTensors)
        path = path / LORA_WEIGHTS_NAME if (path / LORA_WEIGHTS_NAME).is_file() or len(candidates) != 1 else candidates[0]
        if not path.is_file():
            # The same words for every command that takes a LoRA (sample, eval, merge, export): what the folder is
            # instead, and the commands that take that.
            uses = {CONTROLNET_DIR: "sample or evaluate it with --controlnet {folder} (a ControlNet is not merged or exported as a LoRA)",
                    PIPELINE_DIR: "sample or evaluate it with --base {folder}, or write it as one webui/ComfyUI checkpoint with "
                                "finetune export-checkpoint {run} OUT.safetensors"}  # fmt: skip
            for folder, use in uses.items():
                if (Path(lora) / folder / "config.json").is_file() or (Path(lora) / folder / "model_index.json").is_file():
                    raise FinetuneError(f"{lora} holds no LoRA but a {folder}/ (its run trained no LoRA): " + use.format(folder=Path(lora) / folder, run=lora))
            if (Path(lora) / STATE_FILE).is_file():
                raise FinetuneError(f"checkpoint {lora} holds no LoRA file: its run had checkpoint.save_outputs: false (the run's last LoRA is in its output_dir)")
            if (Path(lora) / "model_index.json").is_file():
                raise FinetuneError(f"{lora} is a whole pipeline, not a LoRA: use it as the base model (--base {lora})")
            if (Path(lora) / "config.json").is_file():
                raise FinetuneError(f"{lora} is a model folder (a ControlNet?), not a LoRA: pass a ControlNet as --controlnet {lora}")
            checkpoints = list_checkpoints(Path(lora))
            if checkpoints:  # a run's checkpoints/: each checkpoint-N holds the LoRA as of step N
                raise FinetuneError(f"{lora} holds a run's checkpoints: pick a checkpoint (checkpoint-N, of step N), e.g. {checkpoints[-1]}, the latest")
            if checkpoints := list_checkpoints(Path(lora) / "checkpoints"):  # a run stopped (Ctrl-C, a crash) before it wrote its outputs
                raise FinetuneError(f"{lora} holds no {LORA_WEIGHTS_NAME} yet (its run has not ended), but its checkpoints hold the LoRA "
                                    f"of their step: pass one, e.g. {checkpoints[-1]}, the latest (or finish the run with --resume latest)")
            if len(candidates) > 1:
                names = ", ".join(c.name for c in candidates[:3]) + (", ..." if len(candidates) > 3 else "")
                raise FinetuneError(f"{lora} holds {len(candidates)} .safetensors files ({names}) and no {LORA_WEIGHTS_NAME}: pass the LoRA file itself")
    if not path.exists() and CHECKPOINT_PATTERN.match(path.name) and path.parent.is_dir():  # a step mistyped, or one rotated out
        raise FinetuneError(f"LoRA {lora} not found: no such folder ({newest_checkpoint(path.parent)}); pass a checkpoint-N folder "
                            "that is there, or the run's output_dir for its last LoRA")  # fmt: skip
    if not path.is_file():
        raise FinetuneError(
            f"LoRA {lora} not found: pass a .safetensors file, a training output folder containing {LORA_WEIGHTS_NAME}, "
            "or a folder holding one .safetensors file"
        )
    if path.suffix.lower() != ".safetensors":  # (a Windows user's LoRA.SafeTensors is one: safetensors reads it by its bytes)
        raise FinetuneError(f"LoRA {path} is not a .safetensors file: pickle checkpoints are not loaded (they can run code)")
    return path


def webui_lora_stem(lora_file: Path) -> str:
    """The name the webui lists `lora_file` by once `finetune export` has written it in kohya layout into a folder (its file
    name's stem): a run's LORA_WEIGHTS_NAME by its run, a checkpoint's by run and step as sd-scripts names its step saves
    (`quickstart-step00000200`; `quickstart-000004` would read as its epoch 4), any other file by its own stem. One name for
    export's file and sample's image settings, whose `<lora:name:...>` then finds that file. `lora_file`: absolute."""
    if (stem := checkpoint_stem(lora_file.parent)) is not None:
        return stem
    return lora_file.parent.name if lora_file.name == LORA_WEIGHTS_NAME else lora_file.stem


def checkpoint_stem(folder: Path) -> str | None:
    """A checkpoint folder (`RUN/checkpoints/checkpoint-200`, absolute) by run and step, `RUN-step00000200`, the name its
    exported files and sampled images give what it holds; None for any other folder."""
    step = checkpoint_folder_step(folder)
    return f"{folder.parent.parent.name}-step{step:08d}" if step is not None else None


def checkpoint_folder_step(folder: Path) -> int | None:
    """The step of a run's checkpoint folder, by its name in the run's checkpoints/ (`RUN/checkpoints/checkpoint-200`: 200);
    None for any other folder."""
    found = CHECKPOINT_PATTERN.match(folder.name) if folder.parent.name == "checkpoints" else None
    return int(found.group(1)) if found else None


def run_or_checkpoint_name(folder: Path) -> str:
    """A folder by its name, a run's checkpoint by its run's too (`edges/checkpoints/checkpoint-500`: `checkpoint-500`
    alone says not which run), as a pipeline's card and an output's record of its starting ControlNet name it."""
    return f"{folder.parent.parent.name}/checkpoints/{folder.name}" if checkpoint_folder_step(folder) is not None else folder.name
