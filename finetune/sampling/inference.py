"""`finetune sample`: a base model plus an optional LoRA and/or ControlNet, fixed seeds, images and a grid on disk.

With a ControlNet every prompt is sampled with the one conditioning image (`--condition`), and each grid row
starts with that image as the ControlNet saw it: conditioning | samples, as in the training's validation grids.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import SafetensorError, safe_open

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME, resolve_lora_file
from finetune.config import ModelConfig
from finetune.controlnet.conditioning_records import MAKE_ONE, kind_mismatch_line, made_as_recorded, recorded_conditioning, recorded_kind
from finetune.controlnet.folder import check_control_options, check_controlnet_fits, resolve_controlnet_folder, unlocked_decoder_folder, weights_variant
from finetune.controlnet.pairs import read_conditioning, small_conditioning_problem
from finetune.data.image_bounds import GRID_LABEL_WIDTH, sample_grid_problem
from finetune.data.sources import Example
from finetune.data.views import cover_and_center_crop
from finetune.errors import FinetuneError
from finetune.formats.kohya import LoRA, load_lora, to_diffusers
from finetune.formats.merge import check_lora_fits, merged_already_note
from finetune.models.base_folder import files_ending, misnamed_weights_in, pickle_refusal
from finetune.models.encoders import skip_last_layers
from finetune.models.loading import BaseModel, load_base_model
from finetune.outputs.atomic_files import atomic_save_safetensors
from finetune.sampling.adapter_records import saved_model_metadata
from finetune.sampling.adapters_as_trained import adapters_clip_skip, adapters_max_token_length, follow_adapters_schedule
from finetune.sampling.grids import make_grid
from finetune.sampling.pipelines import build_pipeline, denoising_bar, denoising_steps, generate_with_settings, read_prompts_as_trained
from finetune.sampling.placement import inference_placement, out_of_device_memory, place, placement_line
from finetune.sampling.prompt_options import PromptSettings, guidance_notes, prompts_settings, webui_syntax_notes
from finetune.sampling.sample_files import PARAMETERS, parameters_text, webui_controlnet, webui_lora, webui_weight_note, write_numbered
from finetune.sampling.samplers import DEFAULT_SAMPLER, spacing_steps_problem


def load_lora_into(pipeline, lora: LoRA, lora_file: Path, adapter_name: str) -> None:
    """Load a LoRA read from a file of either layout (ours/diffusers or kohya) as a named adapter.

    It is rewritten in our layout, with per-module alphas in its metadata: diffusers reads a kohya
    file's alphas only when they are all equal.
    """
    try:
        check_lora_fits({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}, lora)
    except FinetuneError as err:
        raise FinetuneError(f"LoRA {lora_file} does not fit this base model: {err}") from None
    tensors, metadata = to_diffusers(lora)
    with tempfile.TemporaryDirectory() as folder:
        atomic_save_safetensors(tensors, Path(folder) / LORA_WEIGHTS_NAME, metadata)
        try:
            pipeline.load_lora_weights(folder, weight_name=LORA_WEIGHTS_NAME, adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError) as err:
            raise FinetuneError(f"LoRA {lora_file} does not fit this base model: {str(err).splitlines()[0][:200]}") from None


def base_model_metadata(base: str) -> dict[str, str]:
    """What training or merge recorded of a base model of ours: beside its pipeline folder, or in the header
    of `finetune export-checkpoint`'s file (its clip skip and prediction type, which that layout cannot
    carry otherwise); {} for other models."""
    path = Path(base)
    if path.is_dir():
        return saved_model_metadata(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as opened:
            header = opened.metadata() or {}
    except (SafetensorError, OSError):  # loading the model says what is wrong with the file
        return {}
    return {key: value for key, value in header.items() if key.startswith("finetune.")}


# ---------------------------------------------------------------------------------------------------
# ControlNet


def load_unlocked_decoder(decoder: Path, safetensors_only: bool = False, cut_short_hint: str = "") -> UNet2DConditionModel:
    """The UNet `unlocked_decoder_folder` found, in fp32 and frozen, as sample and the demo sample with it. A file cut short
    (a copy, or a run still writing) is one line naming the folder, ending in `cut_short_hint`: in sample it was diffusers' traceback.

    Its pickle weights (.bin, no .safetensors beside them) are refused by the demo (`safetensors_only`: it loads folders
    users download, and never unpickles), and read by sample as its --controlnet's are: only where torch.load(weights_only=True)
    reads them (`pickle_refusal`). The demo loaded them unchecked."""
    named = f"the UNet {decoder} its ControlNet was trained with"
    if misnamed := misnamed_weights_in(decoder):  # (sample said it before torch: controlnet.folder.resolve_controlnet_folder; the demo here)
        raise FinetuneError(f"{named}: {misnamed}")
    if not files_ending(decoder, ".safetensors"):
        for weights in files_ending(decoder, ".bin"):
            if safetensors_only:
                raise FinetuneError(f"{named} holds pickle weights ({weights.name}), which the demo does not load (unpickling can run code): "
                                    "convert that folder to safetensors (UNet2DConditionModel.from_pretrained, then save_pretrained) on a "
                                    "machine where you trust it")  # fmt: skip
            if refusal := pickle_refusal(weights, f"{named}: {weights.name}", "weights"):
                raise FinetuneError(refusal)
    try:
        unet = UNet2DConditionModel.from_pretrained(decoder, torch_dtype=torch.float32, **({"use_safetensors": True} if safetensors_only else {}))
    except (OSError, ValueError) as err:
        raise FinetuneError(f"could not load {named}: {str(err).splitlines()[0][:200]}{cut_short_hint}") from None
    return unet.eval().requires_grad_(False)


def load_controlnet(folder: Path, base: BaseModel) -> ControlNetModel:
    try:
        controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32, **weights_variant(folder))
    except (OSError, ValueError) as err:
        raise FinetuneError(f"could not load ControlNet {folder}: {str(err).splitlines()[0][:200]}") from None
    check_controlnet_fits(controlnet.config, base.unet.config, f"ControlNet {folder}", base.source)
    return controlnet.eval()


def read_condition(path: str | Path) -> Image.Image:
    """--condition read and checked as training reads its conditioning images (`read_conditioning`), before any model loads."""
    if not Path(path).is_file():
        raise FinetuneError(f"conditioning image {path} not found: check --condition")
    try:
        with Image.open(path) as opened:
            opened.load()
    except Exception as err:  # PIL raises many types for what is not an image
        raise FinetuneError(f"conditioning image {path} cannot be read ({err.__class__.__name__}: {err}): check --condition (a PNG or JPEG)") from None
    return read_conditioning(Example(str(path), "", lambda: Image.open(path)))


def fit_condition(image: Image.Image, source: str | Path, resolution: int) -> Image.Image:
    """`image` resized to cover `resolution` and center-cropped; one smaller than half of it on its short side is
    refused, as training refuses such an image (data.min_image_size): enlarged that far it holds no detail to steer by."""
    if (problem := small_conditioning_problem(image, str(source), resolution)) is not None:
        raise FinetuneError(f"{problem}, or a smaller --resolution")
    return cover_and_center_crop(image, (resolution, resolution))


# ---------------------------------------------------------------------------------------------------
# Sampling


def refuse_replacing_a_fine_tuned_unet(controlnet: str, model: str) -> None:
    """A ControlNet trained with controlnet.unlock_unet_decoder brings the whole UNet it trained with; on a
    fine-tuned model (DreamBooth, a full fine-tune, a merge) that model's own UNet would silently go unused."""
    raise FinetuneError(
        f"ControlNet {controlnet} was trained with controlnet.unlock_unet_decoder and brings its own UNet, which would "
        f"replace the fine-tuned UNet of {model}: use it on the base model it was trained on"
    )


def load_sampling_pipeline(
    base: str, lora: str | None = None, lora_scale: float = 1.0, controlnet: str | None = None, base_config: str | None = None,
    sampler: str = DEFAULT_SAMPLER,
):
    """StableDiffusionPipeline over the base (+ LoRA); StableDiffusionControlNetPipeline with `controlnet`.
    `base_config` describes a single-file base (as --base-config); `sampler`: finetune/sampling/samplers.py's name."""
    lora_file = resolve_lora_file(lora) if lora else None
    lora_weights = load_lora(lora_file) if lora_file else None  # a broken file stops before the model loads
    folder = resolve_controlnet_folder(controlnet) if controlnet else None
    adapters = {}  # name: metadata
    base_metadata = base_model_metadata(base)
    if base_metadata:  # a full fine-tune's or a merge's pipeline
        adapters[base] = base_metadata
    if controlnet:
        adapters[controlnet] = saved_model_metadata(folder)
        decoder = unlocked_decoder_folder(folder)
        if decoder and base_metadata:
            refuse_replacing_a_fine_tuned_unet(controlnet, base)
    if lora:
        adapters[lora] = lora_weights.metadata
        if note := merged_already_note(base_metadata, lora_weights, f"--base {base}", lora_scale):
            print(f"note: {note}")
    clip_skip = adapters_clip_skip(adapters)
    base_model = load_base_model(ModelConfig.from_option(base, base_config))
    if controlnet is None:
        pipeline = build_pipeline(base_model, sampler=sampler)
    else:
        unet = load_unlocked_decoder(decoder) if decoder else None
        if decoder:
            print(f"note: ControlNet {controlnet} was trained with controlnet.unlock_unet_decoder: sampling with the UNet its run saved ({decoder})")
        model = load_controlnet(folder, base_model)
        pipeline = build_pipeline(base_model, unet=unet, pipeline_class=StableDiffusionControlNetPipeline, controlnet=model, sampler=sampler)
    if lora:
        load_lora_into(pipeline, lora_weights, lora_file, adapter_name="lora")
        pipeline.set_adapters(["lora"], adapter_weights=[lora_scale])
    if clip_skip > 1:  # after the LoRA: sd-scripts' files also hold (unused) LoRAs of the skipped layers
        skip_last_layers(pipeline.text_encoder, clip_skip)
    follow_adapters_schedule(pipeline, adapters)
    read_prompts_as_trained(pipeline, adapters_max_token_length(adapters))
    return pipeline


@dataclass
class SampleRequest:
    """What `finetune sample` asks for: its options, as the CLI checked them before torch loaded.

    With `controlnet`, every image is steered by the `condition` image (at `conditioning_scale`, default 1.0) and each
    grid row starts with it. `resolution` None: the model's own. `device`, `precision`: see finetune/sampling/placement.py;
    `sampler`: finetune/sampling/samplers.py."""

    base: str
    lora: str | None
    lora_scale: float
    prompts: list[str]
    negative_prompt: str | None
    num_images: int
    seed: int
    steps: int
    guidance: float
    resolution: int | None
    output_dir: Path
    controlnet: str | None = None
    condition: str | None = None
    conditioning_scale: float | None = None
    base_config: str | None = None
    device: str = "auto"
    precision: str = "auto"
    sampler: str = DEFAULT_SAMPLER


def sample_to_folder(request: SampleRequest) -> list[Path]:
    """Write NNNNN-promptP_seedS.png for each image, then NNNNN-grid.png (rows = prompts), under the folder's
    next run number (finetune/sampling/sample_files.py); return all paths, grid last. In order: the request checked
    (before any model loads), the model loaded and placed, the request checked against it, the images drawn, written."""
    placement, settings, condition_image = _checked_before_loading(request)
    loaded = load_sampling_pipeline(request.base, request.lora, request.lora_scale, request.controlnet, request.base_config, request.sampler)
    pipeline = place(loaded, *placement)
    print(placement_line(*placement))
    resolution = _checked_on_the_model(request, pipeline, settings)
    control = {}
    if request.controlnet is not None:
        scale = 1.0 if request.conditioning_scale is None else request.conditioning_scale
        control = dict(image=fit_condition(condition_image, request.condition, resolution), controlnet_conditioning_scale=scale)
    rows = _drawn(pipeline, settings, request.num_images, resolution, control)
    return _written(request, settings, rows, resolution, control)


def _checked_before_loading(request: SampleRequest) -> tuple[tuple, list[PromptSettings], Image.Image | None]:
    """Where sampling runs (`inference_placement`), each prompt's settings and the --condition image, read and checked
    before any model loads, with the notes on them said."""
    check_control_options(request.controlnet, request.condition, request.conditioning_scale)
    placement = inference_placement(request.device, request.precision)
    settings = prompts_settings(request.prompts, request.negative_prompt, request.seed, request.guidance, request.steps, request.sampler)
    notes = guidance_notes(settings) + webui_syntax_notes(settings)
    if request.controlnet is not None and request.conditioning_scale is not None and (weight := webui_weight_note(request.conditioning_scale)):
        notes.append(weight)  # the images record a weight the webui's ControlNet unit will not take
    for note in notes:
        print(f"note: {note}")
    if request.controlnet is None:
        return placement, settings, None
    recorded = saved_model_metadata(resolve_controlnet_folder(request.controlnet))
    condition = request.condition
    if (made := recorded_conditioning(recorded)) and not (condition and made_as_recorded(condition, recorded)):
        print(f"note: this ControlNet was trained on {made} conditioning images (finetune make-conditions); --condition is used as it is: give one of that kind")
    condition_image = read_condition(condition)  # a bad one stops before the model loads
    if line := kind_mismatch_line(condition_image, recorded_kind(recorded), f"--condition {condition}", MAKE_ONE):
        print(f"note: {line}")
    return placement, settings, condition_image


def _checked_on_the_model(request: SampleRequest, pipeline, settings: list[PromptSettings]) -> int:
    """The side the images are drawn at (--resolution, or the model's own), checked with each prompt's steps against
    what the loaded model allows."""
    for text, prompt in zip(request.prompts, settings):
        if problem := spacing_steps_problem(pipeline.scheduler, prompt.num_inference_steps):
            raise FinetuneError(f"{f'--prompt {text!r}' if prompt.num_inference_steps != request.steps else '--steps'}: {problem}")
    resolution = request.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    if resolution % 8:
        raise FinetuneError(f"--resolution {resolution} must be a multiple of 8")
    if problem := sample_grid_problem(request.num_images, len(settings), resolution, request.controlnet is not None):  # the model's own resolution
        raise FinetuneError(problem)
    return resolution


def _drawn(pipeline, settings: list[PromptSettings], num_images: int, resolution: int, control: dict) -> list[list[Image.Image]]:
    """Each prompt's row of images, under one bar of the denoising steps; running out of memory is one line."""
    try:  # a bar of the denoising steps: minutes for SD1.5 images on a CPU, which nothing between this line and the last said
        with denoising_bar(pipeline, "sampling", denoising_steps(settings, num_images)):
            return generate_with_settings(pipeline, settings, num_images, resolution, **control)
    except RuntimeError as err:  # torch.OutOfMemoryError on CUDA; plain RuntimeErrors on MPS and from the CPU's allocator
        if not (out_of_device_memory(err) or "can't allocate memory" in str(err)):
            raise
        native = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        raise FinetuneError(f"out of memory sampling {resolution}x{resolution} px images: lower --resolution (this model's own is {native})") from None


def _written(
    request: SampleRequest, settings: list[PromptSettings], rows: list[list[Image.Image]], resolution: int, control: dict
) -> list[Path]:
    """The images, each with the webui's parameters text, and the grid, under the folder's next run number (earlier runs' files stay)."""
    named_lora = webui_lora(request.lora) if request.lora else None  # its hash read once, not per image
    named_controlnet = webui_controlnet(request.controlnet) if request.controlnet else None
    for prompt, row in zip(settings, rows):
        for k, image in enumerate(row):
            image.info[PARAMETERS] = parameters_text(prompt.prompt, prompt.negative_prompt, prompt.num_inference_steps, prompt.sampler or request.sampler,
                                                     prompt.guidance_scale, prompt.seed + k, resolution, request.base, named_lora, request.lora_scale,
                                                     named_controlnet, control.get("controlnet_conditioning_scale", 1.0))  # fmt: skip
    named = [(f"prompt{p}_seed{settings[p].seed + k}.png", image) for p, row in enumerate(rows) for k, image in enumerate(row)]
    grid_rows = [[control["image"], *row] for row in rows] if control else rows
    named.append(("grid.png", make_grid(grid_rows, row_labels=request.prompts, label_width=GRID_LABEL_WIDTH)))
    return write_numbered(request.output_dir, named)
