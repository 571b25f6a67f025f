"""Whether a LoRA file fits a base model, told from the file's header (its tensors' names and shapes) and the base's
configs, without torch: `finetune sample` and `merge` said a LoRA for another base (an SDXL or SD2.x one on SD1.5) once
torch, diffusers and the base had loaded, 23 to 25 s in. The layers that read the prompt tell it: the UNet's
cross-attention keys and values take text as wide as the base's `cross_attention_dim`, the text encoder's attention
projections its `hidden_size`; then the layers' places against the base's depth (`finetune.formats.lora_base_depth`). What
these cannot tell (a layer the base lacks by name) is said as the LoRA loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.formats.lora_base_depth import TEXT_ENCODER_PREFIXES, lora_depth_problem
from finetune.formats.lora_kinds import lora_layout
from finetune.models.native_resolution import SINGLE_FILE_SUFFIXES, base_part_config
from finetune.models.single_file_configs import CROSS_ATTENTION_KEY

# The down (A) weight of a LoRA layer in each layout: kohya's, diffusers' UNet and text encoder, peft's. Its shape is
# (rank, input width) for a linear layer.
DOWN_ENDINGS = (".lora_down.weight", ".lora.down.weight", ".lora_linear_layer.down.weight", ".lora_A.weight")
# Layers whose input is the prompt's encoding, by the config key that gives its width: `.`- and `_`-joined names alike.
CROSS_ATTENTION = re.compile(r"attn2[._]to_[kv][._]")
TEXT_ATTENTION = re.compile(r"self_attn[._][qkv]_proj")
# An SD1.x single file's CLIP attention (transformers 4's names, and those of files from before its text_model level).
SD1_CLIP_KEYS = tuple(f"cond_stage_model.transformer.{root}encoder.layers.0.self_attn.q_proj.weight" for root in ("text_model.", ""))
# An SD2.x single file's OpenCLIP attention: q, k and v packed in one tensor, (3 x width, width).
SD2_CLIP_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
# What each width says of a base, for the line.
WIDTHS = "SD1.x: 768, SD2.x: 1024, SDXL: 2048"


def lora_base_problem(lora_file: Path, base: str, base_config: str | None = None, named: str | None = None,
                      fix: str = "pass that one as --base") -> str | None:
    """Why LoRA file `lora_file` cannot load into `base` (a folder, a hub id in the local cache, a single file with
    `base_config`'s configs, or a single file (.safetensors or .ckpt) by its own tensors), naming both; None where it may (what loading
    checks besides), or where the base's widths cannot be read without loading it. A file of a kind not loaded here (SDXL's
    names, LyCORIS) is one line too. `named`: the LoRA as the line names it ("LoRA FILE", or the
    demo's name for it); `fix`: what to do, for the command, key or page that gave it."""
    from safetensors import SafetensorError, safe_open  # numpy's reader: "pt" imports torch

    try:
        with safe_open(str(lora_file), "np") as f:
            keys = list(f.keys())
            lora_layout(lora_file, keys)  # an SDXL or LyCORIS file by its names, as loading says it
            shapes = {key: f.get_slice(key).get_shape() for key in keys if key.endswith(DOWN_ENDINGS)}
    except (SafetensorError, OSError):  # loading says what is wrong with the file
        return None
    widths = base_text_widths(base, base_config)
    for key, shape in shapes.items():
        if len(shape) != 2:  # a convolution's: no text width
            continue
        if CROSS_ATTENTION.search(key) and not key.startswith(TEXT_ENCODER_PREFIXES):
            part = "unet"
        elif TEXT_ATTENTION.search(key) and key.startswith(TEXT_ENCODER_PREFIXES):
            part = "text_encoder"
        else:
            continue
        if part in widths and shape[1] != widths[part][1]:
            said, width = widths[part]
            return (f"{named or f'LoRA {lora_file}'} does not fit base model {base}: its layer {key.removesuffix('.weight')} reads text "
                    f"{shape[1]} wide, the base's {said} {width} ({WIDTHS}): the LoRA was trained on another base; {fix}")
    if problem := lora_depth_problem(list(shapes), base, base_config):  # as wide, but of another depth
        return f"{named or f'LoRA {lora_file}'} does not fit base model {base}: its layer {problem}: the LoRA was trained on another base; {fix}"
    return None


def base_text_widths(base: str, base_config: str | None) -> dict[str, tuple[str, int]]:
    """The width of the text the base's UNet cross-attends to ("unet") and its text encoder's ("text_encoder"), each with
    where it is said: from its configs, or a single file's own tensors where no configs are given (diffusers
    then picks a hub model's configs by those same tensors); those that cannot be read without loading are left out."""
    if Path(base).suffix.lower() in SINGLE_FILE_SUFFIXES and base_config is None:
        return _single_file_widths(Path(base).expanduser())
    widths = {}
    for part, setting in (("unet", "cross_attention_dim"), ("text_encoder", "hidden_size")):
        config_file = base_part_config(base, base_config, part)
        if (width := _config_value(config_file, setting)) is not None:
            widths[part] = (f"{config_file} has {setting}", width)
    return widths


def _single_file_widths(path: Path) -> dict[str, tuple[str, int]]:
    """`base_text_widths` of an original-layout (webui) SD file, from its tensors' shapes (a .safetensors header, a .ckpt's
    pickle: `finetune.models.single_file_shapes`): a cross-attention key's input width, and its CLIP's (SD1.x's CLIP, or
    SD2.x's OpenCLIP, whose width an SD1.x text-encoder LoRA was not checked against before it loaded)."""
    from finetune.models.single_file_shapes import tensor_shapes

    clips = (*SD1_CLIP_KEYS, SD2_CLIP_KEY)
    shapes, widths = tensor_shapes(path, (CROSS_ATTENTION_KEY, *clips)), {}
    for part, key in (("unet", CROSS_ATTENTION_KEY), *(("text_encoder", clip) for clip in clips)):
        if key in shapes and part not in widths and len(shapes[key]) == 2:
            widths[part] = (f"{path.name} has {re.sub(r'[._]weight$', '', key)} reading text", shapes[key][1])
    return widths


# What to do with a lora.init_from of another base (as the LoRA method says it: finetune.methods.lora_init).
INIT_FROM_FIX = "start from a LoRA trained on this base (model.pretrained), or set model.pretrained to its"


def init_from_base_problem(init_from: str, model) -> str | None:
    """`lora_base_problem` of lora.init_from on the recipe's base (`model`: its ModelConfig), said by `finetune train` before its
    data check and by check-data; the LoRA method said it once the base had loaded."""
    from finetune.sampling.adapter_records import initial_lora_file

    return lora_base_problem(initial_lora_file(init_from), model.pretrained, model.single_file_config, named=f"lora.init_from {init_from}", fix=INIT_FROM_FIX)


def check_lora_base_fit(lora_file: Path, base: str, base_config: str | None = None) -> None:
    """`lora_base_problem` as the FinetuneError `sample`, `merge` and `eval` stop with, before torch loads."""
    if problem := lora_base_problem(lora_file, base, base_config):
        raise FinetuneError(problem)


def _config_value(config_file: Path | None, setting: str) -> int | None:
    """An int setting of a config file; None where the file or the setting is not there or is something else (a list of
    widths per block: loading checks it)."""
    if config_file is None:
        return None
    try:
        value = json.loads(config_file.read_text()).get(setting)
    except (OSError, ValueError, AttributeError):  # loading says what is wrong with the file
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
