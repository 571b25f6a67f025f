"""A local base-model folder's files, checked before anything loads: a part's config that is not JSON (a cut
copy) or describes another class, a weights file cut short, or a missing scheduler config or tokenizer was
diffusers' or transformers' traceback as the model loaded (or at the first training step), after the data check.

Reads the configs and the safetensors headers only: cheap, however large the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import FinetuneError

# What each part's config.json says it is: diffusers' `_class_name`, transformers' `model_type`.
PART_CLASSES = {"unet": ("_class_name", "UNet2DConditionModel"), "vae": ("_class_name", "AutoencoderKL"),
                "text_encoder": ("model_type", "clip_text_model")}  # fmt: skip
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # a CLIP tokenizer's files (or one tokenizer.json)


def read_config(path: Path, name: str) -> dict:
    """A part's JSON config, or one line naming the file (empty or cut short: a copy that did not finish)."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FinetuneError(f"base model folder {name} has no {path.parent.name}/{path.name}: copy the whole pipeline folder again") from None
    except (OSError, ValueError) as err:
        raise FinetuneError(f"base model folder {name}: {path.parent.name}/{path.name} cannot be read ({err.__class__.__name__}; "
                            "empty or cut short?): copy the whole pipeline folder again") from None  # fmt: skip
    if not isinstance(config, dict):
        raise FinetuneError(f"base model folder {name}: {path.parent.name}/{path.name} is not a config (a JSON object): copy the whole pipeline folder again")
    return config


def check_part_files(path: Path, name: str) -> None:
    """Each part's config is its class's, and each safetensors file whole."""
    from safetensors import SafetensorError, safe_open

    configs = {part: read_config(path / part / "config.json", name) for part in PART_CLASSES}
    for part, (key, expected) in PART_CLASSES.items():
        found = configs[part].get(key) or configs[part].get("_class_name")  # a diffusers config in text_encoder/ has no model_type
        if found != expected:
            raise FinetuneError(f"base model folder {name}: {part}/config.json describes {found}, not {expected}: "
                                f"put the pipeline's own {part} folder there (copy the whole pipeline folder again)")  # fmt: skip
    read_config(path / "scheduler" / "scheduler_config.json", name)
    tokenizer = path / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file() and not all((tokenizer / file).is_file() for file in TOKENIZER_FILES):
        raise FinetuneError(f"base model folder {name}: tokenizer/ has no tokenizer.json (nor {' and '.join(TOKENIZER_FILES)}): copy the whole pipeline folder again")
    for part in PART_CLASSES:
        for weights in sorted((path / part).glob("*.safetensors")):
            try:
                with safe_open(str(weights), "pt"):  # the header, checked against the file's length
                    pass
            except (SafetensorError, OSError) as err:
                raise FinetuneError(f"base model folder {name}: {part}/{weights.name} is damaged ({' '.join(str(err).split())}; a copy or "
                                    "download cut short?): copy it again")  # fmt: skip
