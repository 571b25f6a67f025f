"""How DreamBooth names the class images it generates (`<key>-<k>.png`, the key a hash of how they are made, which the
class folder's class_images.json records), and what that leaves unused of a concept's class prompts: apart from
`finetune.dreambooth.class_images` (torch) so that `finetune check-data` plans and checks them as training does, without torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from finetune.config import ClassImageGeneration, ModelConfig
from finetune.data.sources import folder_images


# Earlier versions made class images with a `lora.init_from` LoRA (and its dropout) active in the UNet and
# text encoder, under the same names: images of the base plus someone's LoRA, not of the base's prior.
# Which runs had one is recorded nowhere in the names, so every key of those versions is retired: their
# images are ignored (with a warning) and made again from the base alone.
MADE_FROM = {"made_from": "the base model alone"}
RECORD_FILE = "class_images.json"  # in the class folder: {key: generation_record}


def record_key(record: dict) -> str:
    """The name prefix of the class images `record` (a `generation_record`) describes."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]


def generation_record(class_prompts: list[str], settings: ClassImageGeneration, resolution: int, model: ModelConfig, mixed_precision: str) -> dict:
    """What a generated class image depends on: its prompts, the sampling settings, the base model (where it is, its
    revision or a local one's contents, the weights variant it loads, its configs, and the clip skip that encodes the
    prompts), and the precision it samples in (train.mixed_precision: the frozen base is cast to it)."""
    prompt = class_prompts[0] if len(class_prompts) == 1 else class_prompts
    source = Path(model.pretrained)
    # model.variant: a hub id's fp16 files are other weights than its full ones at the same revision (a local folder's
    # contents hold both). Records of versions without variant and mixed_precision are of unknown ones: their images are made again.
    base = {"base": str(source.resolve()) if source.exists() else model.pretrained, "revision": model.revision, "variant": model.variant,
            "clip_skip": model.clip_skip, "mixed_precision": mixed_precision}  # fmt: skip
    if source.exists():  # a folder or file retrained or merged into in place keeps its path: its contents tell
        base["base_contents"] = local_base_fingerprint(source)
    if model.single_file_config:  # a single-file base's configs: its architecture and how it samples (an SD2 file's v-prediction)
        configs = Path(model.single_file_config)
        base["single_file_config"] = str(configs.resolve()) if configs.exists() else model.single_file_config
    # Not the batch size: image k comes from its own seed whatever batch it is in (a smaller batch after
    # running out of memory must continue the images already made, not start over).
    sampling = settings.model_dump(exclude={"batch_size"})
    return {"prompt": prompt, "resolution": resolution, **sampling, **base, **MADE_FROM}


# A base's parts as diffusers lays them out (configs included: a scheduler config changes how images are sampled).
BASE_PARTS = ("model_index.json", "unet", "text_encoder", "vae", "scheduler", "tokenizer")
# How much of a file its digest reads: SAMPLE_SLICES evenly spaced slices of SLICE_BYTES (4 MiB; a smaller file whole).
# The digests are in the class folders' records: other values would make every local base's class images again.
SAMPLE_SLICES, SLICE_BYTES = 64, 65536


def local_base_fingerprint(source: Path) -> str:
    """What a local base holds, read in a few MiB: retraining a base, or merging a LoRA into it, changes
    weights all through its files, and a copy or checkout of it (new modification times) changes nothing."""
    digest = hashlib.sha256()
    for path in base_files(source):
        digest.update(f"{path.relative_to(source) if path != source else path.name}:{file_sample_digest(path)}".encode())
    return digest.hexdigest()[:16]


def base_files(source: Path) -> list[Path]:
    """A single-file base itself; a diffusers folder's part files, not hidden ones (macOS's Finder writes a
    .DS_Store into a folder it shows, which must not make every class image again)."""
    if source.is_file():
        return [source]
    files = []
    for part in (source / name for name in BASE_PARTS):
        files += sorted(f for f in part.glob("*") if f.is_file() and not f.name.startswith(".")) if part.is_dir() else [part] if part.is_file() else []
    return files


def file_sample_digest(path: Path) -> str:
    """A hash of the file's size and SAMPLE_SLICES evenly spaced slices of it (the whole of a small file)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as file:
        if size <= SAMPLE_SLICES * SLICE_BYTES:
            digest.update(file.read())
        for i in range(SAMPLE_SLICES if size > SAMPLE_SLICES * SLICE_BYTES else 0):
            file.seek(size * i // SAMPLE_SLICES)
            digest.update(file.read(SLICE_BYTES))
    return digest.hexdigest()


def generated_prompt(class_prompts: list[str], k: int) -> str:
    return class_prompts[k % len(class_prompts)]


def class_image_caption(path: Path, class_prompts: list[str]) -> str:
    """A generated image trains with the prompt that made it; a user's own class image with the first."""
    return generated_prompt(class_prompts, int(path.stem[11:])) if is_generated_name(path) else class_prompts[0]


def read_generation_records(folder: Path) -> dict[str, dict]:
    try:
        records = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):  # none yet (or earlier versions'), or damaged: only the warnings lose detail
        return {}
    # An entry edited into no record (a string, a list) is one of no known settings, not a TypeError in the warning.
    return {key: record for key, record in records.items() if isinstance(record, dict)} if isinstance(records, dict) else {}


def is_generated_name(path: Path) -> bool:
    """`<key>-<k>.png` as generation names them: a key of 10 lowercase hex digits (a user's own
    "photo_0001-00001.png" is a class image of theirs, not a generated one of other settings)."""
    stem = path.stem
    return len(stem) == 16 and stem[10] == "-" and stem[11:].isdigit() and all(c in "0123456789abcdef" for c in stem[:10])


def unused_class_prompts_warning(index: int, class_prompts: list[str], num_class_images: int, folder: Path, paths: list[Path]) -> str | None:
    """The warning line for the class prompts of dreambooth.concepts[`index`] that make no class image, or None.
    Generated image k comes from prompt k mod n, and only the images the user's own leave to make are generated
    (their own train with the first prompt): 2 own of num_class_images 4 with 3 prompts never use the third.
    `paths`: the class images planned (`plan_class_images`), the user's own first."""
    own = sum(1 for p in paths if not is_generated_name(p))  # at most num_class_images of the folder's own
    prompts, generated = len(class_prompts), len(paths) - own
    unused = prompts - max(min(generated, prompts), 1 if own else 0)
    if unused <= 0:
        return None
    all_own = sum(1 for p in folder_images(folder) if not is_generated_name(p)) if folder.is_dir() else 0
    yours = f", {own} of them your own images in {folder}" if own else ""
    return (f"warning: dreambooth.concepts[{index}] lists {prompts} class prompts and dreambooth.num_class_images is {num_class_images}{yours}: "
            f"{f'the last {unused} prompts make' if unused > 1 else 'the last prompt makes'} no class image; raise num_class_images to at least {all_own + prompts}")


def unused_own_class_images_warning(num_class_images: int, folder: Path) -> str | None:
    """The warning line for a class folder holding more of the user's own images than dreambooth.num_class_images, or None:
    only the first num_class_images of them (by name) train, and the rest were left out while training and check-data
    counted the folder as "8 images, 8 used" of its 16."""
    own = [p for p in folder_images(folder) if not is_generated_name(p)] if folder.is_dir() else []
    if len(own) <= num_class_images:
        return None
    return (f"warning: class folder {folder} holds {len(own)} of your images and dreambooth.num_class_images is {num_class_images}: "
            f"the first {num_class_images} by name train and the other {len(own) - num_class_images} (from {own[num_class_images].name} on) do not; "
            f"raise num_class_images to {len(own)} to train them all")
