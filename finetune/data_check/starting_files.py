"""The recipe's own files a run reads besides its data and base model: the weights it starts from (controlnet.pretrained,
lora.init_from) and a ControlNet run's validation conditioning images. Each is checked from its path, config or header, without
torch: `finetune train` says a missing or wrong one before its data check decodes every image (minutes for a large folder)."""

from __future__ import annotations

from pathlib import Path

from finetune.config import Recipe
from finetune.controlnet.folder import (FROM_A_UNET, check_hub_controlnet, not_a_controlnet_message, refuse_a_controlnet_file, require_controlnet_config,
                                        unlocked_decoder_folder)  # fmt: skip
from finetune.checkpoints.run_files import CONTROLNET_DIR, UNET_DIR
from finetune.errors import FinetuneError
from finetune.models.model_source import looks_like_hub_id


def check_starting_files(recipe: Recipe, resuming: bool) -> None:
    """What `finetune train` checks before its data check; ControlNetMethod.check_data and LoRA's start check them again,
    for callers that do not come through the command line. A resume reads no starting weights (finetune.models.start_weights):
    its checkpoint holds them."""
    if recipe.method == "controlnet":
        from finetune.controlnet.pairs import validation_conditions_problem  # PIL and numpy

        if problem := validation_conditions_problem(recipe):
            raise FinetuneError(problem)
        if recipe.controlnet.pretrained is not None and not resuming:
            controlnet_to_load(recipe.controlnet.pretrained)
    if recipe.lora.init_from and not resuming:
        from finetune.sampling.adapter_records import initial_lora_file

        initial_lora_file(recipe.lora.init_from)  # its path and header; its tensors' values are checked as it loads


def controlnet_to_load(pretrained: str) -> str:
    """controlnet.pretrained as a run loads it: a controlnet run's output folder stands for its controlnet/. A file, a folder
    of something else, a ControlNet that works only with its own UNet, or a hub id not found is one line."""
    path = Path(pretrained).expanduser()
    load_from = pretrained
    if (path / CONTROLNET_DIR / "config.json").is_file():  # a controlnet run's output folder, as `finetune sample` takes it
        path = path / CONTROLNET_DIR
        load_from = str(path)
    refuse_a_controlnet_file(path, f"controlnet.pretrained {pretrained}")
    if (path / "config.json").is_file():
        require_controlnet_config(path, f"controlnet.pretrained {pretrained}", f"; {FROM_A_UNET}")
    if (path / "config.json").is_file() and unlocked_decoder_folder(path):  # not a pipeline's controlnet/ beside its unet/
        raise FinetuneError(f"controlnet.pretrained {pretrained} was trained with controlnet.unlock_unet_decoder and works only with its "
                            f"own UNet ({path.parent / UNET_DIR}), which a run does not start from: set controlnet.pretrained: null")  # fmt: skip
    elif looks_like_hub_id(pretrained) and not path.exists():
        check_hub_controlnet(pretrained)
    elif not (path / "config.json").is_file():
        raise FinetuneError(not_a_controlnet_message(path, pretrained))  # what the folder is, where it is one
    return load_from
