"""The model card written beside an exported LoRA (README.md, or `<name>.md` beside a kohya file): where
it came from, its rank and alpha, its samples, and how to load it in diffusers, the webui and ComfyUI
(with its clip skip and prediction type)."""

from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path

import torch

from finetune.checkpoints.run_files import CHECKPOINT_PATTERN, PARTIAL, run_or_checkpoint_name
from finetune.counts import counted
from finetune.formats.dora import uses_dora
from finetune.formats.kohya import LoRA
from finetune.models.init_from_record import recorded_clip_skip
from finetune.models.model_source import spelled_as_hub_id
from finetune.models.native_resolution import SINGLE_FILE_SUFFIXES
from finetune.outputs.atomic_files import atomic_write, atomic_write_text
from finetune.outputs.base_names import shared_base_name


def newest_sample_grid(training_dir: Path, up_to_step: int | None = None) -> Path | None:
    """The run's newest validation grid (samples/step-N.png), or its newest at or before `up_to_step`; never the grid of
    step 0, drawn before training (the base's images, or lora.init_from's): exported from a checkpoint older than the
    first grid after it, it was shown as the LoRA's samples and its first image became the webui's thumbnail."""
    # By the step each names: padded to 6 digits, step-1000000.png sorted before step-999999.png by name.
    grids = {int(found.group(1)): grid for grid in training_dir.glob("samples/step-*.png") if (found := re.fullmatch(r"step-(\d+)\.png", grid.name))}
    steps = [step for step in grids if step > 0 and (up_to_step is None or step <= up_to_step)]
    return grids[max(steps)] if steps else None


V_PREDICTION_CODE = (
    'pipeline.scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config, prediction_type="v_prediction")  # trained to predict v'
)
ZERO_TERMINAL_SNR_CODE = (
    "pipeline.scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config, rescale_betas_zero_snr=True, "
    'timestep_spacing="trailing")  # trained with zero terminal SNR'
)


def diffusers_loading_code(source: str) -> list[str]:
    """The model cards' first lines of Python: load `source` on a GPU in fp16 when there is one."""
    return [
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        "# One dtype for every part: a base saved in mixed precisions would otherwise mix them.",
        "dtype = torch.float16 if device == \"cuda\" else torch.float32",
        f'pipeline = StableDiffusionPipeline.from_pretrained("{source}", torch_dtype=dtype).to(device)',
    ]


def base_loading_code(recorded: str | None, configs: str | None = None) -> list[str]:
    """`diffusers_loading_code` for the base a LoRA records (BASE_MODEL where none): a local one by its name only
    (finetune.outputs.base_names), which loads from the folder that holds it; the card says so, for a reader who has it
    elsewhere or under a hub id. A single-file base (a .safetensors or .ckpt checkpoint, which from_pretrained does not
    read) with from_single_file, and the configs its run named (model.single_file_config, `configs`), as training loaded it."""
    base = shared_base_name(recorded) if recorded else "BASE_MODEL"
    code = diffusers_loading_code(base)
    single_file, configs = base.lower().endswith(SINGLE_FILE_SUFFIXES), shared_base_name(configs) if configs else None
    if single_file:
        config = f', config="{configs}"' if configs else ""
        code[-1] = f'pipeline = StableDiffusionPipeline.from_single_file("{base}"{config}, torch_dtype=dtype).to(device)'
    if recorded and not spelled_as_hub_id(base):
        kind = f'file (its configs "{configs}" too)' if single_file and configs else "file" if single_file else "folder"
        code.insert(-1, f'# "{base}": the base it was trained on, a local {kind} named by its name only: give its path, or a hub id of the same model')
    return code


def write_webui_preview(grid: Path, resolution: str | None, preview: Path) -> Path | None:
    """The grid's first sample as `<name>.preview.png`, the thumbnail the webui's Lora tab shows; None when
    the grid's cell size is not known."""
    from PIL import Image

    from finetune.sampling.grids import first_cell

    with Image.open(grid) as image:
        cell = first_cell(image, int(resolution)) if resolution and resolution.isdigit() else None
        if cell is None:
            return None
        atomic_write(preview, lambda partial: cell.save(partial, format="PNG"))
    return preview


def frequent_tags(tag_frequency: str | None) -> str | None:
    """The 10 most frequent tags of sd-scripts' tag_frequency JSON ({folder: {tag: images}}), over all
    folders: "sks (12), dog (12), ..."; None when there are none or it cannot be read."""
    try:
        folders = json.loads(tag_frequency or "{}")
        totals = collections.Counter()
        for tags in folders.values():
            totals.update({str(tag): int(images) for tag, images in tags.items()})
    except (ValueError, TypeError, AttributeError, OverflowError):  # another trainer's file may hold anything there
        return None
    shown = ", ".join(f"{' '.join(tag.split())} ({images})" for tag, images in totals.most_common(10)).replace("|", "\\|")  # a table cell
    return shown or None


def published_folder(folder: Path) -> Path:
    """Where `folder`, written inside a checkpoint being saved (`.partial-checkpoint-N`), is once the checkpoint is complete."""
    return Path(*(part.removeprefix(PARTIAL) if part.startswith(PARTIAL) and CHECKPOINT_PATTERN.match(part.removeprefix(PARTIAL)) else part
                  for part in folder.parts))  # fmt: skip


def write_pipeline_card(folder: Path, meta: dict[str, str]) -> Path:
    """README.md of a trained pipeline (a full fine-tune, full DreamBooth): where it came from, the prompts
    it learned, and how to load it. A checkpoint's names the folder as it is once the checkpoint is complete,
    and its run and step (it named `.partial-checkpoint-N`, gone by then)."""
    tags = frequent_tags(meta.get("finetune.tag_frequency"))
    card, folder = folder / "README.md", published_folder(folder)
    at = folder.parent  # the run, or a checkpoint of it
    lines = [
        f"# {run_or_checkpoint_name(at)} ({meta.get('finetune.method', 'full')})",
        "",
        "A Stable Diffusion 1.x pipeline fine-tuned with `finetune`: every part is here, in the diffusers layout.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{shared_base_name(meta.get('finetune.base_model') or 'unknown')}` |",
        f"| method | {meta.get('finetune.method', 'full')} |",
        f"| steps | {meta.get('finetune.steps', 'unknown')}" + (f" ({counted(meta['finetune.epoch'], 'epoch')})" if meta.get("finetune.epoch") else "") + " |",
        f"| resolution | {meta.get('finetune.resolution', 'unknown')} |",
        *([f"| trained prompts and caption tags | {tags} |"] if tags else []),
        f"| prediction type | {meta.get('finetune.prediction_type', 'unknown')} |",
        f"| recipe hash | `{meta.get('finetune.recipe_hash', 'unknown')}` |",
        "",
        "## diffusers",
        "",
        "```python",
        *diffusers_loading_code(str(folder)),
        "```",
        "",
        f'Or sample with `finetune sample --base {folder} --prompt "..."`, and compare it with its base in `finetune demo`.',
        "",
    ]
    atomic_write_text(card, "\n".join(lines))  # whole or not there: a Ctrl-C while it was written left half a card
    return card


def model_card_path(path: Path, layout: str) -> Path:
    """README.md in a diffusers LoRA's folder (one LoRA per folder); `<name>.md` beside a kohya file, so
    several exports share a webui `models/Lora` folder."""
    return path.with_suffix(".md") if layout == "kohya" else path.parent / "README.md"


def card_images(path: Path, layout: str, training_dir: Path | None = None, up_to_step: int | None = None) -> tuple[Path | None, Path | None, Path | None]:
    """What the card of the LoRA file `path` shows, known before anything is written (`export` checks what it would
    replace): (the run's newest grid, or None; its copy beside the card, None where the grid is there already; for kohya the
    webui's preview, written where the grid's cells have a known size)."""
    grid = newest_sample_grid(training_dir, up_to_step) if training_dir else None
    if grid is None:
        return None, None, None
    target = path.parent / "samples" / (f"{path.stem}-{grid.name}" if layout == "kohya" else grid.name)
    return grid, None if grid.resolve() == target.resolve() else target, path.with_suffix(".preview.png") if layout == "kohya" else None


def precision_name(lora: LoRA) -> str:
    """The weights' dtype(s), as creators name them (fp16 files are half the size of fp32 ones)."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    dtypes = {layer.down.dtype for layer in lora.layers.values()} | {layer.up.dtype for layer in lora.layers.values()}
    return " and ".join(sorted(names.get(dtype, str(dtype).removeprefix("torch.")) for dtype in dtypes))


def write_model_card(
    lora: LoRA, path: Path, layout: str, training_dir: Path | None = None, precision: str | None = None, up_to_step: int | None = None
) -> tuple[Path, list[Path]]:
    """The card beside the file: provenance, rank/alpha, and how to load it in diffusers and webui/ComfyUI.
    `precision`: the file's, where it was written in another than `lora`'s own; `up_to_step`: the newest
    sample grid shown is of that step or before (a checkpoint's). Returns (the card, the images written
    for it: the run's newest sample grid, and for kohya the webui's preview)."""
    meta = lora.metadata
    rank, alpha = lora.common_rank_alpha()
    conv = lora.conv_rank_alpha()
    parts = sorted({key.split(".", 1)[0] for key in lora.layers})
    lines = [
        f"# {path.stem if layout == 'kohya' else path.parent.name} (LoRA)",
        "",
        f"A LoRA for Stable Diffusion 1.x in the {layout} layout" + (", trained with `finetune`." if "finetune.method" in meta else "."),
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{shared_base_name(meta.get('finetune.base_model') or 'unknown')}` |",
        f"| method | {meta.get('finetune.method', 'lora')} |",
        f"| rank / alpha | {rank} / {alpha:g} (updates scaled by alpha/rank = {alpha / rank:g}) |",
        f"| adapted | {', '.join(parts)} ({len(lora.layers)} layers) |",
        # ComfyUI's and Forge's weight_decompose norms an output-axis DoRA by the base weight, not the adapted one (docs/sampling-and-sharing.md).
        *(["| DoRA | a magnitude per output channel beside each layer's LoRA (lora.use_dora): diffusers and LyCORIS apply it as trained, "
           "ComfyUI and Forge nearly (each channel normed by the base weight) |"] if uses_dora(lora) else []),
        *([f"| 3x3 conv layers (LoCon) | rank {conv[0]} / alpha {conv[1]:g} (scaled by {conv[1] / conv[0]:g}) |"] if conv else []),
        f"| steps | {meta.get('finetune.steps', 'unknown')}" + (f" ({counted(meta['finetune.epoch'], 'epoch')})" if meta.get("finetune.epoch") else "") + " |",
        f"| resolution | {meta.get('finetune.resolution', 'unknown')} |",
        *([f"| most frequent caption tags | {tags} |"] if (tags := frequent_tags(meta.get("finetune.tag_frequency"))) else []),
        f"| prediction type | {meta.get('finetune.prediction_type', 'unknown')} |",
        f"| clip skip | {meta.get('finetune.clip_skip', 'unknown')} (the webui's count) |",
        *([f"| caption tokens | {meta['finetune.max_token_length']} (long captions read in chunks of 75, as sd-scripts' max_token_length) |"]
          if meta.get("finetune.max_token_length") else []),
        *(["| noise schedule | zero terminal SNR (sample from the last timestep, trailing spacing) |"] if meta.get("finetune.zero_terminal_snr") == "true" else []),
        *([f"| loss masks | {meta['finetune.loss_mask']} (the loss weighed per pixel: a subject without its background) |"] if meta.get("finetune.loss_mask") else []),
        *([f"| LoRA+ | up weights at {meta['finetune.loraplus_lr_ratio']} x the learning rate |"] if meta.get("finetune.loraplus_lr_ratio") else []),
        *([f"| LoRA+ (text encoder) | up weights at {meta['finetune.loraplus_text_encoder_lr_ratio']} x its learning rate |"]
          if meta.get("finetune.loraplus_text_encoder_lr_ratio") else []),
        *([f"| max norm | {meta['finetune.max_norm']} (each layer's update kept within it: lora.max_norm, sd-scripts' scale_weight_norms) |"]
          if meta.get("finetune.max_norm") else []),
        f"| precision | {precision or precision_name(lora)} |",
        f"| recipe hash | `{meta.get('finetune.recipe_hash', 'unknown')}` |",
        *([f"| started from | the LoRA `{meta['finetune.init_from']}` (lora.init_from; steps above are this run's) |"] if meta.get("finetune.init_from") else []),
        "",
    ]
    grid, copy, preview = card_images(path, layout, training_dir, up_to_step)
    images = []  # written beside the card
    if grid is not None:
        if copy is not None:
            copy.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(copy, lambda partial: shutil.copyfile(grid, partial))
            images.append(copy)
        lines += [f"## Samples ({grid.stem}, one row per validation prompt)", "", f"![samples](samples/{(copy or grid).name})", ""]
        if preview is not None:
            images.append(write_webui_preview(grid, meta.get("finetune.resolution"), preview))
    lines += [
        "## diffusers",
        "",
        "```python",
        *base_loading_code(meta.get("finetune.base_model"), meta.get("finetune.base_config")),
        # Not its path here (/home/alice/...): the creator's folders, in a card shared wherever the file goes.
        f'pipeline.load_lora_weights(".", weight_name="{path.name}", adapter_name="lora")  # this card\'s folder: run it there, or give its path',
        'pipeline.set_adapters(["lora"], adapter_weights=[1.0])  # the strength',
    ]
    if meta.get("finetune.max_token_length"):
        lines += [
            f"# Trained on captions of up to {meta['finetune.max_token_length']} tokens, read in chunks of 75. The pipeline cuts a",
            f"# prompt at 77 tokens and reads a short one in one chunk: pass prompt_embeds encoded in {int(meta['finetune.max_token_length']) // 75} or more",
            "# chunks, as training read every caption (`finetune sample` does; the webui reads a short prompt in one chunk).",
        ]
    if meta.get("finetune.prediction_type") == "v_prediction":
        lines.append(V_PREDICTION_CODE)
    zero_snr = meta.get("finetune.zero_terminal_snr") == "true"
    if zero_snr:
        lines.append(ZERO_TERMINAL_SNR_CODE)
    clip_skip = recorded_clip_skip(meta) or 1
    if clip_skip > 1:  # not pipeline(clip_skip=...): that looks for text_model, which transformers 5 no longer has
        lines += [
            f"# Trained with clip skip {clip_skip}: prompts go through all but the text encoder's last {clip_skip - 1} layer(s).",
            'stack = getattr(pipeline.text_encoder, "text_model", pipeline.text_encoder).encoder',
            f"stack.layers = stack.layers[:-{clip_skip - 1}]",
        ]
    lines += [
        "```",
        "",
        "## AUTOMATIC1111 / Forge webui and ComfyUI",
        "",
    ]
    if clip_skip > 1:
        lines += [f"Trained with clip skip {clip_skip}: set *Clip skip* to {clip_skip} in the webui (a *CLIP Set Last Layer* node at -{clip_skip} in ComfyUI).", ""]
    if zero_snr:
        lines += ["Trained with zero terminal SNR (v-prediction): in ComfyUI, a *ModelSamplingDiscrete* node set to v_prediction with zsnr on.", ""]
    merge = f"finetune merge --base BASE --lora {path.name} --strength 1.0 merged/"
    if uses_dora(lora):  # the webui's Lora loader decomposes per input channel (network.py's apply_weight_decompose)
        lines += ["The AUTOMATIC1111 webui decomposes a DoRA per input channel, not per output channel as it was trained: another model. "
                  f"For the webui, fold it into the base and write one checkpoint: `{merge}`, then `finetune export-checkpoint merged/ "
                  f"{path.stem}-merged.safetensors`.", ""]  # fmt: skip
    if layout == "kohya":
        lines += [
            f"Copy `{path.name}` to `models/Lora/` (webui) or `models/loras/` (ComfyUI).",
            f"In webui, add `<lora:{path.stem}:1.0>` to the prompt; in ComfyUI, use a *Load LoRA* node.",
        ]
    else:
        lines += [f"Convert first, in this card's folder: `finetune export {path.name} . --to kohya`, then copy the `.safetensors` file to `models/Lora/`."]
    lines += ["", f"Fold it into the base model instead: `{merge}`.", ""]
    card = model_card_path(path, layout)
    atomic_write_text(card, "\n".join(lines))  # whole or not there: a Ctrl-C while it was written left half a card
    return card, [image for image in images if image is not None]
