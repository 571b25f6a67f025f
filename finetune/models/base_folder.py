"""A local base-model folder's files, checked before anything loads: a part's config that is not JSON (a cut
copy) or describes another class, a weights file cut short, or a missing scheduler config or tokenizer was
diffusers' or transformers' traceback as the model loaded (or at the first training step), after the data check;
so was a pipeline of another architecture (SDXL, an inpainting UNet), at the first step.

A single .safetensors base is checked the same way: its header whole, and not SDXL's.

Reads the configs and the safetensors headers only: cheap, however large the weights (pickle weights, .ckpt and
a folder's .bin without safetensors beside them: the names their pickle holds, with torch, which loads for them alone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune.errors import FinetuneError

# What each part's config.json says it is: diffusers' `_class_name`, transformers' `model_type`.
PART_CLASSES = {"unet": ("_class_name", "UNet2DConditionModel"), "vae": ("_class_name", "AutoencoderKL"),
                "text_encoder": ("model_type", "clip_text_model")}  # fmt: skip
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # a CLIP tokenizer's files (or one tokenizer.json)


def read_config(path: Path, name: str) -> dict:
    """A part's JSON config, or one line naming the file (empty or cut short: a copy that did not finish)."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FinetuneError(f"base model folder {name} has no {path.parent.name}/{path.name}: copy the whole pipeline folder again") from None
    except (OSError, ValueError) as err:
        raise FinetuneError(f"base model folder {name}: {path.parent.name}/{path.name} cannot be read ({err.__class__.__name__}; "
                            "empty or cut short?): copy the whole pipeline folder again") from None  # fmt: skip
    if not isinstance(config, dict):
        raise FinetuneError(f"base model folder {name}: {path.parent.name}/{path.name} is not a config (a JSON object): copy the whole pipeline folder again")
    return config


WEIGHTS_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}  # as save_pretrained names them


WEIGHTS_SUFFIXES = (".safetensors", ".bin")


def files_ending(folder: Path, suffix: str) -> list[Path]:
    """`folder`'s files ending in `suffix` (lowercase) in any letter case, sorted: a folder copied from Windows may name
    them model.SafeTensors, which a disk that ignores case (macOS's, Windows') serves as model.safetensors too."""
    try:
        return sorted(file for file in folder.iterdir() if file.name.lower().endswith(suffix))
    except OSError:  # no such folder (a part missing is said by its own check)
        return []


def part_weights(path: Path, part: str, variant: str | None = None) -> list[Path]:
    """A part's weights files (safetensors or pickles, whole or sharded), of `variant` (e.g. fp16) where one is given."""
    files = [file for suffix in WEIGHTS_SUFFIXES for file in files_ending(path / part, suffix)]
    return [file for file in files if variant is None or f".{variant}." in file.name or f".{variant}-" in file.name]


def misnamed_weights(path: Path, name: str) -> str | None:
    """Why a folder whose weights end in another letter case (unet/diffusion_pytorch_model.SafeTensors) does not load where
    the disk tells case apart (`misnamed_weights_in`), or None. Was "has no weights in unet: copy the whole folder again"."""
    for part in WEIGHTS_STEMS:
        if misnamed := misnamed_weights_in(path / part, f"{part}/"):
            return f"base model folder {name}: {misnamed}"
    return None


def misnamed_weights_in(folder: Path, shown: str = "") -> str | None:
    """Why `folder`'s weights ending in another letter case (diffusion_pytorch_model.SafeTensors, copied from Windows) do
    not load where the disk tells case apart: diffusers and transformers open each file by its exact name, in lowercase.
    None where there is none, or the disk finds the file by that name too (macOS's, Windows'). `shown`: what the line
    puts before a file's name (unet/ for a part of a pipeline)."""
    for suffix in WEIGHTS_SUFFIXES:
        for weights in files_ending(folder, suffix):
            lowered = weights.name[: -len(suffix)] + suffix
            if lowered != weights.name and not (folder / lowered).is_file():
                return (f"{shown}{weights.name} ends in {weights.name[-len(suffix):]}, and diffusers opens {shown}{lowered} by that name, "
                        f"in lowercase (a folder copied from Windows?): rename its weights files to end in {suffix}")  # fmt: skip
    return None


def missing_part_file(path: Path, variant: str | None = None) -> str | None:
    """The first file a pipeline needs that `path` lacks (`part/name`: a part's weights, the scheduler's config, the
    tokenizer's files), or None: what a hub cache holding the configs of a base alone lacks."""
    for part, stem in WEIGHTS_STEMS.items():
        if not part_weights(path, part, variant):
            return f"{part}/{stem}{f'.{variant}' if variant else ''}.safetensors"
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        return "scheduler/scheduler_config.json"
    tokenizer = path / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        return next((f"tokenizer/{file}" for file in TOKENIZER_FILES if not (tokenizer / file).is_file()), None)
    return None


def check_part_files(path: Path, name: str) -> None:
    """Each part's config is its class's, each safetensors file whole, and the UNet is SD1.x's or SD2.x's kind."""
    from safetensors import SafetensorError, safe_open

    if broken := link_to_nothing(path):
        raise FinetuneError(f"base model folder {name}: {broken}")
    configs = {part: read_config(path / part / "config.json", name) for part in PART_CLASSES}
    for part, (key, expected) in PART_CLASSES.items():
        found = configs[part].get(key) or configs[part].get("_class_name")  # a diffusers config in text_encoder/ has no model_type
        if found != expected and not (found is None and part == "text_encoder"):  # CLIPTextModel loads a config without model_type
            raise FinetuneError(f"base model folder {name}: {part}/config.json describes {found}, not {expected}: "
                                f"put the pipeline's own {part} folder there (copy the whole pipeline folder again)")  # fmt: skip
    read_config(path / "scheduler" / "scheduler_config.json", name)
    tokenizer = path / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file() and not all((tokenizer / file).is_file() for file in TOKENIZER_FILES):
        raise FinetuneError(f"base model folder {name}: tokenizer/ has no tokenizer.json (nor {' and '.join(TOKENIZER_FILES)}): copy the whole pipeline folder again")
    check_architecture(path, name)
    for part in PART_CLASSES:
        if not files_ending(path / part, ".safetensors"):  # (beside safetensors, pickle weights are not read)
            for weights in files_ending(path / part, ".bin"):
                if refusal := pickle_refusal(weights, f"base model folder {name}: {part}/{weights.name}", "weights"):
                    raise FinetuneError(refusal)
        for weights in files_ending(path / part, ".safetensors"):
            try:
                with safe_open(str(weights), "np"):  # the header, checked against the file's length ("np": "pt" imports torch, seconds)
                    pass
            except (SafetensorError, OSError) as err:
                raise FinetuneError(f"base model folder {name}: {part}/{weights.name} is damaged ({' '.join(str(err).split())}; a copy or "
                                    "download cut short?): copy it again")  # fmt: skip


def link_to_nothing(path: Path) -> str | None:
    """Why a pipeline folder holding a link to nothing among the files its checks and load read is refused (a hub cache's
    blob deleted, a folder moved): read, it was "damaged (No such file or directory ...)" or "has no ...", naming neither
    the link nor where it points. None where there is none."""
    read = [*(path / part / "config.json" for part in PART_CLASSES), path / "scheduler" / "scheduler_config.json",
            *(path / "tokenizer" / file for file in ("tokenizer.json", *TOKENIZER_FILES))]  # fmt: skip
    for part in PART_CLASSES:
        read += files_ending(path / part, ".safetensors") or files_ending(path / part, ".bin")  # .bin read without safetensors
    for file in read:
        if file.is_symlink() and not file.exists():
            return f"{file.relative_to(path).as_posix()} is a link to {os.readlink(file)}, which is not there: put that file back (copy or download the model again)"
    return None


def objects_refused_in(path: Path) -> str | None:
    """The objects besides tensors that a pickle checkpoint (.ckpt, .bin) holds, as torch.load(weights_only=True), which
    diffusers and transformers read them with, refuses them ("os.system", or a Lightning callback beside a .ckpt's
    weights): from its pickle's names alone, nothing unpickled; None for a file of tensors alone, or one torch's
    legacy format or damage keeps from being read so (loading then says it: `finetune.models.loading`)."""
    objects = pickled_objects(path)  # None: loading reads it with weights_only too, and says why
    return named_objects(objects) if objects else None


def named_objects(objects: list[str]) -> str:
    """The first three of a pickle's objects, for a line."""
    return ", ".join(sorted(objects)[:3]) + (", ..." if len(objects) > 3 else "")


def pickled_objects(path: Path) -> list[str] | None:
    """The objects besides tensors that a torch.save file's pickle names, from its names alone (nothing unpickled); None
    where they cannot be listed so: not torch's zip format (its legacy one, a plain pickle), damaged, or a pickle of opcodes
    torch's scan does not read (protocol 4's STACK_GLOBAL; torch.save writes protocol 2)."""
    import torch.serialization

    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return None


def pickle_refusal(path: Path, named: str, use: str = "file") -> str | None:
    """Why a pickle checkpoint (.ckpt, .bin), named `named` in the line, is not loaded, or None where
    torch.load(weights_only=True) reads it: objects besides tensors, or a pickle protocol that loader does not read."""
    if (protocol := pickle_protocol(path)) is not None and protocol > SAFE_LOADER_PROTOCOL:
        return unreadable_protocol_message(named, protocol, use)
    objects = objects_refused_in(path)
    return objects_refused_message(named, objects, use) if objects else None


# torch's weights-only unpickler reads protocols 2 and 3 (torch.save writes 2), not protocol 4's FRAME: such a file was
# "damaged: download it again" for a .ckpt (the same file again), and transformers' traceback for a folder's .bin.
SAFE_LOADER_PROTOCOL = 3


def pickle_protocol(path: Path) -> int | None:
    """The protocol of a torch.save file's pickle, from its first two bytes (PROTO, then the number): the zip format's
    data.pkl, or the legacy format's first pickle; None where there is none to read."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")), None)
                head = archive.open(name).read(2) if name else b""
        else:
            with open(path, "rb") as file:
                head = file.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def unreadable_protocol_message(named: str, protocol: int, use: str = "file") -> str:
    return (f"{named} is pickled with protocol {protocol}, which torch.load(weights_only=True) cannot read (torch.save writes 2), and "
            f"finetune does not unpickle it otherwise (unpickling can run code): use the model's .safetensors {use}, or convert this one on "
            "a machine where you trust it")  # fmt: skip


def objects_refused_message(named: str, objects: str, use: str = "file") -> str:
    """One line for a pickle checkpoint (`named`) holding `objects` besides its tensors, which are not unpickled."""
    return (f"{named} holds objects besides its weights ({objects}), which finetune does not unpickle (pickle checkpoints are read with "
            f"torch.load(weights_only=True): unpickling can run code): use the model's .safetensors {use}, or convert this one on a "
            "machine where you trust it")  # fmt: skip


def check_single_file(path: Path, key: str) -> list[str]:
    """A .safetensors base's header: whole (else diffusers said 'Unable to load weights', with advice about
    configs that was no use), and not SDXL's (its two text encoders are under conditioner.embedders); returns
    its tensors' names."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as file:  # the header alone ("pt" would import torch)
            keys = list(file.keys())
    except (SafetensorError, OSError) as err:
        raise FinetuneError(f"base model file {path} is damaged or not a safetensors file ({' '.join(str(err).split())}; a download cut short?): "
                            f"download it again, or check {key}") from None  # fmt: skip
    if any(name.startswith("conditioner.embedders.") for name in keys):
        raise FinetuneError(f"base model file {path} is an SDXL checkpoint (conditioner.embedders names): finetune trains SD1.x and SD2.x bases; "
                            f"set {key} to one of those")  # fmt: skip
    return keys


def check_architecture(path: Path, name: str) -> None:
    """SD1.x's or SD2.x's kind of pipeline, from its configs alone (a hub base's are fetched before its weights)."""
    unet = read_config(path / "unet" / "config.json", name)
    if unet.get("addition_embed_type") or (path / "text_encoder_2").is_dir():  # SDXL's second text encoder and extra UNet inputs
        try:
            kind = f"a {json.loads((path / 'model_index.json').read_text())['_class_name']}"
        except (OSError, ValueError, TypeError, KeyError):
            kind = "an SDXL pipeline"
        raise FinetuneError(f"base model {name} holds {kind} (a second text encoder, UNet inputs of SDXL's kind): "
                            "finetune trains SD1.x and SD2.x bases; set the base to one of those")  # fmt: skip
    if unet.get("in_channels", 4) != 4:  # an inpainting UNet (9: latents, mask, masked image) or the x4 upscaler (7)
        raise FinetuneError(f"base model {name} has a UNet of {unet['in_channels']} input channels (an inpainting or upscaling model), "
                            "not a text-to-image one of 4: set the base to the model it was made from")  # fmt: skip


def check_variant(path: Path, name: str, variant: str) -> None:
    """model.variant names weights files (unet/diffusion_pytorch_model.fp16.safetensors): a folder without them
    was transformers' traceback naming the text encoder's file; saved_variant finds a folder's one variant alone."""
    for part in PART_CLASSES:
        if not any(f".{variant}." in file.name or f".{variant}-" in file.name for file in (path / part).iterdir()):
            raise FinetuneError(f"base model folder {name} has no {variant} weights in {part} (model.variant: {variant}): remove model.variant "
                                "(a folder's weights are found as saved), or give a folder saved with that variant")  # fmt: skip
