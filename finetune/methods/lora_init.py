"""lora.init_from: a LoRA run that starts from an existing LoRA file (ours, diffusers', sd-scripts'), read and checked
before any model loads (ranks, recorded prediction type and token length), then loaded into the attached peft layers;
the warnings where its run read the data otherwise (a zero-terminal-SNR schedule, the caption tokens)."""

from __future__ import annotations

import re

import torch

from finetune.config.methods import TEXT_ENCODER_LAYERS
from finetune.counts import counted
from finetune.errors import FinetuneError
from finetune.formats.dora import row_norms, uses_dora
from finetune.formats.kohya import LoRA, load_lora
from finetune.formats.merge import find_module
from finetune.models.encoders import layer_stack
from finetune.models.init_from_record import check_recorded_alike
from finetune.sampling.adapter_records import initial_lora_file
from finetune.sampling.adapters_as_trained import adapters_max_token_length, adapters_prediction_type


def read_checked(settings, trains_text_encoder: bool, text_encoder_switch: str) -> LoRA:
    """The `lora` settings' init_from file, with what can be checked against the recipe from the file alone;
    `trains_text_encoder`: whether the run trains a text-encoder LoRA, which `text_encoder_switch` turns on."""
    lora = read_initial_lora(settings.init_from, settings.use_dora)
    check_initial_ranks(lora, settings.init_from, settings)
    check_initial_targets(lora, settings.init_from, settings, trains_text_encoder, text_encoder_switch)
    check_initial_record(lora, settings.init_from)
    return lora


def check_initial_targets(lora: LoRA, source: str, settings, trains_text_encoder: bool, text_encoder_switch: str) -> None:
    """The kinds of layer the file adapts against the recipe's targets, from their names alone, so that the setting to
    change is said before the model loads, and by check-data (it said "ready to train" of a file the run then refused);
    `start_from` checks each layer against the model."""
    text_layers = [key for key in lora.layers if key.startswith("text_encoder.")]
    if foreign := [key for key in text_layers if target_name(key) not in settings.text_encoder_target_modules]:
        raise FinetuneError(text_encoder_layers_problem(source, foreign, "" if trains_text_encoder else text_encoder_switch))
    if text_layers and not trains_text_encoder:
        raise FinetuneError(f"lora.init_from {source} has text-encoder layers: set {text_encoder_switch}: true to start from them too")
    left_out = [key for key in lora.layers if key.startswith("unet.") and not any(key.endswith(f".{target}") for target in settings.target_modules)]
    if left_out:
        raise FinetuneError(unet_layers_problem(source, left_out))


def text_encoder_layers_problem(source: str, foreign: list[str], text_encoder_switch: str) -> str:
    """Text-encoder layers (keys) this recipe's text-encoder LoRA leaves out; `text_encoder_switch`: the key to turn it on
    too, where it is off ("" where it trains)."""
    kinds = list(dict.fromkeys(target_name(key) for key in foreign))
    names = ", ".join(kinds)
    if all(kind in TEXT_ENCODER_LAYERS for kind in kinds):  # sd-scripts' MLP layers: a setting adapts them
        also = f", and set {text_encoder_switch}: true" if text_encoder_switch else ""
        return (f"lora.init_from {source} adapts text-encoder layers ({names}; e.g. {foreign[0]}) that this recipe's text-encoder LoRA "
                f"leaves out: add {names} to lora.text_encoder_target_modules{also}")  # fmt: skip
    return (f"lora.init_from {source} adapts text-encoder layers ({names}; e.g. {foreign[0]}) that this project's text-encoder LoRA "
            f"does not train (it trains {', '.join(TEXT_ENCODER_LAYERS)}): it cannot start from this file")  # fmt: skip


def unet_layers_problem(source: str, left_out: list[str]) -> str:
    names = ", ".join(dict.fromkeys(target_name(key) for key in left_out))
    return f"lora.init_from {source} adapts {counted(len(left_out), 'layer')} this recipe's LoRA leaves out (e.g. {left_out[0]}): add {names} to lora.target_modules"


def read_initial_lora(source: str, use_dora: bool) -> LoRA:
    lora = load_lora(initial_lora_file(source))
    if uses_dora(lora) and not use_dora:  # a plain LoRA has nowhere to keep its magnitudes (the other way round is fine)
        raise FinetuneError(f"lora.init_from {source} is a DoRA (a magnitude per output channel beside its LoRA): set lora.use_dora: true to start from it")
    return lora


def rank_problem(source: str, key: str, rank: int, recipe_rank: int, conv_3x3: bool) -> str:
    if conv_3x3:  # LoCon: lora.conv_rank, or lora.rank where it is not set
        return f"lora.init_from {source} has rank {rank} at the 3x3 conv layer {key}, this recipe gives those rank {recipe_rank}: set lora.conv_rank: {rank}"
    return f"lora.init_from {source} has rank {rank} at {key}, this recipe's lora.rank is {recipe_rank}: set lora.rank: {rank}"


def check_initial_ranks(lora: LoRA, source: str, settings) -> None:
    """The UNet layers' ranks against the recipe's, from the file alone, so that a rank to change is said before the model
    loads (the text encoder's: by `start_from`, which knows the layers model.clip_skip leaves unused)."""
    conv_rank, _ = settings.conv_rank_alpha()
    for key, layer in sorted(lora.layers.items()):
        recipe_rank = conv_rank if layer.is_conv_3x3 else settings.rank
        if key.startswith("unet.") and layer.rank != recipe_rank:
            raise FinetuneError(rank_problem(source, key, layer.rank, recipe_rank, layer.is_conv_3x3))


def check_initial_record(lora: LoRA, source: str) -> None:
    """A prediction type or token length no training writes (an edited file) is one line before the model loads, as sample
    says it (after it: advice to set model.prediction_type to it, which recipes refuse, or int()'s traceback)."""
    adapters_prediction_type({f"lora.init_from {source}": lora.metadata})
    adapters_max_token_length({f"lora.init_from {source}": lora.metadata})


def check_trained_alike(lora: LoRA, source: str, clip_skip: int, prediction_type: str) -> None:
    """A LoRA continued with another prompt encoding (model.clip_skip) or another target (model.prediction_type) would
    start from what it did not learn (`finetune train` said it before its data check: finetune.models.init_from_record)."""
    check_recorded_alike(lora.metadata, source, clip_skip, prediction_type)


def trained_otherwise_warnings(lora: LoRA, source: str, model_settings) -> list[str]:
    """A warning line for each setting of the recipe's model section (model.zero_terminal_snr, max_token_length) that
    reads the data otherwise than the run that trained `lora` did: it trains on, from weights learned another way."""
    lines = []
    if "finetune.method" in lora.metadata:  # ours record the schedule (files from elsewhere say nothing)
        trained_zero_snr = lora.metadata.get("finetune.zero_terminal_snr") == "true"
        if trained_zero_snr != model_settings.zero_terminal_snr:
            lines.append(
                f"warning: lora.init_from {source} was trained {'with' if trained_zero_snr else 'without'} a zero-terminal-SNR "
                f"schedule, this run trains {'with' if model_settings.zero_terminal_snr else 'without'} one: set model.zero_terminal_snr: "
                f"{str(trained_zero_snr).lower()} to continue as it was trained"
            )
    # Ours record it when not 75; files from elsewhere say nothing unless sd-scripts' ss_max_token_length did.
    recorded = lora.metadata.get("finetune.max_token_length") or ("75" if "finetune.method" in lora.metadata else None)
    if recorded is not None and int(recorded) != model_settings.max_token_length:
        lines.append(
            f"warning: lora.init_from {source} was trained reading {recorded} caption tokens, this run reads "
            f"{model_settings.max_token_length} (model.max_token_length): set it to {recorded} to continue as it was trained"
        )
    return lines


def start_from(modules: dict[str, torch.nn.Module], lora: LoRA, source: str, text_encoder_switch: str, text_encoder_targets: list[str]) -> list[str]:
    """Set the attached (peft) LoRA to `lora`'s weights, so the model starts as base + that LoRA; its own
    alpha is kept by scaling the up weights to this recipe's alpha/rank. Layers that model.clip_skip leaves
    out have nothing to start (sd-scripts saves LoRAs of them, unused). `text_encoder_switch` is the key
    that trains the text encoder's LoRA (DreamBooth has its own), `text_encoder_targets` the layers it adapts
    (lora.text_encoder_target_modules). Returns the recipe's LoRA layers the file has nothing for (they start
    fresh, as sd-scripts' network_weights leaves them), by name."""
    kept_layers = len(layer_stack(modules["text_encoder"]).layers) if "text_encoder" in modules else None
    starts, left_out, text_layers = [], [], []
    for key, layer in lora.layers.items():
        part, path = key.split(".", 1)
        index = re.search(r"encoder\.layers\.(\d+)\.", path) if part == "text_encoder" else None
        if index and kept_layers is not None and int(index.group(1)) >= kept_layers:
            continue
        if part == "text_encoder" and target_name(key) not in text_encoder_targets:
            left_out.append(key)  # a layer this recipe's text-encoder LoRA leaves out (sd-scripts also adapts the MLP: fc1, fc2)
        elif part not in modules:
            text_layers.append(key)
        elif hasattr(module := _module_of(modules[part], path, part, source), "lora_A"):
            starts.append((key, layer, module))
        else:
            left_out.append(key)
    foreign = [key for key in left_out if key.startswith("text_encoder.")]
    if foreign:  # before asking for the text encoder's LoRA, which could not take them either
        raise FinetuneError(text_encoder_layers_problem(source, foreign, "" if "text_encoder" in modules else text_encoder_switch))
    if text_layers:
        raise FinetuneError(f"lora.init_from {source} has text-encoder layers: set {text_encoder_switch}: true to start from them too")
    if left_out:
        raise FinetuneError(unet_layers_problem(source, left_out))
    for key, layer, module in starts:
        base_shape = tuple(module.get_base_layer().weight.shape)
        if layer.weight_shape != base_shape:  # the rank may well agree: "has rank 4 ..., lora.rank is 4: set lora.rank: 4" said nothing
            raise FinetuneError(f"lora.init_from {source} does not fit this base model: its layer {key} is for a weight of shape {layer.weight_shape}, "
                                f"the base model's is {base_shape}: start from a LoRA trained on this base (model.pretrained), or set model.pretrained to its")  # fmt: skip
        down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
        if tuple(down.shape) != tuple(layer.down.shape) or tuple(up.shape) != tuple(layer.up.shape):
            raise FinetuneError(rank_problem(source, key, layer.rank, down.shape[0], layer.is_conv_3x3))  # its shape is the base layer's (above)
        with torch.no_grad():
            down.copy_(layer.down)
            up.copy_(layer.up * (layer.alpha / layer.rank) / module.scaling["default"])
            if "default" in module.lora_magnitude_vector:  # DoRA: the file's magnitudes, or for a plain LoRA ||W + update||,
                magnitude = module.lora_magnitude_vector["default"].weight  # with which the layer starts as W + update
                base = module.get_base_layer().weight.float()
                start = layer.magnitude if layer.magnitude is not None else row_norms(base + layer.delta().to(base.device))
                magnitude.copy_(start.reshape(magnitude.shape))
    started = {id(module) for _, _, module in starts}
    return [f"{part}.{name}" for part, model in modules.items() for name, module in model.named_modules() if hasattr(module, "lora_A") and id(module) not in started]


def _module_of(model: torch.nn.Module, path: str, part: str, source: str) -> torch.nn.Module:
    """The layer a lora.init_from file adapts; a layer the model lacks is said of the file (the loader's line named neither it nor the key)."""
    try:
        return find_module(model, path, part)
    except FinetuneError:
        raise FinetuneError(f"lora.init_from {source} does not fit this base model: its layer {part}.{path} is not in it (a LoRA of another architecture): "
                            "start from a LoRA trained on this base (model.pretrained), or set model.pretrained to its") from None


def target_name(key: str) -> str:
    """The lora.target_modules name of a layer (`unet.down_blocks.0.attentions.0.proj_in` -> proj_in): its last
    name, with the indices and the feed-forward's `net` that the recipes' names carry (to_out.0, ff.net.0.proj)."""
    parts = key.split(".")
    taken = 1
    while taken < len(parts) and (parts[-taken].isdigit() or parts[-taken] == "net" or parts[-taken:] == ["proj"]):
        taken += 1
    return ".".join(parts[-taken:])
