"""What the browser demo does, without the browser: render comparisons of the adapters in a folder.

Kept apart from `finetune.demo.page` (the Gradio page) so it can be tested and reused without a web
server, and so every safety rule lives in one place that the page cannot go around:

- Adapters are found by scanning one folder (`finetune.demo.adapter_scan`) and are addressed by **name**
  (their path relative to that folder; a run's LoRA, pipeline or ControlNet by its run's). A request names
  adapters; `DemoEngine.adapter` looks the name up in the last scan and refuses anything else, so no path from
  the browser ever reaches the file system.
- Only safetensors adapters are read. Pickle files (`.bin`, `.ckpt`, `.pt`, `.pth`) found while scanning are
  listed as refused, with the reason, and never loaded (unpickling can run code); so are a ControlNet's and the UNet
  its run saved beside it (`inference.load_unlocked_decoder`), which load with use_safetensors. A `.ckpt` *base* (`--base`,
  given by whoever starts the demo) loads as `finetune sample` loads it: `torch.load(weights_only=True)`.
- LoRAs are applied for one column by forward hooks beside the weights (`finetune.demo.lora_hooks`), as peft's
  layers do in `finetune sample`, so the demo's image is sample's.
- Every adapter is checked against the model's shapes before anything renders, so a LoRA or
  ControlNet trained on another base is one readable sentence, not a stack trace.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from finetune.config import ModelConfig
from finetune.controlnet.conditioning_records import kind_mismatch_line, recorded_kind, recorded_options
from finetune.controlnet.folder import check_controlnet_fits, weights_variant
from finetune.counts import counted
from finetune.demo.adapter_scan import BASE, PICKLE_SUFFIXES, Adapter, adapter_files_stamp, by_name, listed_name, scan_adapters
from finetune.demo.conditioning import conditioning_image
from finetune.demo.inputs import UPLOADED, other_kind_notes
from finetune.demo.lora_hooks import loras_applied
from finetune.errors import FinetuneError
from finetune.formats.kohya import LoRA, load_lora
from finetune.formats.lora_base_fit import lora_base_problem
from finetune.formats.merge import check_lora_fits
from finetune.models.encoders import clip_skipped
from finetune.models.loading import BaseModel, freeze, load_base_model
from finetune.sampling.adapter_records import saved_model_metadata
from finetune.sampling.adapters_as_trained import adapters_clip_skip, adapters_max_token_length, adapters_prediction_type, adapters_zero_terminal_snr, follow_adapters_schedule  # fmt: skip
from finetune.sampling.finite_images import say_warning
from finetune.sampling.inference import base_model_metadata, load_unlocked_decoder, refuse_replacing_a_fine_tuned_unet, unlocked_decoder_folder
from finetune.sampling.pipelines import build_pipeline, generate, read_prompts_as_trained
from finetune.sampling.placement import inference_placement, place
from finetune.sampling.prompt_options import PromptSettings, guidance_notes, unread_options_notes, webui_syntax_notes
from finetune.sampling.samplers import DEFAULT_SAMPLER, sampler_named, spacing_steps_problem

CACHE_SIZE = {"lora": 8, "controlnet": 2, "pipeline": 1}


# --- rendering -----------------------------------------------------------------------------------


@dataclass
class Request:
    """One comparison: columns = [base alone] + [adapters at each strength], rows = seeds."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    size: int = 64
    model: str = BASE
    loras: list[tuple[str, float]] = field(default_factory=list)
    controlnet: str | None = None
    conditioning_image: Image.Image | None = None
    conditioning_source: str = UPLOADED  # how messages name the upload (`demo_inputs.upload_source`: its file name)
    conditioning_kind: str = "as uploaded"
    conditioning_scale: float = 1.0
    strengths: list[float] = field(default_factory=lambda: [1.0])
    include_base: bool = True
    rows: int = 1
    separate: bool = False  # each LoRA in columns of its own (compare runs, or a run's steps), not all together
    sampler: str = DEFAULT_SAMPLER  # finetune/sampling/samplers.py's names, sd-scripts' or the webui's (`sampler_named`)


@dataclass
class Column:
    """One column of a comparison: a model with adapters at their strengths."""

    label: str
    model: BaseModel
    loras: list[tuple[LoRA, float]]
    names: list[str]  # the adapters in it: their metadata set the prediction type and clip skip
    controlnet: object = None
    unet: torch.nn.Module | None = None  # a ControlNet's own UNet (controlnet.unlock_unet_decoder), else the model's
    scale: float = 0.0


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise FinetuneError(f"strengths '{text}' must be numbers separated by commas, e.g. 0.5, 1.0") from None
    # Written as a range so that "nan" (which float() reads, and which renders black images) is refused too.
    if not values or len(values) > 6 or not all(-4 <= v <= 4 for v in values):
        raise FinetuneError("give 1 to 6 strengths between -4 and 4, e.g. 0.5, 1.0")
    return values


class DemoEngine:
    """Holds the base model and the last scan; renders `Request`s (one at a time, under a lock)."""

    def __init__(self, base: str, adapters_dir: Path, exclude: tuple[Path, ...] = (), base_config: str | None = None,
                 device: str = "auto", precision: str = "auto"):  # fmt: skip
        # A .ckpt loads as `finetune sample` loads it (finetune.models.loading: weights-only, one holding other objects refused in
        # one line as it is located); other pickle files are no single-file model diffusers reads.
        if (suffix := Path(base).suffix.lower()) in PICKLE_SUFFIXES and suffix != ".ckpt":
            raise FinetuneError(f"base model {base} is a {suffix} pickle file: give a diffusers folder, or a single .safetensors or .ckpt file")
        self.base_name, self.adapters_dir, self.exclude = base, Path(adapters_dir), exclude
        self.placement = inference_placement(device, precision)  # every model the demo loads goes there (finetune/sampling/placement.py)
        self.base = self._frozen(load_base_model(ModelConfig.from_option(base, base_config)))
        # A fine-tuned or merged pipeline as the base: what it was trained with (clip skip) holds in every column.
        self.base_metadata = base_model_metadata(base)
        self.lock = threading.Lock()
        self._cache: dict[tuple, object] = {}
        self.adapters: dict[str, Adapter] = {}
        self._last_made: tuple[tuple, Image.Image] | None = None  # (upload's digest, kind, options), the condition made of it
        self.rescan()

    def rescan(self) -> dict[str, Adapter]:
        self.adapters = scan_adapters(self.adapters_dir, self.exclude)
        # A new dict, not the old one cleared: a render in another thread may be going over the old one.
        self._cache = {}
        return self.adapters

    def names(self, kind: str) -> list[str]:
        return [a.name for a in self.adapters.values() if a.kind == kind and not a.refused]

    def adapter(self, name: str, kind: str) -> Adapter:
        """The scanned adapter called `name`: the only way a request reaches a file."""
        adapter = by_name(self.adapters, self.adapters_dir, name)  # (a run's pipeline or ControlNet by its folder too: db/pipeline)
        if adapter is None or adapter.kind != kind:
            raise FinetuneError(f"unknown {kind} '{name}': pick one from the list (press Rescan for newly trained ones)")
        if adapter.refused:
            raise FinetuneError(f"{kind} '{name}' cannot be used: {adapter.refused}")
        return adapter

    def _cached(self, adapter: Adapter, load: Callable[[], object]) -> object:
        """Loaded adapters, keyed by what their files' stat says of their content (a retrained or copied file is read
        again: adapter_scan.adapter_files_stamp); at most CACHE_SIZE of a kind stay in memory (a DreamBooth pipeline is a whole model)."""
        try:
            stamp = adapter_files_stamp(adapter)
        except OSError:
            raise FinetuneError(f"{adapter.kind} '{adapter.name}' is gone from {self.adapters_dir}: press Rescan") from None
        key = (adapter.kind, str(adapter.path), stamp)
        value = self._cache.get(key)
        if value is None:
            # The oldest let go before the load, not after: a DreamBooth pipeline is a whole model, and switching held
            # two of them (the one kept and the one loading), twice the memory a GPU needs for one.
            same_kind = [k for k in self._cache if k[0] == adapter.kind]
            for old in same_kind[: max(0, len(same_kind) - CACHE_SIZE[adapter.kind] + 1)]:
                self._cache.pop(old, None)
            value = self._cache[key] = load()
        return value

    def model(self, name: str) -> BaseModel:
        if name in (BASE, "", None):
            return self.base
        adapter = self.adapter(name, "pipeline")
        return self._cached(adapter, lambda: self._frozen(load_base_model(ModelConfig(pretrained=str(adapter.path)))))

    def _frozen(self, model: BaseModel) -> BaseModel:
        for part in (model.unet, model.vae, model.text_encoder):
            place(freeze(part), *self.placement)
        return model

    def render(self, request: Request, progress: Callable[[int, int], None] | None = None):
        """(images[row][column], column labels, the row's seeds, a one-line summary)."""
        with self.lock:
            return self._render(request, progress or (lambda done, total: None))

    def _render(self, request: Request, progress):
        started = time.perf_counter()
        try:  # by any name the samplers have ("Euler a", as the webui and the page's list name it): ours from here on
            request = replace(request, sampler=sampler_named(request.sampler))
        except ValueError as err:
            raise FinetuneError(f"sampler: {err}") from None
        _check_request(request)
        request = self._as_listed(request)
        model = self.model(request.model)
        models = {"unet": model.unet, "text_encoder": model.text_encoder}
        loras = []
        for name, strength in request.loras:
            adapter = self.adapter(name, "lora")
            _check_lora_header_fits(adapter, model)  # before the file is read whole
            lora = self._cached(adapter, lambda: load_lora(adapter.path))
            _check_lora_fits(models, lora, name, model.source)
            loras.append((lora, strength))
        controlnet = condition = decoder = None
        kind_notes: list[str] = []
        if request.controlnet:
            adapter = self.adapter(request.controlnet, "controlnet")
            controlnet, decoder = self._cached(adapter, lambda: place(_load_controlnet(adapter.path), *self.placement))
            if decoder is not None and (model is not self.base or self.base_metadata):
                refuse_replacing_a_fine_tuned_unet(request.controlnet, request.model if model is not self.base else self.base_name)
            check_controlnet_fits(controlnet.config, model.unet.config, f"ControlNet '{request.controlnet}'", model.source)
            recorded = self._metadata_now(request.controlnet)
            made_with = recorded_options(recorded, request.conditioning_kind, f"ControlNet {request.controlnet}")
            kind_notes = other_kind_notes(recorded, request.conditioning_kind, request.controlnet)
            if request.conditioning_kind == "as uploaded" and request.conditioning_image is not None and (line := kind_mismatch_line(
                    request.conditioning_image, recorded_kind(recorded), f"the conditioning image {request.conditioning_source}", "pick {kind} to make one of it")):  # fmt: skip
                kind_notes.append(line)
            condition = conditioning_image(request.conditioning_image, request.conditioning_kind, request.size, made_with, self._made_condition,
                                           request.conditioning_source)  # fmt: skip
        columns = self._columns(request, model, loras, controlnet, decoder)
        pipelines = []
        # Adapters that cannot be combined, or steps their schedule cannot draw, stop the request before anything renders.
        for column in columns:
            trained_for = self._trained_for(column)
            adapters_prediction_type(trained_for)
            adapters_zero_terminal_snr(trained_for)
            adapters_clip_skip(trained_for)
            unet = column.unet or column.model.unet
            pipeline = _pipeline(column.model, column.controlnet, unet, request.sampler)
            follow_adapters_schedule(pipeline, trained_for)
            if problem := spacing_steps_problem(pipeline.scheduler, request.steps):  # a last step at timestep -1
                raise FinetuneError(f"steps, in column {column.label}: {problem}")
            pipelines.append((pipeline, unet))
        total, done, in_call = max(1, len(columns) * request.rows * request.steps), 0, 0
        results: list[list[Image.Image]] = [[] for _ in range(request.rows)]
        warned: list[str] = []  # images that decoded to NaN or inf: said on the page, and in the terminal as sample says it
        for column, (pipeline, unet) in zip(columns, pipelines):
            trained_for = self._trained_for(column)
            read_prompts_as_trained(pipeline, adapters_max_token_length(trained_for))
            extra = dict(image=condition, controlnet_conditioning_scale=column.scale) if column.controlnet is not None else {}

            def step_done(pipe, step, timestep, kwargs):
                # Image-steps of the pipeline call under way (its rows are denoised together), counted as done when
                # the call ends: a call that runs out of GPU memory is made again in halves and must not count twice.
                nonlocal done, in_call
                in_call = (step + 1) * len(kwargs["latents"])
                if step + 1 == request.steps:
                    done, in_call = done + in_call, 0
                progress(done + in_call, total)
                return kwargs

            with loras_applied({"unet": unet, "text_encoder": column.model.text_encoder}, column.loras), \
                    clip_skipped(column.model.text_encoder, adapters_clip_skip(trained_for)):
                images = generate(pipeline, [request.prompt], request.rows, request.seed, request.steps, request.guidance, request.size,
                                  negative_prompt=request.negative_prompt or None, callback_on_step_end=step_done, warn=warned.append, **extra)[0]
            for row, image in zip(results, images):
                row.append(image)
        labels = [column.label for column in columns]
        if condition is not None:
            labels, results = ["conditioning", *labels], [[condition, *row] for row in results]
        seeds = [request.seed + r for r in range(request.rows)]
        asked = PromptSettings(request.prompt, request.negative_prompt, request.seed, request.guidance, request.steps)
        # A negative prompt at guidance 1 or below changes nothing (no classifier-free guidance): said, as sample says it.
        said = guidance_notes([asked], "the guidance") + webui_syntax_notes([asked]) + unread_options_notes([request.prompt, request.negative_prompt]) + kind_notes
        for line in warned:
            say_warning(line)
        notes = "".join(f"; warning: {line}" for line in warned) + "".join(f"; note: {note}" for note in said)
        return results, labels, seeds, summary_of(len(columns), request.rows, time.perf_counter() - started) + notes

    def _as_listed(self, request: Request) -> Request:
        """`request` with each adapter by the name the list shows, which its labels and notes name (`listed_name`)."""
        listed = functools.partial(listed_name, self.adapters, self.adapters_dir)
        return replace(request, model=listed(request.model, "pipeline"), controlnet=listed(request.controlnet, "controlnet"),
                       loras=[(listed(name, "lora"), strength) for name, strength in request.loras])

    def _made_condition(self, image: Image.Image, kind: str, **options) -> Image.Image:
        """`make_condition` of an upload at its full size, kept for the next request: a large photo's canny edges take
        seconds, and the page is often rendered again with the same photo (another prompt, seed or strength)."""
        from finetune.controlnet.conditions import make_condition
        from finetune.data.images import pixel_digest

        key = (pixel_digest(image), kind, tuple(sorted(options.items())))
        if self._last_made is None or self._last_made[0] != key:
            self._last_made = (key, make_condition(image, kind, **options))
        return self._last_made[1]

    def _trained_for(self, column: Column) -> dict[str, dict[str, str]]:
        """{name: metadata} of the column's adapters, and of the base when it is a saved pipeline of ours."""
        base = {self.base_name: self.base_metadata} if column.model is self.base and self.base_metadata else {}
        return {**base, **{name: self._metadata_now(name) for name in column.names}}

    def _metadata_now(self, name: str) -> dict[str, str]:
        """What an adapter's files record now: one retrained since the last scan is loaded again (see
        `_cached`), and its clip skip or prediction type may have changed with it."""
        adapter = by_name(self.adapters, self.adapters_dir, name)
        if adapter is None:  # a Rescan (not queued behind renders) while this request rendered found it deleted
            raise FinetuneError(f"'{name}' was removed from {self.adapters_dir} while this request rendered: pick another")
        if adapter.kind == "lora":
            return self._cached(adapter, lambda: load_lora(adapter.path)).metadata
        return saved_model_metadata(adapter.path) or adapter.metadata

    def _columns(self, request: Request, model: BaseModel, loras: list, controlnet, decoder) -> list[Column]:
        """The base alone (if asked), then the adapters at each strength: all together, or with
        `request.separate` each LoRA in columns of its own."""
        columns = [Column("base", self.base, [], [])] if request.include_base else []
        shared = ([request.controlnet] if controlnet else []) + ([request.model] if model is not self.base else [])
        named = list(zip([name for name, _ in request.loras], loras))
        groups = [[pair] for pair in named] if request.separate and len(named) > 1 else [named]
        labels = [label_of([name for name, _ in group] + shared, short=True) for group in groups]
        if len(set(labels)) < len(labels):  # two runs' `lora` folders, say: their full names tell them apart
            labels = [label_of([name for name, _ in group] + shared, short=False) for group in groups]
        for group, label in zip(groups, labels):
            names = [name for name, _ in group] + shared
            # A strength scales LoRAs and the ControlNet; a fine-tuned model alone is one column.
            scaled = bool(group) or controlnet is not None
            strengths = request.strengths if scaled else [1.0]
            for s in strengths if names else ([] if request.include_base else [1.0]):
                loras_at = [(lora, strength * s) for _, (lora, strength) in group]
                title = (f"{label} x{s:g}" if scaled else label) if names else "base"
                columns.append(Column(title, model, loras_at, names, controlnet, decoder, request.conditioning_scale * s))
        return columns


def summary_of(columns: int, rows: int, seconds: float) -> str:
    """The line under a grid: "1 column x 2 rows in 3.4 s"."""
    return f"{counted(columns, 'column')} x {counted(rows, 'row')} in {seconds:.1f} s"


def label_of(names: list[str], short: bool) -> str:
    """A column's label: its adapters' names joined; past 40 characters the first one and a count."""
    named = [short_name(name) if short else name for name in names]
    label = "+".join(named)
    return label if len(label) <= 40 or len(named) == 1 else f"{named[0]} +{len(named) - 1} more"


def short_name(name: str) -> str:
    """A checkpoint's run and step in words (`quickstart, step 200`: it was `quickstart@200`, a notation of ours no creator
    knew); a run's pipeline or ControlNet by its run's name; else the last part of the name."""
    parts = name.split("/")
    if len(parts) >= 3 and parts[-2] == "checkpoints" and parts[-1].startswith("checkpoint-"):
        return f"{parts[-3]}, step {parts[-1].removeprefix('checkpoint-')}"
    if len(parts) >= 4 and parts[-3] == "checkpoints" and parts[-1] in ("pipeline", "controlnet"):
        return f"{parts[-4]}, step {parts[-2].removeprefix('checkpoint-')}"
    if len(parts) >= 2 and parts[-1] in ("pipeline", "controlnet"):
        return parts[-2]
    return parts[-1]


def _check_request(request: Request) -> None:
    names = [name for name, _ in request.loras]
    for bad, message in (
        (max(len(request.prompt), len(request.negative_prompt)) > 2000, "prompts are limited to 2000 characters"),
        (not 0 <= request.seed < 2**32, f"seed must be 0 to 2^32-1, got {request.seed}"),
        (not 1 <= request.steps <= 150, f"steps must be 1 to 150, got {request.steps}"),
        (request.size % 8 or not 32 <= request.size <= 1024, f"size must be a multiple of 8 from 32 to 1024, got {request.size}"),
        (not 1 <= request.rows <= 4, f"rows must be 1 to 4, got {request.rows}"),
        (len(set(names)) != len(names), "the same LoRA is selected twice: pick each LoRA once and set its strength"),
    ):
        if bad:
            raise FinetuneError(message)


def _check_lora_header_fits(adapter: Adapter, model: BaseModel) -> None:
    """A LoRA of another base (an SD2.x or SDXL one on SD1.5) told from its header and the model's configs, as `sample` tells
    it (finetune.formats.lora_base_fit), before its weights are read: it was said once load_lora had read the whole file."""
    recorded = adapter.metadata.get("finetune.base_model")
    trained_on = f" (it records {recorded})" if recorded else ""
    remedy = f"pick the model it was trained on{trained_on}, or start the demo with that model as --base"
    if problem := lora_base_problem(adapter.path, model.source, model.config.single_file_config, f"LoRA '{adapter.name}'", remedy):
        raise FinetuneError(problem)


def _check_lora_fits(models: dict[str, torch.nn.Module], lora: LoRA, name: str, base: str) -> None:
    """`merge.check_lora_fits`, its line naming the LoRA as the page lists it, the base, and the base the LoRA records."""
    try:
        check_lora_fits(models, lora)
    except FinetuneError as err:
        trained_on = lora.metadata.get("finetune.base_model")
        recorded = f" (the LoRA was trained on {trained_on})" if trained_on else ""
        raise FinetuneError(f"LoRA '{name}' does not fit base model {base}: {err}{recorded}") from None


def _load_controlnet(folder: Path):
    """(the ControlNet, the UNet its run trained with it (controlnet.unlock_unet_decoder) or None)."""
    from diffusers import ControlNetModel

    # A file cut short (a copy or a run still writing) raised OSError, which the page shows as a bare "Error" with a
    # traceback in the terminal: one line, as sample says it (inference.load_controlnet, load_unlocked_decoder).
    whole = " (copied or written in part? press Rescan once it is whole)"
    try:
        controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True, **weights_variant(folder))
    except (OSError, ValueError) as err:
        raise FinetuneError(f"could not load ControlNet {folder}: {str(err).splitlines()[0][:200]}{whole}") from None
    unet = load_unlocked_decoder(decoder, safetensors_only=True, cut_short_hint=whole) if (decoder := unlocked_decoder_folder(folder)) else None
    return controlnet.eval().requires_grad_(False), unet


def _pipeline(model: BaseModel, controlnet, unet, sampler: str = DEFAULT_SAMPLER):
    """A pipeline of `sampler` over the model's parts and `unet`; with a ControlNet, diffusers' ControlNet pipeline."""
    if controlnet is None:
        return build_pipeline(model, unet=unet, sampler=sampler)
    from diffusers import StableDiffusionControlNetPipeline

    return build_pipeline(model, unet=unet, pipeline_class=StableDiffusionControlNetPipeline, controlnet=controlnet, sampler=sampler)
