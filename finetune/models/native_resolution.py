"""A base model's own image side (what `finetune sample` without --resolution and `finetune eval` sample at), read from
its configs before it loads: a grid too large to open is then refused in a second, not after torch and the UNet have
loaded (seconds to a minute). Where a base's configs are (`base_part_config`) is read here for the LoRA fit checks too
(finetune/formats/lora_base_fit.py, lora_base_depth.py). Imports neither torch nor diffusers."""

from __future__ import annotations

import json
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # finetune.config's, not imported from there: it imports pydantic


def native_resolution(base: str, base_config: str | None = None) -> int | None:
    """The side the pipeline of `base` samples at, `unet.sample_size * vae_scale_factor` as diffusers computes it, from the
    configs of a diffusers folder, of a hub id in the local cache, or of a single file's `base_config`; None where they
    cannot be read without loading (a single file described by its weights alone, a hub id not in the cache): the
    loaded model's is checked then."""
    unet, vae = (base_part_config(base, base_config, part) for part in ("unet", "vae"))
    if unet is None or vae is None:
        return None
    try:
        sample_size = json.loads(unet.read_text()).get("sample_size")
        blocks = json.loads(vae.read_text()).get("block_out_channels")
    except (OSError, ValueError, AttributeError):  # loading says what is wrong with the files
        return None
    if not isinstance(sample_size, int) or not isinstance(blocks, list) or not blocks:
        return None
    return sample_size * 2 ** (len(blocks) - 1)  # diffusers' vae_scale_factor


def base_part_config(base: str, base_config: str | None, part: str) -> Path | None:
    """The config.json of `part` ("unet", "vae", "text_encoder") of `base`: in its folder or its hub id's local cache,
    or for a single file in its `base_config`'s; None where it is not at hand (a single file without `base_config`)."""
    source = base_config if Path(base).suffix.lower() in SINGLE_FILE_SUFFIXES else base
    return None if source is None else base_config_file(source, f"{part}/config.json")


def base_config_file(source: str, name: str) -> Path | None:
    """`name` in the folder `source`, or in the local cache of hub id `source` (never a download)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(source, name)
    except ValueError:  # no hub id either (huggingface_hub's HFValidationError): loading says it is not there
        return None
    return Path(found) if isinstance(found, str) else None


def far_from_native_line(resolution: int, base: str, base_config: str | None = None) -> str | None:
    """A warning for data.resolution under half, or over twice, the base model's own side (the quickstart's 64 px given
    to SD1.5, a 512 px photo set given to the 64 px toy-world base): training runs, at a size the model never learned to
    draw; None within those (SD1.5 at 256 or 1024 is a choice people make), or where the base's side cannot be read
    without loading it."""
    native = native_resolution(base, base_config)
    if native is None or native / 2 <= resolution <= native * 2:
        return None
    times = f"{resolution // native}x" if resolution > native else f"1/{native // resolution} of"
    return (f"data.resolution {resolution} is {times} the base model's own size ({base}: {native} px, what it learned to draw and samples at): "
            f"a model trained far from the size it learned draws poorly there; set data.resolution near {native} unless that is meant")
