"""Turning models into pictures: inference pipelines and fixed-seed generation (grids and image files: finetune/sampling/grids.py)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from finetune.models.encoders import chunks_needed, text_hidden_states
from finetune.models.loading import BaseModel
from finetune.progress_lines import in_a_log
from finetune.sampling.finite_images import SAMPLING_OVERFLOW, decoded_pixels, not_finite_line, not_finite_rows, say_warning
from finetune.sampling.placement import free_device_memory, out_of_device_memory
from finetune.sampling.prompt_options import PromptSettings
from finetune.sampling.samplers import DEFAULT_SAMPLER, sampler_of, sampler_scheduler


def build_pipeline(
    base: BaseModel, unet: torch.nn.Module | None = None, pipeline_class=StableDiffusionPipeline, as_pretrained: bool = False,
    max_token_length: int = 75, sampler: str = DEFAULT_SAMPLER, **extra,
):  # fmt: skip
    """A pipeline (StableDiffusionPipeline by default) over the base model's parts and a trained UNet,
    sampling with `sampler` (finetune/sampling/samplers.py; DDIM unless asked) for what training targets (`as_pretrained`: as the base itself was trained) and reading
    prompts as training with `max_token_length` (model.max_token_length) reads captions (as the base read them, in one
    chunk, inside `base.predicting_as_pretrained()`: the untrained step 0's "before" grid is what the base draws);
    `extra` passes further parts, e.g. controlnet= with the ControlNet pipeline class."""
    pipeline = pipeline_class(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet if unet is not None else base.unet,
        scheduler=sampler_scheduler(sampler, base.noise_scheduler.config, **(base.pretrained_schedule if as_pretrained else {})),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **extra,
    )
    pipeline.set_progress_bar_config(disable=True)
    read_prompts_as_trained(pipeline, 75 if getattr(base, "reading_as_pretrained", False) else max_token_length)
    return pipeline


@contextlib.contextmanager
def denoising_bar(pipeline, what: str, total: int):
    """The denoising steps of every image `generate` makes with `pipeline` meanwhile, `total` of them (steps x images),
    as one bar named `what` (on stderr), cleared when done, so the lines around it stay as the README quotes them: an
    SD1.5 image takes minutes on a CPU, which nothing else says (`finetune sample`, `finetune eval`; training's grids
    through `grid_progress`). One bar for all the pipeline calls: in a log file it ends on one line of its last state, which
    says it finished, where diffusers' bar of each call (a few images) had left a line per call."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=what, unit="step", leave=in_a_log()) as bar:
        pipeline.finetune_denoising_bar = bar
        try:
            yield bar
        finally:
            del pipeline.finetune_denoising_bar


_grid_bar: str | None = None  # the name of a run's grid's bar, while the main process draws it (`grid_progress`)


@contextlib.contextmanager
def grid_progress(what: str, shown: bool):
    """While a run draws a validation grid: `generate_with_settings` shows its denoising steps as a `denoising_bar` named
    `what`, where `shown` (the main process alone: under several processes one bar, not one each). The grid at step 0
    and the final samples had drawn for 6-30 s (2 CPU cores, the quickstart's) without a word. While the grid is shared
    out (`shared_between`) the bar counts this process's share of it."""
    global _grid_bar
    _grid_bar = what if shown else None
    try:
        yield
    finally:
        _grid_bar = None


@contextlib.contextmanager
def _grid_bar_drawn(pipeline, total: int):
    """`grid_progress`'s bar over `total` steps (`generate` adds a shared grid's share to it, as its batches are dealt)."""
    if _grid_bar is None:
        yield
        return
    with denoising_bar(pipeline, _grid_bar, 0 if _share is not None else total):
        yield


def denoising_steps(settings: list[PromptSettings], images_per_prompt: int) -> int:
    """The denoising steps of `images_per_prompt` images of each prompt: a bar's total."""
    return sum(images_per_prompt * prompt.num_inference_steps for prompt in settings)


def _counted_on(bar, images: int, then=None):
    """A pipeline's callback_on_step_end adding a step of `images` images to `bar`, then calling `then` (the caller's)."""

    def step_done(pipe, step, timestep, kwargs):
        bar.update(images)
        return then(pipe, step, timestep, kwargs) if then is not None else kwargs

    return step_done


def read_prompts_as_trained(pipeline, max_token_length: int) -> None:
    """Encode every prompt in at least the chunks model.max_token_length reads a caption in (150: 2 chunks of 75),
    as training encodes even a short caption: read in 77 tokens, it would hand the UNet other states than it learned."""
    pipeline.finetune_prompt_chunks = max(1, max_token_length // 75)


def trained_prompt_chunks(pipeline) -> int:
    """The chunks of 75 tokens the pipeline reads even a short prompt in (`read_prompts_as_trained`; 1 unless set)."""
    return getattr(pipeline, "finetune_prompt_chunks", 1)


def prompt_chunks(pipeline, texts: list[str]) -> int:
    """The 75-token chunks `texts` are encoded in: as many as the longest needs, at least as many as training read."""
    return max(trained_prompt_chunks(pipeline), chunks_needed(pipeline.tokenizer, texts))


def autocast_for(pipeline) -> contextlib.AbstractContextManager:
    """Autocast when some of the pipeline's weights are half precision, so fp32 parts (a LoRA, a
    ControlNet, a fully fine-tuned UNet) and a bf16/fp16 text encoder and VAE mix."""
    modules = [component for component in pipeline.components.values() if isinstance(component, torch.nn.Module)]
    parameters = [p for module in modules for p in module.parameters()]
    half = [d for d in (torch.bfloat16, torch.float16) if d in {p.dtype for p in parameters}]
    if not half:
        return contextlib.nullcontext()
    return torch.autocast(device_type=parameters[0].device.type, dtype=half[0])


# Images per pipeline call: the pixels of two 512 px images, or as many smaller ones as hold the same pixels.
# For SD1.5 that is a UNet batch of 4 with classifier-free guidance, twice what one image at a time ran, kept
# small because validation samples beside the training state (GPU memory not measured here). One call of
# many images runs the UNet on a batch: on a CPU, 16 images of 64 px take 1.5 s in one call and 8.5 s in 16.
# Lowered for the rest of the process when a call runs out of GPU memory (see `_in_batches_that_fit`).
PIXELS_PER_CALL = 2 * 512 * 512
# The batches processes share a grid's images by (`shared_between`): the size each starts with, never one a process
# lowered alone after running out of memory, so every process deals the same batches.
DEALT_PIXELS_PER_CALL = PIXELS_PER_CALL
_halving_allowed = True  # off while processes sample in lockstep (`in_lockstep`)


@dataclass
class Share:
    """Process `index` of `count` sharing out a grid (`shared_between`); `drawn`: the id() of each image it drew."""

    index: int
    count: int
    dealt: int = 0  # batches dealt so far, counted alike by every process
    drawn: set[int] = field(default_factory=set)


_share: Share | None = None  # set while processes share out the images (`shared_between`)


@contextlib.contextmanager
def shared_between(index: int, count: int):
    """Validation under several processes that each hold the whole model (DDP, DeepSpeed ZeRO-0/1/2): `generate`'s
    batches, as one process would make them, are dealt out in turn, and process `index` of `count` draws its own, leaving
    None where another process draws. Each image keeps its seed and its batch: the grid is the one a single process
    draws. Yields the `Share`, whose `drawn` names this process's images for the gather (`finetune.training.validation`)."""
    global _share
    _share = Share(index, count)
    try:
        yield _share
    finally:
        _share = None


def _dealt_here(jobs: list, pixels_per_image: int) -> list[list]:
    """The batches of `jobs` this process draws: all of them, or while shared out (`shared_between`) every count-th."""
    if _share is None:
        return [jobs]
    size = max(1, DEALT_PIXELS_PER_CALL // pixels_per_image)
    batches = [jobs[start : start + size] for start in range(0, len(jobs), size)]
    first, _share.dealt = _share.dealt, _share.dealt + len(batches)
    return [batch for n, batch in enumerate(batches, first) if n % _share.count == _share.index]


@contextlib.contextmanager
def in_lockstep():
    """Sampling in step with other processes (validation under ZeRO-3, where each forward gathers the weights from
    all of them): one process must not remake a batch in halves alone, or their gathers no longer pair up and the
    run hangs; out of memory then stops the run, as it would without halving."""
    global _halving_allowed
    _halving_allowed = False
    try:
        yield
    finally:
        _halving_allowed = True


@torch.no_grad()
def generate(
    pipeline,
    prompts: list[str],
    images_per_prompt: int,
    seed: int | list[int],
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    negative_prompt: str | list[str | None] | None = None,
    conditions: list[Image.Image] | None = None,
    not_finite_cause: str = SAMPLING_OVERFLOW,
    warn: Callable[[str], None] = say_warning,
    **call_kwargs,
) -> list[list[Image.Image]]:
    """images[p][k] for prompt p and seed `seed + k`: the same seeds for every prompt and every run.

    `seed` and `negative_prompt` may be lists, one per prompt (prompt p's first seed, its negative);
    `conditions`: a ControlNet conditioning image per prompt (one for all goes in `call_kwargs` as `image`).
    The images are made in batches of up to PIXELS_PER_CALL pixels, each from its own seeded generator:
    an image is the one it would be alone, up to float rounding. While processes share out a grid (`shared_between`),
    an image another process draws is None here.
    A prompt (or negative prompt) longer than the text encoder's 77 tokens is read whole, in chunks of 75
    as training with model.max_token_length reads captions (the webui reads long prompts in chunks too);
    a shorter one in as many chunks as training read captions in (`read_prompts_as_trained`).
    Images that decode to NaN or inf are kept (black where not finite), and `warn` is given one line per pipeline call
    naming their prompts and seeds and `not_finite_cause`, their likely cause.
    """
    seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
    negatives = [text or "" for text in (negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * len(prompts))]
    # (prompt, image) pairs grouped by the number of 75-token chunks their texts take: a batch is encoded
    # in one number of chunks, and a short prompt read as two would not draw what it draws alone.
    by_chunks: dict[int, list[tuple[int, int]]] = {}
    for p in range(len(prompts)):
        by_chunks.setdefault(prompt_chunks(pipeline, [prompts[p], negatives[p]]), []).extend((p, k) for k in range(images_per_prompt))

    bar = getattr(pipeline, "finetune_denoising_bar", None)  # `denoising_bar`'s

    def make(batch: list[tuple[int, int]]) -> list[Image.Image]:
        extra = dict(call_kwargs, image=[conditions[p] for p, _ in batch]) if conditions is not None else call_kwargs
        if bar is None:
            return call(batch, extra)
        counted_before = bar.n
        try:
            return call(batch, dict(extra, callback_on_step_end=_counted_on(bar, len(batch), extra.get("callback_on_step_end"))))
        except RuntimeError as err:
            if out_of_device_memory(err):  # a batch remade in halves counts once
                bar.n = counted_before
                bar.refresh()
            raise

    def call(batch: list[tuple[int, int]], extra: dict) -> list[Image.Image]:
        with autocast_for(pipeline):
            decoded = pipeline(
                **prompt_arguments(pipeline, [prompts[p] for p, _ in batch], [negatives[p] for p, _ in batch]),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=[torch.Generator("cpu").manual_seed(seeds[p] + k) for p, k in batch],
                output_type="pt",  # checked before it becomes 8-bit pixels, where NaN is black (numpy's "invalid value encountered in cast")
                **extra,
            ).images
        if rows := not_finite_rows(decoded):
            warn(not_finite_line([(prompts[batch[row][0]], seeds[batch[row][0]] + batch[row][1]) for row in rows], not_finite_cause))
        return decoded_pixels(pipeline, decoded)

    images = {}
    dealt = [batch for jobs in by_chunks.values() for batch in _dealt_here(jobs, resolution * resolution)]
    if bar is not None and _share is not None:  # a shared grid's bar (`grid_progress`): this process's share, known now
        bar.total += num_inference_steps * sum(len(batch) for batch in dealt)
        bar.refresh()
    for batch in dealt:
        images.update(_in_batches_that_fit(make, batch, resolution * resolution))
    if _share is not None:
        _share.drawn.update(id(image) for image in images.values())
    return [[images.get((p, k)) for k in range(images_per_prompt)] for p in range(len(prompts))]  # None: another process draws it


def _in_batches_that_fit(make, jobs: list, pixels_per_image: int) -> dict:
    """{job: image} from `make(batch)` over batches of up to `PIXELS_PER_CALL` pixels. A batch that runs out
    of GPU memory is made again in halves, and the smaller size kept for later calls (validation beside a
    training state on a small GPU); one image that does not fit raises as before."""
    global PIXELS_PER_CALL  # a process-wide limit: the GPU is the same for every later call
    images, pending = {}, list(jobs)
    while pending:
        batch = pending[: max(1, PIXELS_PER_CALL // pixels_per_image)]
        try:
            images.update(zip(batch, make(batch)))
            pending = pending[len(batch) :]
            continue
        except RuntimeError as err:
            if not out_of_device_memory(err) or len(batch) == 1 or not _halving_allowed:
                raise
        # Out of the except block, so the failed call's tensors (held by its traceback) are freed first.
        PIXELS_PER_CALL = max(pixels_per_image, len(batch) // 2 * pixels_per_image)
        free_device_memory()
        print(f"sampling: {len(batch)} images at once ran out of GPU memory; making {len(batch) // 2} at a time from now on")
    return images


def generate_with_settings(
    pipeline, settings: list[PromptSettings], images_per_prompt: int, resolution: int, conditions: list[Image.Image] | None = None, **call_kwargs
) -> list[list[Image.Image]]:
    """`generate` for prompts with their own options (finetune/sampling/prompt_options.py): one row per prompt, prompts
    of the same steps, guidance and sampler in one batch; `conditions` as there, one per prompt. A prompt's sampler
    (--ss) is made on the pipeline's noise schedule (`sampler_scheduler`), the pipeline's own sampler meanwhile set aside."""
    rows: list[list[Image.Image]] = [[] for _ in settings]
    # A --ss naming the pipeline's own sampler draws in the batch of the prompts without one (None: the pipeline's own).
    own = sampler_of(pipeline.scheduler) if any(prompt.sampler for prompt in settings) else None
    groups: dict[tuple[int, float, str | None], list[int]] = {}
    for i, prompt in enumerate(settings):
        groups.setdefault((prompt.num_inference_steps, prompt.guidance_scale, None if prompt.sampler == own else prompt.sampler), []).append(i)
    # Every sampler made before the first image: one that cannot draw on this schedule is refused before any drawing.
    schedulers = {name: sampler_scheduler(name, pipeline.scheduler.config) for _, _, name in groups if name is not None}
    with _grid_bar_drawn(pipeline, denoising_steps(settings, images_per_prompt)):
        for (steps, guidance, sampler), members in groups.items():
            with _drawing_with(pipeline, schedulers.get(sampler)):
                made = generate(
                    pipeline, [settings[i].prompt for i in members], images_per_prompt, [settings[i].seed for i in members], steps, guidance,
                    resolution, [settings[i].negative_prompt for i in members], None if conditions is None else [conditions[i] for i in members],
                    **call_kwargs,
                )  # fmt: skip
            for i, row in zip(members, made):
                rows[i] = row
    return rows


@contextlib.contextmanager
def _drawing_with(pipeline, scheduler):
    """`pipeline` drawing with `scheduler` meanwhile (a prompt's --ss), its own given back after; None: with its own."""
    if scheduler is None:
        yield
        return
    own, pipeline.scheduler = pipeline.scheduler, scheduler
    try:
        yield
    finally:
        pipeline.scheduler = own


def prompt_arguments(pipeline, prompt: str | list[str], negative_prompt: str | list[str] | None) -> dict:
    """The pipeline's prompt arguments (one prompt, or a batch): the texts, or for a prompt past 77 tokens (or a
    pipeline reading prompts as training with model.max_token_length read them) all encoded in chunks (the same
    number for prompts and negatives: classifier-free guidance stacks them)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = list(negative_prompt) if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
    chunks = prompt_chunks(pipeline, prompts + negatives)
    if chunks == 1:
        return {"prompt": prompt, "negative_prompt": negative_prompt}
    encode = lambda texts: text_hidden_states(pipeline.tokenizer, pipeline.text_encoder, texts, pipeline.text_encoder.device, chunks)
    return {"prompt_embeds": encode(prompts), "negative_prompt_embeds": encode(negatives)}
