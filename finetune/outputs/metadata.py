"""What every saved result records of its run (safetensors metadata, finetune_metadata.json): its base,
method and recipe, and the settings a loader or a LoRA inspector needs to use or describe it."""

from __future__ import annotations

import collections
import json
from pathlib import Path

from finetune.captions.captions import caption_lines
from finetune.checkpoints.run_files import run_or_checkpoint_name
from finetune.config import Recipe
from finetune.data.sources import Example, source_folder
from finetune.formats.kohya_metadata import LORAPLUS_KEYS
from finetune.models.model_source import looks_like_hub_id
from finetune.outputs.base_names import shared_base_name


# Tags recorded per folder, the most frequent first: enough for every trigger word, and the file's header
# stays small (a folder of 100,000 distinct sentence captions would otherwise write megabytes to each save).
MAX_TAGS_PER_FOLDER = 1000


def dataset_metadata(items: list[Example], with_tags: bool = True, tag_separator: str | None = None) -> dict[str, str]:
    """What an output records of the images it trained on (each listed once per use in an epoch), in sd-scripts'
    forms: per folder its images and repeats, and its captions' tag counts. The webui's LoRA metadata editor
    and LoRA managers offer those tags as a LoRA's trigger words; a DreamBooth pipeline's card shows its prompts.
    `tag_separator` (data.keep_tokens_separator) parts tags as a comma does: 'dog ||| grass' is two tags."""
    folders: dict[Path, dict] = {}
    seen = set()
    for item in items:
        where = source_folder(item)
        folder = folders.setdefault(where, {"n_repeats": item.repeats, "img_count": 0, "tags": collections.Counter()})
        if (item.source, where, item.folder_index) in seen:  # its repeats
            continue
        seen.add((item.source, where, item.folder_index))
        folder["img_count"] += 1
        # Each tag counts once per image, as sd-scripts counts them; a caption without commas is one tag, and
        # each line of a caption of several lines (split where training splits it) is a caption of its own.
        lines = (line.replace(tag_separator, ",") if tag_separator else line for line in caption_lines(item.caption or ""))
        tags = (tag.strip() for line in lines for tag in line.split(","))
        folder["tags"].update(list(dict.fromkeys(tag for tag in tags if tag)))
    # Named as sd-scripts names them, by the folder's name; two folders of one name by their parent's too.
    names = collections.Counter(path.name for path in folders)
    named = {(path.name if names[path.name] == 1 else f"{path.parent.name}/{path.name}"): folder for path, folder in folders.items()}
    recorded = {
        "finetune.num_train_images": str(len(items)),
        "finetune.dataset_dirs": json.dumps({name: {"n_repeats": f["n_repeats"], "img_count": f["img_count"]} for name, f in named.items()}),
    }
    if with_tags:  # checkpoint.record_caption_tags
        tags = {name: dict(f["tags"].most_common(MAX_TAGS_PER_FOLDER)) for name, f in named.items()}
        recorded["finetune.tag_frequency"] = json.dumps(tags, ensure_ascii=False)
    return recorded


def output_metadata(
    recipe: Recipe, step: int, prediction_type: str, epoch: int | None = None, max_steps: int | None = None, dataset: dict[str, str] | None = None,
    started: dict[str, str] | None = None,
) -> dict[str, str]:
    """Recorded in every saved file, so an adapter can be traced to its base, method and recipe, and
    sampled with the target it learned (`prediction_type`, which model.prediction_type may change).
    `step` is the step it was saved at, `epoch` the epochs completed by then, `max_steps` the run's length,
    `dataset` what it trained on (`dataset_metadata`), `started` the method's record of the weights it started
    from (`start_metadata`: made once, when the run starts, and kept by its checkpoints)."""
    metadata = {
        "finetune.method": recipe.method,
        # By name, as shared files name a base: the run's own record (base_paths.json) keeps where it is here.
        "finetune.base_model": shared_base_name(recipe.model.pretrained),
        **({"finetune.base_config": shared_base_name(recipe.model.single_file_config)} if recipe.model.single_file_config else {}),
        "finetune.steps": str(step),
        **({"finetune.epoch": str(epoch)} if epoch is not None else {}),
        **({"finetune.max_steps": str(max_steps)} if max_steps is not None else {}),
        "finetune.prediction_type": prediction_type,
        "finetune.clip_skip": str(recipe.model.clip_skip),
        **({"finetune.zero_terminal_snr": "true"} if recipe.model.zero_terminal_snr else {}),
        **({"finetune.max_token_length": str(recipe.model.max_token_length)} if recipe.model.max_token_length != 75 else {}),
        **({"finetune.loss_mask": recipe.data.loss_mask.source} if recipe.data.loss_mask.enabled else {}),
        "finetune.resolution": str(recipe.data.resolution),
        "finetune.recipe_hash": recipe.fingerprint(),
    }
    if recipe.trains_lora:
        metadata.update({"finetune.rank": str(recipe.lora.rank), "finetune.alpha": str(recipe.lora.alpha)})
        if recipe.lora.conv_rank is not None:
            metadata.update(zip(("finetune.conv_rank", "finetune.conv_alpha"), map(str, recipe.lora.conv_rank_alpha())))
        # LoRA+ ratios under sd-scripts' names (the kohya export writes them as its network_args).
        metadata.update({f"finetune.{key}": f"{getattr(recipe.lora, key):g}" for key in LORAPLUS_KEYS if getattr(recipe.lora, key) is not None})
        if recipe.lora.max_norm is not None:
            metadata["finetune.max_norm"] = f"{recipe.lora.max_norm:g}"
        if recipe.lora.use_dora:
            metadata["finetune.use_dora"] = "true"
    metadata.update(dataset or {})
    if recipe.lora.init_from:  # its name only: a path would carry the user's folders into shared files
        metadata["finetune.init_from"] = Path(recipe.lora.init_from).expanduser().resolve().name  # "." too has a name
    metadata.update(started or {})  # steps above are this run's, from those weights
    return metadata


def started_from(source: str) -> str:
    """What an output records of the ControlNet its run started from (controlnet.pretrained), read when the run
    starts, while its folder is there (by name alone, runs/edges moved away and a hub id are alike): a hub id whole; a local folder by its name
    only, as lora.init_from (a path would carry the user's folders into shared files), a run's `controlnet/` folder
    by its run's name, a checkpoint's by its run's name and the checkpoint (edges/checkpoints/checkpoint-500)."""
    path = Path(source).expanduser()
    if looks_like_hub_id(source) and not path.exists():
        return source
    path = path.resolve()
    return run_or_checkpoint_name(path.parent if path.name == "controlnet" else path)
