"""Class images for DreamBooth's prior preservation: reuse what is there, generate only what is missing.

Generated files are named `<prompt-hash>-<k>.png`: the hash (of the class prompts and the generation
settings) keeps images of other prompts from ever being counted, and image k is always made from
prompt `k mod len(prompts)` and seed `seed + k`, so an interrupted generation continues where it
stopped and reproduces exactly what an uninterrupted one would have made. In distributed runs each
process generates its share. The folder's class_images.json records what each hash stands for.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.atomic_files import atomic_write_text
from finetune.class_image_names import is_generated_name
from finetune.config import ClassImageGeneration, ModelConfig
from finetune.console import say, warn
from finetune.counts import counted
from finetune.encoders import chunks_needed
from finetune.sampling import autocast_for, prompt_arguments, save_image_atomic
from finetune.sources import folder_images



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


def file_sample_digest(path: Path, slices: int = 64, slice_bytes: int = 65536) -> str:
    """A hash of the file's size and `slices` evenly spaced slices of it (the whole of a small file)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as file:
        if size <= slices * slice_bytes:
            digest.update(file.read())
        for i in range(slices if size > slices * slice_bytes else 0):
            file.seek(size * i // slices)
            digest.update(file.read(slice_bytes))
    return digest.hexdigest()


def generated_prompt(class_prompts: list[str], k: int) -> str:
    return class_prompts[k % len(class_prompts)]


def class_image_caption(path: Path, class_prompts: list[str]) -> str:
    """A generated image trains with the prompt that made it; a user's own class image with the first."""
    return generated_prompt(class_prompts, int(path.stem[11:])) if is_generated_name(path) else class_prompts[0]


def plan_class_images(folder: Path, key: str, wanted: int) -> tuple[list[Path], list[int]]:
    """(the class images to train on, indices k still to generate) for `wanted` images in `folder`.

    Images a user put in the folder count first (sorted by name); generated images of this key fill
    the rest. Generated images of another key (another prompt or settings) are never used.
    """
    files = folder_images(folder) if folder.is_dir() else []
    user_images = [p for p in files if not is_generated_name(p)][:wanted]
    needed = wanted - len(user_images)
    generated = [folder / f"{key}-{k:05d}.png" for k in range(needed)]
    missing = [k for k, path in enumerate(generated) if not path.is_file()]
    return user_images + generated, missing


def write_generation_record(folder: Path, key: str, record: dict) -> None:
    """Add how images `<key>-*.png` are made to the folder's RECORD_FILE (the names are a hash): the warning
    of a later run with other settings can then say which setting changed."""
    records = read_generation_records(folder)
    records[key] = record
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / RECORD_FILE, json.dumps(records, indent=1, sort_keys=True))  # a stop mid-write keeps the old records


def read_generation_records(folder: Path) -> dict[str, dict]:
    try:
        records = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):  # none yet (or earlier versions'), or damaged: only the warnings lose detail
        return {}
    # An entry edited into no record (a string, a list) is one of no known settings, not a TypeError in the warning.
    return {key: record for key, record in records.items() if isinstance(record, dict)} if isinstance(records, dict) else {}


def changed_settings(made: dict, now: dict) -> str:
    """'guidance_scale 7.5 (now 5.0), ...': what images made as `made` describes were made with otherwise; a setting
    `made` lacks (an earlier version's record) as unknown, not as None."""
    changed = [f"{name} {made[name]!r} (now {now.get(name)!r})" for name in sorted(made) if made[name] != now.get(name)]
    unrecorded = sorted(now.keys() - made.keys())
    if unrecorded:
        changed.append(f"{' and '.join(unrecorded)} unknown (an earlier version of finetune, which did not record {'them' if len(unrecorded) > 1 else 'it'})")
    return ", ".join(changed)


def warn_of_unused_generated_images(folder: Path, records: dict[str, dict]) -> None:
    """A warning for the generated images in `folder` that no key of this run uses (`records`: how every
    concept whose class folder it is makes its images; they share it without making each other's unused),
    saying what they were made with where the folder's record knows."""
    named_generated = [p for p in (folder_images(folder) if folder.is_dir() else []) if is_generated_name(p)]
    # Generation writes and reuses `<key>-<k>.png` alone: one converted to JPEG (or renamed .PNG) was left out unsaid, even of this run's key.
    not_png = [p.name for p in named_generated if p.suffix != ".png" and not _same_file(p.with_suffix(".png"), p)]  # .PNG is .png on macOS
    if not_png:
        warn(f"{folder}: ignoring {counted(len(not_png), 'file')} named as generated class images are but not .png (e.g. {not_png[0]}): "
             "generation reuses only the .png it writes; give your own class images another name to train them")  # fmt: skip
    unused = Counter(p.stem[:10] for p in named_generated if p.name not in not_png and p.stem[:10] not in records)
    made = read_generation_records(folder)
    for key, count in sorted(unused.items()):
        if key in made:  # told against the closest setup of this run (one per concept sharing the folder)
            why = min((changed_settings(made[key], now) for now in records.values()), key=lambda line: line.count(" (now "))
            warn(f"{folder}: ignoring {counted(count, 'generated image')} made with {why}")
    unrecorded = sum(count for key, count in unused.items() if key not in made)
    if unrecorded:
        warn(f"{folder}: ignoring {counted(unrecorded, 'generated image')} of another class prompt, generation settings, resolution or base model, "
             "or of an earlier version of finetune")


def _same_file(path: Path, other: Path) -> bool:
    return path.is_file() and os.path.samefile(path, other)


@contextmanager
def as_loaded_base(*models: torch.nn.Module):
    """The models as the base was loaded: LoRA layers off (a `lora.init_from` start is already in them),
    and in eval mode (LoRA dropout would draw from the device's random numbers); restored afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for model in models for module in model.modules() if isinstance(module, BaseTunerLayer)]
    trainable = {parameter: parameter.requires_grad for model in models for parameter in model.parameters()}
    modes = [(model, model.training) for model in models]
    for layer in layers:
        layer.enable_adapters(False)
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in trainable.items():  # peft's enable_adapters sets its own
            parameter.requires_grad_(flag)
        for model, training in modes:
            model.train(training)


@torch.no_grad()
def generate_class_images(
    pipeline,
    class_prompts: list[str],
    folder: Path,
    key: str,
    indices: list[int],
    settings: ClassImageGeneration,
    resolution: int,
    process_index: int = 0,
    num_processes: int = 1,
) -> int:
    """Generate this process's share of `indices`; returns how many images it wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    mine = indices[process_index::num_processes]
    # Batches of prompts read in the same number of 75-token chunks: a short prompt batched with a long one
    # would be read in as many, and draw another image than it draws alone (finetune.sampling.generate).
    by_chunks: dict[int, list[int]] = {}
    for k in mine:
        by_chunks.setdefault(chunks_needed(pipeline.tokenizer, [generated_prompt(class_prompts, k), settings.negative_prompt or ""]), []).append(k)
    written, size = 0, settings.batch_size
    name = f"'{class_prompts[0]}'" + (f" and {len(class_prompts) - 1} more prompts" if len(class_prompts) > 1 else "")
    with tqdm(total=len(mine), desc=f"class images {name}", unit="image", disable=process_index != 0 or not mine) as progress:
        for group in by_chunks.values():
            while group:
                batch = group[:size]
                try:
                    images = _make(pipeline, class_prompts, batch, settings, resolution)
                except torch.OutOfMemoryError:
                    if len(batch) == 1:  # one image that does not fit: nothing smaller to try
                        raise
                    images = None
                if images is None:  # out of the except block, so the failed call's tensors (held by its traceback) are freed first
                    # dreambooth.class_generation.batch_size is the most at once, not a promise: image k comes from seed + k in any
                    # batch, so halving makes the same images (batch_size 1000000 had one call hold every missing image).
                    size = len(batch) // 2
                    _free_device_memory()
                    say(f"class images: {len(batch)} at once ran out of GPU memory; making {size} at a time from now on "
                        f"(dreambooth.class_generation.batch_size: {size} starts there)", by="this process")  # its own device
                    continue
                for k, image in zip(batch, images):
                    save_image_atomic(image, folder / f"{key}-{k:05d}.png")
                    written += 1
                group = group[len(batch) :]
                progress.update(len(batch))
    return written


def _make(pipeline, class_prompts: list[str], batch: list[int], settings: ClassImageGeneration, resolution: int) -> list:
    """Class images `batch` (their indices k) in one call, each from its own seed."""
    generators = [torch.Generator("cpu").manual_seed(settings.seed + k) for k in batch]
    negatives = [settings.negative_prompt] * len(batch) if settings.negative_prompt else None
    with autocast_for(pipeline):
        return pipeline(
            **prompt_arguments(pipeline, [generated_prompt(class_prompts, k) for k in batch], negatives),
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            height=resolution,
            width=resolution,
            generator=generators,
        ).images


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.empty_cache()
