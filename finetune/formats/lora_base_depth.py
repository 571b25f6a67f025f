"""Whether a LoRA's layers sit where its base has layers, told from the layers' names and the base's configs, without torch:
a LoRA of a base as wide but of other depth (more UNet blocks, an attention where the base's block has none, more
text-encoder layers) was said only as it loaded into the loaded base. `finetune.formats.lora_base_fit` says a LoRA of
another width first; this, what the widths cannot tell. Where the configs are not at hand (a single file without
--base-config, a hub id not in the cache), loading says it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.models.native_resolution import base_part_config

# Where a layer sits, by the numbers in its name (`.`- and `_`-joined names alike): a UNet block, and in it an attention or
# resnet and that attention's transformer block; a text-encoder layer.
UNET_PLACE = re.compile(r"(down|up)_blocks[._](\d+)(?:[._](attentions|resnets)[._](\d+)(?:[._]transformer_blocks[._](\d+))?)?[._]")
TEXT_LAYER = re.compile(r"encoder[._]layers[._](\d+)[._]")
TEXT_ENCODER_PREFIXES = ("text_encoder.", "lora_te_")


def lora_depth_problem(keys: list[str], base: str, base_config: str | None) -> str | None:
    """The first of the LoRA's layers `keys` (its tensors' names) that the base lacks, where it would be and what the base's
    configs say it has instead ("LAYER is in ..., which the base's ... does not have (...)"); None where each may be there."""
    configs = {part: _config(base, base_config, part) for part in ("unet", "text_encoder")}
    for key in keys:
        if key.startswith(TEXT_ENCODER_PREFIXES):
            problem = _text_layer_problem(key, *configs["text_encoder"])
        else:
            problem = _unet_place_problem(key, *configs["unet"])
        if problem:
            return f"{key.removesuffix('.weight')} {problem}"
    return None


def _config(base: str, base_config: str | None, part: str) -> tuple[Path | None, dict]:
    """The config file of `part` of the base (its folder's, a hub id's in the local cache, a single file's --base-config's)
    and what it holds; (None, {}) where it is not at hand."""
    config_file = base_part_config(base, base_config, part)
    try:
        config = json.loads(config_file.read_text()) if config_file else {}
    except (OSError, ValueError):  # loading says what is wrong with the file
        return None, {}
    return (config_file, config) if isinstance(config, dict) else (None, {})


def _text_layer_problem(key: str, config_file: Path | None, config: dict) -> str | None:
    layers = config.get("num_hidden_layers")
    if not (found := TEXT_LAYER.search(key)) or not isinstance(layers, int) or int(found.group(1)) < layers:
        return None
    return f"is in text-encoder layer {found.group(1)}, which the base's {config_file} does not have (its num_hidden_layers is {layers})"


def _unet_place_problem(key: str, config_file: Path | None, config: dict) -> str | None:
    """A UNet layer in a block the base does not have, in an attention of a block without (a DownBlock2D's), or at an
    attention, resnet or transformer block past the block's count."""
    if not (found := UNET_PLACE.search(key)) or not isinstance(types := config.get(f"{found.group(1)}_block_types"), list):
        return None
    kind, block, inner, index, transformer = found.group(1), int(found.group(2)), found.group(3), found.group(4), found.group(5)
    where = f"is in {kind} block {block}"
    if block >= len(types):
        return f"{where}, which the base's {config_file} does not have (its {kind}_block_types are {len(types)})"
    if inner == "attentions" and "Attn" not in str(types[block]):
        return f"{where}'s attentions, which the base's {config_file} does not have (its {kind}_block_types[{block}] is {types[block]})"
    # up blocks hold one layer more than down blocks; per-block settings are listed for the down blocks (up: reversed)
    layers = _per_block(config.get("layers_per_block"), block, len(types), kind == "up")
    layers = layers + 1 if layers is not None and kind == "up" else layers
    if inner and layers is not None and int(index) >= layers:
        return f"{where}'s {inner} {index}, which the base's {config_file} does not have (its layers_per_block is {config.get('layers_per_block')})"
    depth = _per_block(config.get("transformer_layers_per_block", 1), block, len(types), kind == "up")
    if transformer is not None and depth is not None and int(transformer) >= depth:
        return (f"{where}'s transformer block {transformer}, which the base's {config_file} does not have (its transformer_layers_per_block "
                f"is {config.get('transformer_layers_per_block', 1)})")
    return None


def _per_block(setting, block: int, blocks: int, up: bool) -> int | None:
    """A setting of one int for every block, or a list of one per down block (up blocks in reverse); None where it is other."""
    if isinstance(setting, int) and not isinstance(setting, bool):
        return setting
    if isinstance(setting, list) and len(setting) == blocks and all(isinstance(value, int) for value in setting):
        return setting[blocks - 1 - block] if up else setting[block]
    return None
