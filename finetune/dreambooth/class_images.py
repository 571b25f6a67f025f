"""Class images for DreamBooth's prior preservation: reuse what is there, generate only what is missing.

Generated files are named `<prompt-hash>-<k>.png`: the hash (of the class prompts and the generation
settings) keeps images of other prompts from ever being counted, and image k is always made from
prompt `k mod len(prompts)` and seed `seed + k`, so an interrupted generation continues where it
stopped and reproduces exactly what an uninterrupted one would have made. In distributed runs each
process generates its share. The folder's class_images.json records what each hash stands for.
The names, keys and records are `finetune.dreambooth.class_image_names`'s, the plan of which images to train on and
make `finetune.dreambooth.class_image_plans`'s: both torch-free, for `finetune check-data`; this module generates them.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from finetune.config import ClassImageGeneration
from finetune.console import say
from finetune.dreambooth.class_image_names import RECORD_FILE, generated_prompt, read_generation_records
from finetune.errors import FinetuneError
from finetune.models.encoders import chunks_needed
from finetune.outputs.atomic_files import atomic_write_text
from finetune.sampling.finite_images import decoded_pixels, not_finite_rows
from finetune.sampling.grids import save_image_atomic
from finetune.sampling.pipelines import autocast_for, prompt_arguments
from finetune.sampling.placement import free_device_memory, out_of_device_memory
from finetune.sampling.samplers import spacing_steps_problem


def write_generation_record(folder: Path, key: str, record: dict) -> None:
    """Add how images `<key>-*.png` are made to the folder's RECORD_FILE (the names are a hash): the warning
    of a later run with other settings can then say which setting changed."""
    records = read_generation_records(folder)
    records[key] = record
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / RECORD_FILE, json.dumps(records, indent=1, sort_keys=True))  # a stop mid-write keeps the old records


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
    # The base's own schedule draws them (as it samples itself): spaced "trailing", some step counts end at timestep -1.
    if problem := spacing_steps_problem(pipeline.scheduler, settings.num_inference_steps):
        raise FinetuneError(f"dreambooth.class_generation.num_inference_steps: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    mine = indices[process_index::num_processes]
    # Batches of prompts read in the same number of 75-token chunks: a short prompt batched with a long one
    # would be read in as many, and draw another image than it draws alone (finetune.sampling.pipelines.generate).
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
                except RuntimeError as err:
                    if not out_of_device_memory(err) or len(batch) == 1:  # one image that does not fit: nothing smaller to try
                        raise
                    images = None
                if images is None:  # out of the except block, so the failed call's tensors (held by its traceback) are freed first
                    # dreambooth.class_generation.batch_size is the most at once, not a promise: image k comes from seed + k in any
                    # batch, so halving makes the same images (batch_size 1000000 had one call hold every missing image).
                    size = len(batch) // 2
                    free_device_memory()
                    say(f"class images: {len(batch)} at once ran out of GPU memory; making {size} at a time from now on "
                        f"(dreambooth.class_generation.batch_size: {size} starts there)", by="this process")  # its own device
                    continue
                _refuse_not_finite(images, [generated_prompt(class_prompts, k) for k in batch], settings, folder)
                for k, image in zip(batch, decoded_pixels(pipeline, images)):
                    save_image_atomic(image, folder / f"{key}-{k:05d}.png")
                    written += 1
                group = group[len(batch) :]
                progress.update(len(batch))
    return written


def generate_on_every_process(accelerator, generate: Callable[[], object] | None) -> None:
    """Collective, on every process (also one with nothing to make): `generate()`, this process's share of a folder's missing
    class images (None where none are missing), then wait for the others. A FinetuneError of any process (its images decoded to
    NaN: `_refuse_not_finite`) is raised on every process, the lowest rank's line, said once per machine: raised on that process
    alone, it was said after seconds (`finetune.distributed.error_exchange.says_its_error`) while the others waited for it in the barrier, and
    they ended with gloo's traceback of a closed connection."""
    failure = None
    try:
        if generate is not None:
            generate()
    except FinetuneError as err:
        if accelerator.num_processes == 1:
            raise
        failure = str(err)
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    failures = [line for line in gather_object([failure]) if line is not None]  # by rank; also every process's barrier
    if failures:
        raise FinetuneError(failures[0])


def _refuse_not_finite(decoded: torch.Tensor, prompts: list[str], settings: ClassImageGeneration, folder: Path) -> None:
    """Class images that decode to NaN or inf would be saved black and train the class prior on black: stop before any of
    the batch is written (those already made stay, and the next run continues from them)."""
    if not (rows := not_finite_rows(decoded)):
        return
    prompt = prompts[rows[0]]
    raise FinetuneError(
        f"class images of the class prompt '{prompt}' decoded to NaN or inf (black), at dreambooth.class_generation.guidance_scale "
        f"{settings.guidance_scale:g}: lower it (7.5 is usual); none of them was written to {folder}, and the next run continues its class images"
    )


def _make(pipeline, class_prompts: list[str], batch: list[int], settings: ClassImageGeneration, resolution: int) -> torch.Tensor:
    """Class images `batch` (their indices k) in one call, each from its own seed, as decoded (values in [0, 1], or not
    finite): made into pixels as the pipeline's own "pil" output makes them once they are checked."""
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
            output_type="pt",
        ).images

