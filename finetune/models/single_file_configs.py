"""The configs diffusers reads a single-file base (.safetensors/.ckpt) with, where model.single_file_config names no local
folder: those of a hub model, from the Hugging Face cache or downloaded as the base loads. Offline, a cache without them
was huggingface_hub's long error once the base loaded, after the data check; `check_configs_at_hand` says it in one line
as the base is located. No torch, no diffusers: a safetensors header tells the model's kind.
"""

from __future__ import annotations

from pathlib import Path

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models.base_folder import TOKENIZER_FILES

# diffusers' choice of hub model by the file's tensors (loaders/single_file_utils.py: infer_diffusers_model_type and
# DIFFUSERS_DEFAULT_PIPELINE_PATHS), for the kinds finetune reads; tests/test_single_file_offline.py holds it to diffusers'.
SD1_CONFIGS, SD2_CONFIGS = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1"
SD1_INPAINTING_CONFIGS, SD2_INPAINTING_CONFIGS = "stable-diffusion-v1-5/stable-diffusion-inpainting", "stabilityai/stable-diffusion-2-inpainting"
CROSS_ATTENTION_KEY = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"  # SD2's is 1024 wide
INPUT_CONV_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # an inpainting UNet's takes 9 channels
# What diffusers reads of the hub model's snapshot (with the file's own weights): the pipeline's and each part's configs,
# and the tokenizer's files (its tokenizer.json, or TOKENIZER_FILES).
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")


def hub_configs_for(path: Path) -> tuple[str, ...]:
    """The hub model(s) whose configs diffusers reads `path` with: the one its tensors pick (a .safetensors file's header,
    a .ckpt's pickle: `finetune.models.single_file_shapes`); for a .ckpt whose tensors are not read so (torch's legacy
    format, or no UNet's names), SD1.x's and SD2.x's (either may be its kind)."""
    from finetune.models.single_file_shapes import tensor_shapes

    shape = tensor_shapes(path, (CROSS_ATTENTION_KEY, INPUT_CONV_KEY))  # (`check_single_file` read a .safetensors header whole before this)
    if not shape and path.suffix.lower() != ".safetensors":
        return SD1_CONFIGS, SD2_CONFIGS
    sd2 = shape.get(CROSS_ATTENTION_KEY, (0,))[-1] == 1024
    if len(shape.get(INPUT_CONV_KEY, ())) > 1 and shape[INPUT_CONV_KEY][1] == 9:
        return (SD2_INPAINTING_CONFIGS if sd2 else SD1_INPAINTING_CONFIGS),
    return (SD2_CONFIGS if sd2 else SD1_CONFIGS),


def missing_config(repo_id: str) -> str | None:
    """What the local Hugging Face cache lacks of `repo_id`'s configs (as diffusers looks them up offline: the snapshot
    its main ref names): "all of them", the first file not there, or None where they are all there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # (offline, the snapshot folder its ref names, whatever it holds)
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json", "*.txt"]))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return "all of them"
    if missing := next((name for name in CONFIG_FILES if not (folder / name).is_file()), None):
        return missing
    if (folder / "tokenizer" / "tokenizer.json").is_file():
        return None
    return next((f"tokenizer/{name}" for name in TOKENIZER_FILES if not (folder / "tokenizer" / name).is_file()), None)


def check_configs_at_hand(path: Path, config: ModelConfig, offline: str | None) -> None:
    """Offline (`offline`: the variable that says so, `finetune.models.model_source.hub_offline_by`), the hub configs a
    single-file base is read with are in the local cache: else one line naming the key to give, before the data check."""
    configs = config.single_file_config
    if offline is None or (configs and Path(configs).expanduser().exists()):
        return
    candidates = (configs,) if configs else hub_configs_for(path)
    lacking = {repo_id: missing_config(repo_id) for repo_id in candidates}
    if any(missing is None for missing in lacking.values()):
        return
    key = config._single_file_config_key
    picked = f"({key})" if configs else "(diffusers' pick for its kind)" if len(candidates) == 1 else "(diffusers' pick for a .ckpt of SD1.x or SD2.x)"
    if len(candidates) > 1:
        lack = "neither of which the local Hugging Face cache holds whole"
    elif (missing := lacking[candidates[0]]) == "all of them":
        lack = "which the local Hugging Face cache does not hold"
    else:
        lack = f"of which the local Hugging Face cache lacks {missing}"
    raise FinetuneError(f"base model file {config.pretrained} is read with hub model {' or '.join(candidates)}'s configs {picked}, {lack}, and "
                        f"downloads are off ({offline}): set {key} to a local diffusers folder of the model the file was made from, or run once "
                        "with network so the cache holds them")  # fmt: skip


def cached_prediction_type(path: Path, configs: str | None) -> str | None:
    """What a single-file base is trained to predict as diffusers reads it with a hub model's configs (`configs`, a hub id
    given as model.single_file_config, else the one its tensors pick: `hub_configs_for`): that model's scheduler config in
    the local Hugging Face cache (offline what diffusers reads; diffusers' default, epsilon, where it names none). None for a
    .ckpt of either kind without `configs` (its tensors not read before it loads), or where the cache does not hold the config: loading says it then."""
    from huggingface_hub import try_to_load_from_cache

    from finetune.models.base_folder import read_config

    picks = (configs,) if configs else hub_configs_for(path)
    if len(picks) > 1:  # a .ckpt of either kind
        return None
    repo_id = picks[0]
    found = try_to_load_from_cache(repo_id, "scheduler/scheduler_config.json")
    return read_config(Path(found), repo_id).get("prediction_type", "epsilon") if isinstance(found, str) else None


# What the hub models diffusers picks for a file's kind predict (their scheduler configs): where the cache does not hold
# them yet, online, diffusers fetches these as the file loads.
HUB_PREDICTION_TYPES = {SD1_CONFIGS: "epsilon", SD2_CONFIGS: "v_prediction"}


def check_original_config(path: Path, config: ModelConfig) -> None:
    """A single-file base whose original config beside it (its name with .yaml, as the webui finds it) says it predicts other
    than the hub configs diffusers reads it with (without model.single_file_config, and model.prediction_type unset): an
    SD2.x file of epsilon (SD2's 512 base, whose v2-inference.yaml names no parameterization) is read with
    stabilityai/stable-diffusion-2-1's, of v_prediction, and the run trained it for v without a word. diffusers does not
    read that .yaml (finetune passes it no original_config); the file's tensors say the kind (`hub_configs_for`), or for a
    .ckpt whose tensors are not read so (torch's legacy format), the .yaml's UNet width, as they will."""
    params = original_config_params(path)
    said = None if params is None else "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    if config.single_file_config or config.prediction_type is not None or said is None:
        return
    picks = hub_configs_for(path)
    repo_id = picks[0] if len(picks) == 1 else original_config_hub_configs(params)  # (a .ckpt of either kind: as its .yaml says)
    loads_as = repo_id and (cached_prediction_type(path, repo_id) or HUB_PREDICTION_TYPES.get(repo_id))
    if loads_as and loads_as != said:
        raise FinetuneError(f"base model file {config.pretrained} predicts {said} by {path.with_suffix('.yaml').name} beside it, and diffusers reads it "
                            f"with hub model {repo_id}'s configs, which predict {loads_as}: set model.prediction_type: {said}, or "
                            f"{config._single_file_config_key} to a diffusers folder of the model it was made from")  # fmt: skip


def original_config_params(path: Path) -> dict | None:
    """The model.params of the original (LDM) config beside `path`: its parameterization ("v" for v-prediction, else the
    original code's default, "eps") and its parts' configs; None where there is no such file or it is no such config."""
    config_file = path.with_suffix(".yaml")
    if not config_file.is_file():
        return None
    import yaml

    try:
        params = yaml.safe_load(config_file.read_text())["model"]["params"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError):
        return None
    return params if isinstance(params, dict) else None


def original_config_hub_configs(params: dict) -> str | None:
    """The hub model diffusers reads a .ckpt with, as its original config's UNet says its kind (the width of the text it reads,
    which diffusers tells the kind by: SD2.x's 1024, SD1.x's 768); None where that config does not say it."""
    try:
        unet = params["unet_config"]["params"]
        width, inputs = unet["context_dim"], unet.get("in_channels", 4)
    except (TypeError, KeyError, AttributeError):
        return None
    if inputs != 4:  # an inpainting UNet's (9 inputs): other hub configs, not guessed here
        return None
    return {1024: SD2_CONFIGS, 768: SD1_CONFIGS}.get(width) if isinstance(width, int) else None
