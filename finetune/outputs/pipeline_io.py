"""Saving whole pipelines (what full fine-tunes and pretraining produce) and single models (a ControlNet, its unlocked
UNet), in diffusers format."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from finetune.checkpoints.run_files import METADATA_FILE
from finetune.models.loading import BaseModel, at_source_precision
from finetune.outputs.atomic_files import folder_written_whole, partial_path, removed_if_unfinished, replace_folder, with_default_permissions
from finetune.outputs.folders import export_base_source


def save_pipeline(
    base: BaseModel,
    output_dir: Path,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
    **replacements: torch.nn.Module,
) -> Path:
    """Write base's parts, with `replacements` (unet=, vae=, text_encoder=) swapped in, to `output_dir`,
    and `metadata` as its METADATA_FILE.

    Written whole before it takes the place of what `output_dir` held (`folder_written_whole`), so a crash never
    leaves half a pipeline; the other parts are saved as the source has them (cast to `dtype`, which defaults to full precision).
    """
    frozen = [name for name in ("unet", "vae", "text_encoder") if name not in replacements]
    parts = {**at_source_precision(base, frozen), **replacements}
    pipeline = StableDiffusionPipeline(
        tokenizer=as_loaded(base.tokenizer),
        scheduler=DDIMScheduler.from_config(base.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **parts,
    )
    original_dtypes = {name: module.dtype for name, module in parts.items()}
    with folder_written_whole(output_dir) as written:
        try:
            for module in parts.values():
                module.to(dtype)
            pipeline.save_pretrained(written, safe_serialization=True)
        finally:
            for name, module in parts.items():
                module.to(original_dtypes[name])
        without_load_paths(written)
        if metadata is not None:
            (written / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        with_default_permissions(written)
    return output_dir


def save_model_folder(model: torch.nn.Module, folder: Path, metadata: dict[str, str]) -> Path:
    """`model.save_pretrained` in fp32, written beside `folder` and renamed into place."""
    partial = partial_path(folder)
    shutil.rmtree(partial, ignore_errors=True)
    dtypes = [p.dtype for p in model.parameters()]
    with removed_if_unfinished(partial):
        try:
            for parameter in model.parameters():
                parameter.data = parameter.data.float()
            model.save_pretrained(partial, safe_serialization=True)
        finally:
            for parameter, dtype in zip(model.parameters(), dtypes):
                parameter.data = parameter.data.to(dtype)
        without_load_paths(partial)  # the local controlnet.pretrained or base it was loaded from, as saved pipelines leave it out
        (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return replace_folder(with_default_permissions(partial), folder)


def without_load_paths(folder: Path) -> None:
    """diffusers writes into each saved part's config.json where that part was loaded from (`_name_or_path`: a merge's
    UNet said /home/alice/models/sd15): the creator's folders, in a pipeline that may be shared, as its record names a
    base by name only (finetune.outputs.base_names). No loader reads it (each load sets it anew): left out. `folder`: a
    pipeline (its parts' configs), or one model's (its config.json: a ControlNet trained from a local one named it)."""
    for config in (*folder.glob("config.json"), *folder.glob("*/config.json")):
        written = json.loads(config.read_text())
        if isinstance(written, dict) and written.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")  # as diffusers writes it


def as_loaded(tokenizer):
    """A copy without the last call's truncation and padding, which a fast tokenizer's backend keeps and
    save_pretrained writes into tokenizer.json: a run that tokenized (padding="max_length") saved another
    file than one that read every caption from the cache, as a resumed run does (see cache.tokenizer_description)."""
    tokenizer = copy.deepcopy(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # none in a slow (pure Python) tokenizer
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    return tokenizer


def export_fp16(source: Path, destination: Path, overwrite: bool = False) -> Path:
    """A compact copy of a pipeline: fp16 safetensors (half the bytes), loaded back as fp32 for training
    and by a plain `from_pretrained` (every part in one dtype; mixed, the first matmul fails)."""
    source = export_base_source(source, destination, overwrite)
    pipeline = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipeline.to(torch.float16)
    with folder_written_whole(destination) as partial:  # a full disk or Ctrl-C left a hidden half copy of the pipeline, gigabytes for SD1.5
        pipeline.save_pretrained(partial, safe_serialization=True)
        # diffusers loads the UNet and VAE as fp32 whatever their files hold; transformers loads the text
        # encoder in its config's dtype: say fp32 there too.
        config_path = partial / "text_encoder" / "config.json"
        config = json.loads(config_path.read_text())
        config.update({key: "float32" for key in ("dtype", "torch_dtype") if key in config})
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if (source / METADATA_FILE).is_file():  # what training recorded (clip skip, prediction type) goes along
            shutil.copyfile(source / METADATA_FILE, partial / METADATA_FILE)
        with_default_permissions(partial)
    return destination
