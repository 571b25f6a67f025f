"""Where a base model is: a local diffusers folder, a single `.safetensors`/`.ckpt` file, or a hub id found in
the cache or downloaded. Kept apart from `finetune.models.loading` so that `finetune train` can say a base model is
missing before torch and diffusers load (seconds); it imports neither.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.models.base_folder import (WEIGHTS_STEMS, check_architecture, check_part_files, check_single_file, check_variant, misnamed_weights, missing_part_file, part_weights,
                                  pickle_refusal, read_config)  # fmt: skip
from finetune.checkpoints.run_files import CONTROLNET_DIR, LORA_WEIGHTS_NAME, PIPELINE_DIR
from finetune.config import SINGLE_FILE_SUFFIXES, ModelConfig
from finetune.errors import FinetuneError, looked_for_here
from finetune.models.single_file_configs import SD1_INPAINTING_CONFIGS, SD2_INPAINTING_CONFIGS, check_configs_at_hand, hub_configs_for


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_parts(path: Path, name: str) -> None:
    """A folder missing a part (or a model's weights) would fail deep in loading, or at the first step."""
    missing = [part for part in PIPELINE_PARTS if not (path / part).is_dir()]
    if missing:
        raise FinetuneError(f"base model folder {name} has no {', '.join(missing)}: a Stable Diffusion pipeline folder holds {', '.join(PIPELINE_PARTS)}")
    for part in WEIGHTS_STEMS:
        if not part_weights(path, part):
            raise FinetuneError(f"base model folder {name} has no weights in {part}: copy the whole pipeline folder again")
    if misnamed := misnamed_weights(path, name):
        raise FinetuneError(misnamed)
    check_part_files(path, name)


def resolve_model_folder(config: ModelConfig) -> Path | None:
    """Return the local diffusers folder for `config.pretrained` (a hub id's downloaded whole), or None for a single-file checkpoint."""
    return with_weights(locate_base(config)).folder


@dataclass(frozen=True)
class BaseLocation:
    """Where a base model was found: looked up once per run and passed along (the command's check, `train()`, loading
    and the outputs' reload), since a hub id's lookup is a cache search offline and requests to the hub online."""

    config: ModelConfig  # what was looked up
    folder: Path | None  # its diffusers folder; None for a single .safetensors/.ckpt file
    # False for a hub id whose configs alone are fetched (and checked): loading fetches its weights (`with_weights`).
    weights_fetched: bool = True


def locate_base(config: ModelConfig) -> BaseLocation:
    """Where `config.pretrained` is, checked from its files before anything loads. A hub id's configs alone are
    fetched (kilobytes): its weights (gigabytes) wait for loading, after `finetune train`'s data check."""
    name = config.pretrained
    path = Path(name).expanduser()
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if path.is_symlink() and not path.exists():  # (was "not found", naming neither the link nor where it points)
            raise FinetuneError(f"base model file {name} is a link to {os.readlink(path)}, which is not there: put that file back, or check {config._key}")
        if not path.is_file():
            raise FinetuneError(f"base model file {name} not found: check {config._key}{looked_for_here(name)}")
        # In any letter case (a file copied from Windows, model.SafeTensors): loading gives diffusers its lowercase name
        # (finetune.models.loading.lowercase_suffix), by which it tells a safetensors file from a pickle.
        suffix = path.suffix.lower()
        check_hub_settings(config, "one file")
        if suffix == ".ckpt" and (refusal := pickle_refusal(path, f"base model file {name}")):  # before the data check (loading says it too)
            raise FinetuneError(refusal)
        keys = check_single_file(path, config._key) if suffix == ".safetensors" else None
        if suffix == ".safetensors" and holds_a_lora(path):
            # What to do instead depends on where it was given: a recipe has no --lora (its key starts from a LoRA).
            instead = ("set model.pretrained to the model it was trained on (lora.init_from starts a run from this LoRA)"
                       if config._key == "model.pretrained" else
                       f"pass it as --lora, with {config._key} the model it was trained on (the demo lists the LoRAs under --adapters)")
            raise FinetuneError(f"{name} is a LoRA, not a base model: {instead}")
        if hub_configs_for(path)[0] in (SD1_INPAINTING_CONFIGS, SD2_INPAINTING_CONFIGS):  # as check_architecture says a folder's (a .ckpt's too)
            raise FinetuneError(f"base model {name} has a UNet of 9 input channels (an inpainting model), not a text-to-image one of 4: "
                                "set the base to the model it was made from")  # fmt: skip
        configs = config.single_file_config
        if configs and not looks_like_hub_id(configs) and not Path(configs).expanduser().exists():  # was diffusers' error as it loaded
            raise FinetuneError(f"{config._single_file_config_key} {configs} not found: give the diffusers folder or hub id of the model "
                                f"{name} was made from{where_looked(configs)}")  # fmt: skip
        if configs and Path(configs).expanduser().is_dir():  # the configs diffusers reads the file with
            check_model_settings(Path(configs).expanduser(), config)
        elif not configs and keys is not None:
            check_single_file_settings(keys, config)
        check_configs_at_hand(path, config, hub_offline_by())  # offline, configs from the hub cache: there, or said now
        return BaseLocation(config, None)
    if config.single_file_config:
        raise FinetuneError(
            f"{config._single_file_config_key} describes a single .safetensors/.ckpt base, but {name} is not one: leave it out"
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet" / "config.json").is_file():
            if (path / "pipeline" / "model_index.json").is_file():  # a full fine-tune's or DreamBooth's run folder
                raise FinetuneError(f"base model folder {name} is a training run's (or checkpoint's) folder: point {config._key} at {path / 'pipeline'}")
            raise FinetuneError(
                f"base model folder {name} is not a diffusers pipeline (no model_index.json): "
                f"point {config._key} at a folder saved with save_pretrained, or at a .safetensors file"
            )
        check_hub_settings(config, "a local folder")
        check_pipeline_parts(path, name)
        if config.variant:
            check_variant(path, name, config.variant)
        check_model_settings(path, config)
        return BaseLocation(config, path)
    if path.is_file():  # a .pt, .bin or .pth: was "not found: no such folder or file", of a file that is there
        raise FinetuneError(f"base model {name} is a file finetune does not read as a base model: give a single .safetensors or .ckpt "
                            f"checkpoint, a diffusers folder or a hub id (check {config._key})")  # fmt: skip
    if not looks_like_hub_id(name):
        raise FinetuneError(f"base model {name} not found: no such folder or file (check {config._key}){where_looked(name)}")
    # The configs first: an SDXL or inpainting id is said before gigabytes of its weights download.
    configs = _hub_snapshot(config, config.revision, allow_patterns=["model_index.json", "*/config.json", "scheduler/scheduler_config.json"])
    check_architecture(configs, name)
    check_model_settings(configs, config)
    return BaseLocation(config, configs, weights_fetched=False)


def resolve_pipeline_folder(source: Path) -> Path:
    """The pipeline folder `source` (export-checkpoint's input) is, or the pipeline/ that a full or DreamBooth-full run
    (or one of its checkpoints) saved in it."""
    folder = source / PIPELINE_DIR if (source / PIPELINE_DIR / "model_index.json").is_file() else source
    if (folder / "model_index.json").is_file():
        check_pipeline_parts(folder, str(folder))
        return folder
    if (source / LORA_WEIGHTS_NAME).is_file() or (source.suffix.lower() == ".safetensors" and source.is_file() and holds_a_lora(source)):
        raise FinetuneError(f"{source} holds a LoRA, not a whole model: fold it into its base first (finetune merge --lora {source} MERGED), then export MERGED")
    if not source.exists():
        raise FinetuneError(f"export-checkpoint input {source} not found: pass a pipeline folder, or a full or DreamBooth run's output folder")
    controlnet = source / CONTROLNET_DIR if (source / CONTROLNET_DIR / "config.json").is_file() else source
    if (controlnet / "config.json").is_file() and read_config(controlnet / "config.json", str(controlnet)).get("_class_name") == "ControlNetModel":
        # A single-file checkpoint is a whole pipeline; a ControlNet is used beside its base as it is.
        raise FinetuneError(f"{source} holds a ControlNet, not a whole model: use {controlnet} as it is (finetune sample --controlnet {controlnet}; "
                            f"in diffusers ControlNetModel.from_pretrained('{controlnet}'))")  # fmt: skip
    raise FinetuneError(f"{source} is not a diffusers pipeline folder (no model_index.json) nor a run's folder holding {PIPELINE_DIR}/: pass one of those")


def check_hub_settings(config: ModelConfig, kind: str) -> None:
    """model.revision picks a hub id's commit, and model.variant weights files of a folder: on a local folder or one file they
    were left unread, without a word (a local folder's weights of the variant are still picked: `check_variant`)."""
    unread = ["model.revision"] if config.revision else []
    unread += ["model.variant"] if config.variant and kind == "one file" else []
    if unread:
        what = "a hub id's branch, tag or commit" if unread[0] == "model.revision" else "which weights files of a folder load (e.g. fp16)"
        raise FinetuneError(f"{unread[0]} picks {what}, and base model {config.pretrained} is {kind}: remove {' and '.join(unread)}")


def check_model_settings(folder: Path, config: ModelConfig) -> None:
    """The model: section against the base's own configs: both were refused once the base had loaded, after the data check.
    A config not there (a hub cache without it): loading says it."""
    scheduler, text_encoder = folder / "scheduler" / "scheduler_config.json", folder / "text_encoder" / "config.json"
    predicts = layers = None
    if config.zero_terminal_snr and config.prediction_type is None and scheduler.is_file():
        predicts = read_config(scheduler, config.pretrained).get("prediction_type", "epsilon")  # diffusers' default
    if config.clip_skip > 1 and text_encoder.is_file():
        layers = read_config(text_encoder, config.pretrained).get("num_hidden_layers")
    _check_against_base(config, predicts, layers if isinstance(layers, int) else None)


def _check_against_base(config: ModelConfig, predicts: str | None, layers: int | None, file_kind: str = "") -> None:
    """model.zero_terminal_snr on a base that predicts epsilon (and no model.prediction_type to train v instead), and a
    model.clip_skip past the text encoder's layers; `predicts` and `layers` None where the base does not say. One rule for
    a base folder's configs and a single file's tensor names (`file_kind`: what they show it is)."""
    if config.zero_terminal_snr and config.prediction_type is None and predicts not in (None, "v_prediction"):
        raise FinetuneError(f"model.zero_terminal_snr needs v-prediction (at the last timestep the input is pure noise), and base model "
                            f"{config.pretrained} predicts {predicts}{file_kind}: set model.prediction_type: v_prediction")  # fmt: skip
    if layers is not None and config.clip_skip > layers:  # the words of finetune.models.encoders.skip_last_layers, which loading runs
        raise FinetuneError(f"model.clip_skip {config.clip_skip}: this text encoder has {layers} layers; use 1 to {layers}")


# The text encoder's layers in an original-layout file: SD1.x's CLIP under its transformers names, SD2.x's OpenCLIP as resblocks.
SD1_TEXT_LAYER = re.compile(r"cond_stage_model\.transformer\.(?:text_model\.)?encoder\.layers\.(\d+)\.")
SD2_TEXT_LAYER = re.compile(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")
SD2_UNUSED_TEXT_LAYER = 23  # diffusers leaves SD2's last resblock out (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE): SD2 reads the penultimate layer


def check_single_file_settings(keys: list[str], config: ModelConfig) -> None:
    """`check_model_settings` for a single .safetensors file without model.single_file_config, from its tensors' names:
    diffusers then reads it with its own configs for the kind of model the names show (stable-diffusion-v1-5's for an SD1.x
    file: epsilon prediction; stabilityai/stable-diffusion-2-1's for SD2.x), whose text encoder has the file's layers
    (SD2's less the one diffusers leaves out). An SD2.x file's prediction is diffusers' guess: loading says that one."""
    sd1 = {int(match.group(1)) for key in keys if (match := SD1_TEXT_LAYER.match(key))}
    sd2 = {int(match.group(1)) for key in keys if (match := SD2_TEXT_LAYER.match(key))} - {SD2_UNUSED_TEXT_LAYER}
    _check_against_base(config, "epsilon" if sd1 else None, len(sd1 or sd2) or None, " (an SD1.x file)")


def with_weights(location: BaseLocation) -> BaseLocation:
    """`location` with its weights at hand: a hub id's are downloaded now (or found in the cache), once per location."""
    if location.weights_fetched:
        return location
    allow, ignore = download_patterns(location.config.variant)
    # The commit whose configs were checked (its snapshot folder's name), though the repository changed since.
    commit = location.folder.name if re.fullmatch("[0-9a-f]{40}", location.folder.name) else location.config.revision
    folder = _hub_snapshot(location.config, commit, allow_patterns=allow, ignore_patterns=ignore)
    check_fetched(folder, location.config)
    return BaseLocation(location.config, folder)


def check_fetched(folder: Path, config: ModelConfig) -> None:
    """Offline, snapshot_download returns the cache's snapshot folder without looking for the files asked for: a cache
    holding a base's configs alone (fetched by `locate_base` before an offline run) was diffusers' traceback as it loaded."""
    missing = missing_part_file(folder, config.variant)
    if missing is None:
        return
    repo_id, key = config.pretrained, config._key
    if offline := hub_offline_by():
        raise FinetuneError(f"base model {repo_id} is only partly in the local Hugging Face cache (no {missing}) and downloads are off ({offline}): "
                            f"download the model once with network (run without {offline}), or set {key} to a local diffusers folder")  # fmt: skip
    # Online too: the hub's repository has no such file (finetune fetches safetensors weights), or the hub was out of reach
    # and huggingface_hub answered from the cache.
    raise FinetuneError(f"base model {repo_id} has no {missing} in what was fetched (not on the hub, which finetune fetches safetensors "
                        f"weights from, or the hub was out of reach and the cache holds part of it): check the network and {key}, "
                        "or set it to a local diffusers folder")  # fmt: skip


def location_of(config: ModelConfig, location: BaseLocation | None) -> BaseLocation:
    """`location` where it is the lookup of `config` (the run's, passed along), else `config` looked up now."""
    return location if location is not None and location.config == config else locate_base(config)


def located_folder(config: ModelConfig, location: BaseLocation | None) -> Path | None:
    """`config`'s folder, weights included (`location_of`)."""
    return with_weights(location_of(config, location)).folder


def looks_like_hub_id(name: str) -> bool:
    """`owner/name`, as the hub spells models; not a local path: one starting with `.`, `/` or `~`, holding a backslash,
    of other than two parts, or whose first part is a folder here (runs/edges beside a runs/ folder: a run's output
    that moved or was never written, which the hub would be asked for and answer with its own error, late)."""
    return spelled_as_hub_id(name) and not Path(name.split("/")[0]).is_dir()


def spelled_as_hub_id(name: str) -> bool:
    # A hub id holds letters, digits, "-", "_" and "." only: D:/sd15 (a Windows drive path) was looked up on the hub.
    return name.count("/") == 1 and all(name.split("/")) and not name.startswith((".", "/", "~")) and "\\" not in name and ":" not in name


def where_looked(name: str) -> str:
    """For a local path `name` not found: where it was looked for, and for one spelled as a hub id, that a folder here
    of its first part made it a path (to give a hub id of that name, run from another folder)."""
    first = name.split("/")[0]
    if spelled_as_hub_id(name) and Path(first).is_dir():
        return f" (relative paths are read from the current folder, {os.getcwd()}, whose folder {first} makes it a path into that folder, not a hub id)"
    return looked_for_here(name)


def holds_a_lora(path: Path) -> bool:
    """Whether a .safetensors file's names (its header only) are a LoRA's, in any layout."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:  # the header alone ("pt" would import torch)
            keys = list(f.keys())
    except (SafetensorError, OSError):
        return False  # the loader reports an unreadable file
    return bool(keys) and all("lora" in key or key.endswith(".alpha") for key in keys)


def download_patterns(variant: str | None) -> tuple[list[str], list[str]]:
    """(allow, ignore) file patterns for a diffusers repo: the parts' configs and safetensors weights (of
    `variant`, e.g. fp16, when one is asked for), not the single-file checkpoints many repos also keep at
    their top level (SD1.5's are 11 GB), nor the safety checker, EMA-less copies or pickles."""
    allow = ["*.json", "*.txt", "*/*.safetensors"]
    ignore = ["*non_ema*", "safety_checker/*"]
    if variant != "fp16":
        ignore.append("*.fp16.*")
    return allow, ignore


def _hub_snapshot(config: ModelConfig, revision: str | None, **patterns) -> Path:
    """The files of base model hub id `config.pretrained` at `revision` that `patterns` select (`hub_files`)."""
    return hub_files(config.pretrained, config._key, revision, **patterns)


def hub_files(repo_id: str, key: str, revision: str | None = None, what: str = "base model",
              local: str = "a local diffusers folder or .safetensors file", **patterns) -> Path:  # fmt: skip
    """The files of hub id `repo_id` (given as `key`, a `what`) at `revision` that `patterns` (snapshot_download's
    allow/ignore) select, from the cache, else downloaded (offline, by HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1: the cache only); the revision's
    snapshot folder. Not there is one line naming `key`, and `local`: what else it may be set to."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline_by()
    silent = None if offline else hub_silence(repo_id, revision)
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=offline is not None or silent is not None, **patterns))
    except (LocalEntryNotFoundError, FileNotFoundError):
        # Offline, or online with the hub out of reach (huggingface_hub then looks in the cache, and raises this too).
        why = f"downloads are off ({offline})" if offline else silent or "the hub could not be reached (no network?)"
        raise FinetuneError(
            f"{what} {repo_id} is not in the local Hugging Face cache and {why}: download it once with network, or set {key} to {local} "
            f"(looked in the cache at {constants.HF_HUB_CACHE}; there is no folder {repo_id} in the current folder, {os.getcwd()}, either)"
        ) from None
    except (RepositoryNotFoundError, HFValidationError):
        raise FinetuneError(f"{what} {repo_id} not found on the hub, nor as a folder in the current folder ({os.getcwd()}): check {key}") from None
    except OSError as err:
        raise FinetuneError(f"{what} {repo_id} could not be fetched ({err.__class__.__name__}): check the network or use a local folder") from None


def hub_silence(repo_id: str, revision: str | None) -> str | None:
    """Why the hub counts as out of reach where it takes the connection and never answers (a stalled proxy or network), in
    words; None where it answers, whatever it answers (snapshot_download says that). snapshot_download asks the hub for the
    repository's files with no time limit (huggingface_hub 2.4's repo_info), which kept `finetune train` silent for good before
    its data check: asked here first, within huggingface_hub's own limit for such requests (HF_HUB_ETAG_TIMEOUT, 10 s). Not
    answered in time, the cache alone is read, as huggingface_hub does where the connection is refused."""
    from huggingface_hub import HfApi, constants

    try:
        HfApi().repo_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:  # noqa: BLE001  (not found, gated, refused: snapshot_download meets it again and it is said there)
        # By name: the HTTP library under huggingface_hub changed between its versions (requests' Timeout, httpx's TimeoutException).
        if isinstance(err, TimeoutError) or any(kind.__name__ in ("Timeout", "TimeoutException") for kind in type(err).__mro__):
            return f"the hub ({constants.ENDPOINT}) did not answer within {constants.HF_HUB_ETAG_TIMEOUT} s (HF_HUB_ETAG_TIMEOUT)"
    return None


TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # huggingface_hub's (and datasets') ENV_VARS_TRUE_VALUES, compared upper-cased


def hub_offline_by() -> str | None:
    """The variable that keeps huggingface_hub off the hub, as `NAME=value`, or None where it goes there. As the hub
    library decides (its constants.py): HF_HUB_OFFLINE where it is not empty, else TRANSFORMERS_OFFLINE."""
    name = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    value = os.environ.get(name, "")
    return f"{name}={value}" if value.upper() in TRUE_VALUES else None


def downloads_off() -> bool:
    return hub_offline_by() is not None
