"""LoRA files in both layouts creators meet: ours (diffusers) and kohya's (webui, ComfyUI, sd-scripts).

Both layouts are read into one neutral form, `LoRA`: per adapted module its `down` (A), `up` (B) and
`alpha`, keyed `unet.<module path>` or `text_encoder.<module path>`. Export, import and merging all go
through it, so alpha travels with every module and rank != alpha keeps its strength in every direction.

Kohya names a module by its diffusers path with `.` turned into `_`:
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` and, for CLIP,
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`. webui and ComfyUI map these names onto their own
models. We write that conversion ourselves because diffusers' `convert_state_dict_to_kohya` writes
alpha = rank (losing the trained strength) and, with transformers 5 (whose CLIPTextModel has no
`text_model` level), text-encoder names without `text_model_`, which those tools do not recognise.
"""

from __future__ import annotations

import collections
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from finetune.errors import FinetuneError
from finetune.formats.dora import (
    DIFFUSERS_MAGNITUDE, KOHYA_DORA_ARGS, KOHYA_DORA_METADATA, KOHYA_MAGNITUDE, check_config_magnitudes, check_kohya_magnitudes, diffusers_magnitude,
    kohya_magnitude, read_magnitude, uses_dora,
)
from finetune.formats.kohya_metadata import DATASET_KOHYA_KEYS, KOHYA_KEYS, LORAPLUS_KEYS, finetune_metadata_from_kohya
from finetune.formats.lora_kinds import (
    CONTEXT_INPUTS, KOHYA_PARTS, held_path, lora_layout, sd_version_metadata, with_current_diffusers_names, written_path,
)
from finetune.formats.original_layout import with_diffusers_unet_names
from finetune.outputs.atomic_files import atomic_save_safetensors
from finetune.outputs.base_names import shared_base_name, shared_record
from finetune.sampling.adapter_records import lora_header
from finetune.sampling.placement import PRECISIONS

# Module-path segments of the SD UNet and CLIP that contain "_": kohya's names flatten `.` and `_`
# alike, so reading one back joins the underscore-separated words that form these segments.
COMPOUND_SEGMENTS = frozenset(
    """activation_fn add_embedding add_time_proj conv_act conv_in conv_norm_out conv_out conv_shortcut
    down_blocks final_layer_norm k_proj layer_norm1 layer_norm2 linear_1 linear_2 mid_block out_proj
    position_embedding proj_in proj_out q_proj self_attn text_model text_projection time_emb_proj
    time_embedding time_proj to_k to_out to_q to_v token_embedding transformer_blocks up_blocks v_proj""".split()
)
# Where a LoRA layer's A and B live in diffusers-layout files: what `save_lora` writes per part, and
# peft's own names, which other trainers write.
DIFFUSERS_SUFFIXES = {
    "unet": (".lora.down.weight", ".lora.up.weight"),
    "text_encoder": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
}
DIFFUSERS_SUFFIX_PAIRS = [*DIFFUSERS_SUFFIXES.values(), (".lora_A.weight", ".lora_B.weight")]
DIFFUSERS_ONLY_METADATA = ("lora_adapter_metadata",)


@dataclass
class LoRALayer:
    """One adapted module: W + (alpha / rank) * up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None  # DoRA's, one per output channel (finetune.formats.dora); None: a plain LoRA layer

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def is_conv_3x3(self) -> bool:
        """A LoRA of a 3x3 convolution (LoCon), not of a linear or pointwise (1x1) layer."""
        return self.down.ndim == 4 and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the adapted module's weight (Linear or Conv2d)."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """The weight update at `strength`, shaped like the module's weight."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        update = (up @ down) * (strength * self.alpha / self.rank)
        return update.reshape(self.weight_shape)


@dataclass
class LoRA:
    layers: dict[str, LoRALayer]  # "unet.<module>" / "text_encoder.<module>"
    metadata: dict[str, str] = field(default_factory=dict)

    def common_rank_alpha(self) -> tuple[int, float]:
        """The most frequent (rank, alpha) of the layers other than 3x3 convolutions (of all, in a LoRA of
        only those): what tools show as "the" rank and alpha of the file, as sd-scripts' network_dim."""
        layers = [layer for layer in self.layers.values() if not layer.is_conv_3x3] or list(self.layers.values())
        return collections.Counter((layer.rank, layer.alpha) for layer in layers).most_common(1)[0][0]

    def conv_rank_alpha(self) -> tuple[int, float] | None:
        """The most frequent (rank, alpha) of its 3x3 convolutions (LoCon, sd-scripts' conv_dim), or None."""
        convs = [(layer.rank, layer.alpha) for layer in self.layers.values() if layer.is_conv_3x3]
        return collections.Counter(convs).most_common(1)[0][0] if convs else None


# --- names ---------------------------------------------------------------------------------------


def kohya_name(key: str) -> str:
    """`unet.down_blocks.0.attentions.0...to_q` -> `lora_unet_down_blocks_0_attentions_0_..._to_q`."""
    part, module = key.split(".", 1)
    return KOHYA_PARTS[part] + written_path(part, module).replace(".", "_")


def module_key(name: str) -> str:
    """The inverse of `kohya_name`: rejoin the words of known compound segments, dots elsewhere."""
    for part, prefix in KOHYA_PARTS.items():
        if name.startswith(prefix):
            words, segments, i = name[len(prefix):].split("_"), [], 0
            while i < len(words):
                for length in (3, 2, 1):
                    candidate = "_".join(words[i : i + length])
                    if length == 1 or candidate in COMPOUND_SEGMENTS:
                        segments.append(candidate)
                        i += length
                        break
            return f"{part}.{held_path(part, '.'.join(segments))}"
    raise FinetuneError(f"LoRA key {name} is not a kohya UNet or SD1.x text-encoder name (lora_unet_..., lora_te_...)")


# --- reading -------------------------------------------------------------------------------------


def load_lora(path: Path) -> LoRA:
    """Read a LoRA .safetensors file in either layout (detected from its keys)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise FinetuneError(f"LoRA {path} is not a .safetensors file: pickle checkpoints are not loaded (they can run code)")
    if not path.is_file():
        raise FinetuneError(f"LoRA file {path} not found")
    # From the header first: a file of another kind (a base model given as a LoRA) is refused before it is read whole.
    kohya = lora_layout(path, lora_header(path)[0]) == "kohya"
    try:
        tensors, metadata = read_whole(path)
    except (SafetensorError, OSError) as err:
        raise FinetuneError(f"LoRA {path} is not a readable safetensors file ({str(err).splitlines()[0][:120]}): a truncated download? get it again") from None
    metadata.pop("format", None)
    damaged = next((key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if damaged is not None:  # it would sample black or noise, merge into a model that does, and train NaN from lora.init_from
        raise FinetuneError(f"LoRA {path} holds NaN or infinite values ({damaged}): a damaged file, or one saved from a run that diverged: use another")
    try:  # a key that is no LoRA weight, named with the file it is in
        lora = from_kohya(tensors, metadata) if kohya else from_diffusers(tensors, metadata)
        uses_dora(lora)  # said here, of the file: a DoRA's layers all have magnitudes
        return lora
    except FinetuneError as err:
        raise FinetuneError(f"LoRA {path}: {err}") from None


def read_whole(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata, read into memory whole: tensors that safe_open serves from a memory
    map of the file read its pages when used, and a file truncated and written again in place meanwhile (a second run
    saving over it with open(..., "wb"), a copy onto it) killed the process with a bus error. A LoRA is small; the file's
    bytes are let go once its tensors hold their own copy (safetensors.torch.load copies each out of them)."""
    data = path.read_bytes()
    tensors = load_safetensors(data)  # checks the header and every tensor's place in the bytes first
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return tensors, dict(header.get("__metadata__") or {})


def from_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoRA:
    """Kohya's layout (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; the UNet's original block names
    too), its sd-scripts `ss_` metadata read as ours (`finetune_metadata_from_kohya`)."""
    tensors, layers = with_diffusers_unet_names(tensors), {}
    for key in sorted(tensors):
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        up = tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise FinetuneError(f"LoRA key {key} has no matching {name}.lora_up.weight")
        down = tensors[key]
        alpha, scale = tensors.get(f"{name}.alpha"), tensors.get(name + KOHYA_MAGNITUDE)
        magnitude = read_magnitude(scale, name + KOHYA_MAGNITUDE, up.shape[0], kohya=True) if scale is not None else None
        # No alpha in a kohya file means alpha = rank (strength 1), as sd-scripts and webui read it.
        layers[module_key(name)] = LoRALayer(down, up, float(alpha.item()) if alpha is not None else float(down.shape[0]), magnitude)
    leftover = set(tensors) - {f"{kohya_name(k)}.{s}" for k in layers for s in ("lora_down.weight", "lora_up.weight", "alpha", KOHYA_MAGNITUDE[1:])}
    if leftover:
        raise FinetuneError(f"LoRA key {sorted(leftover)[0]} is not a LoRA down/up weight or alpha: a file with more than a LoRA in it is not loaded")
    lora = LoRA(layers, finetune_metadata_from_kohya(metadata))
    check_kohya_magnitudes(lora, metadata)
    return lora


def from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoRA:
    """Our layout (`unet.<module>.lora.down.weight`, peft config in `lora_adapter_metadata`)."""
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    tensors, layers, used = with_current_diffusers_names(tensors), {}, set()
    for key in sorted(tensors):
        for down_suffix, up_suffix in DIFFUSERS_SUFFIX_PAIRS:
            if not key.endswith(down_suffix):
                continue
            module = key.removesuffix(down_suffix)
            part, path = module.split(".", 1)
            if module + up_suffix not in tensors:
                raise FinetuneError(f"LoRA key {key} has no matching {module + up_suffix}")
            down, up, alpha = tensors[key], tensors[module + up_suffix], tensors.get(f"{module}.alpha")
            alpha = float(alpha.item()) if alpha is not None else _peft_alpha(config, part, path, down.shape[0])
            names = [module + DIFFUSERS_MAGNITUDE + ending for ending in (".weight", "") if module + DIFFUSERS_MAGNITUDE + ending in tensors]
            magnitude = read_magnitude(tensors[names[0]], names[0], up.shape[0], kohya=False) if names else None
            layers[f"{part}.{held_path(part, path)}"] = LoRALayer(down, up, alpha, magnitude)
            used.update({key, module + up_suffix, f"{module}.alpha", *names})
    leftover = set(tensors) - used
    if leftover or not layers:
        raise FinetuneError(f"LoRA key {min(leftover, default='(none)')} is not a plain LoRA down/up weight of the UNet or text encoder")
    lora = LoRA(layers, {k: v for k, v in metadata.items() if not k.startswith(DIFFUSERS_ONLY_METADATA)})
    check_config_magnitudes(lora, config)
    return lora


def _peft_alpha(config: dict, part: str, module: str, rank: int) -> float:
    """The alpha peft would use for `module`, from the saved LoraConfig (alpha = rank if none was saved)."""
    if f"{part}.lora_alpha" not in config:
        return float(rank)
    alpha = config[f"{part}.lora_alpha"]
    for pattern, value in (config.get(f"{part}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):  # peft matches pattern keys against the name's end
            alpha = value
            break
    if config.get(f"{part}.use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r): the same update as alpha*sqrt(r)/r
    return float(alpha)


# --- writing -------------------------------------------------------------------------------------


def to_kohya(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for key, layer in lora.layers.items():
        name = kohya_name(key)
        tensors[f"{name}.lora_down.weight"] = layer.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        if layer.magnitude is not None:
            tensors[name + KOHYA_MAGNITUDE] = kohya_magnitude(layer.magnitude, layer.down.ndim).contiguous()
    # sd-scripts gives the 3x3 convolutions (LoCon) their own rank and alpha, in its network_args.
    convs = [layer for layer in lora.layers.values() if layer.is_conv_3x3]
    rest = [layer for layer in lora.layers.values() if not layer.is_conv_3x3] or convs
    metadata = {
        **_with_rank_alpha(lora),
        # Read by webui's and sd-scripts' LoRA info panels; "Dynamic" is sd-scripts' word for mixed ranks.
        "ss_network_module": "networks.lora",
        **sd_version_metadata(layer.down.shape[1] for key, layer in lora.layers.items() if key.endswith(CONTEXT_INPUTS)),
        "ss_network_dim": _one_or_dynamic(layer.rank for layer in rest),
        "ss_network_alpha": _one_or_dynamic(_alpha_value(layer) for layer in rest),
    }
    for ours, theirs in KOHYA_KEYS:
        if ours in lora.metadata:
            metadata[theirs] = lora.metadata[ours]
    if "ss_sd_model_name" in metadata:
        # What the webui shows: the base as every shared file names it, as sd-scripts writes it (a local one's name only).
        metadata["ss_sd_model_name"] = shared_base_name(metadata["ss_sd_model_name"])
    for ours, _ in DATASET_KOHYA_KEYS:  # large JSON: written once, under sd-scripts' name (an import reads it back as ours)
        metadata.pop(ours, None)
    if lora.metadata.get("finetune.resolution", "").isdigit():  # sd-scripts writes the training size as a (width, height) tuple
        metadata["ss_resolution"] = f"({lora.metadata['finetune.resolution']}, {lora.metadata['finetune.resolution']})"
    if "finetune.prediction_type" in lora.metadata:  # sd-scripts' flags, "True"/"False"
        metadata["ss_v_parameterization"] = str(lora.metadata["finetune.prediction_type"] == "v_prediction")
    if "finetune.method" in lora.metadata:  # ours record these when on: their absence means off
        metadata["ss_zero_terminal_snr"] = str(lora.metadata.get("finetune.zero_terminal_snr") == "true")
        metadata["ss_masked_loss"] = str("finetune.loss_mask" in lora.metadata)
    network_args = {key: lora.metadata[f"finetune.{key}"] for key in LORAPLUS_KEYS if f"finetune.{key}" in lora.metadata}
    if uses_dora(lora):  # LyCORIS' record of a DoRA on peft's axis
        metadata.update(KOHYA_DORA_METADATA)
        network_args.update(KOHYA_DORA_ARGS)
    if convs:
        network_args.update(conv_dim=_one_or_dynamic(layer.rank for layer in convs), conv_alpha=_one_or_dynamic(_alpha_value(layer) for layer in convs))
    if network_args:
        metadata["ss_network_args"] = json.dumps(network_args)
    return tensors, metadata


def _alpha_value(layer: LoRALayer) -> float:
    """Its alpha as written in sd-scripts' metadata: rounded, so rsLoRA's alpha x sqrt(rank) reads 4.0, not 4.000000000000001."""
    return float(f"{layer.alpha:.6g}")


def _one_or_dynamic(values) -> str:
    distinct = set(values)
    return str(distinct.pop()) if len(distinct) == 1 else "Dynamic"


def to_diffusers(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our layout, with a LoraConfig per part that `load_lora_weights` applies as-is (alpha included)."""
    tensors, config = {}, {}
    for part in KOHYA_PARTS:
        layers = {key.split(".", 1)[1]: layer for key, layer in lora.layers.items() if key.startswith(part + ".")}
        if not layers:
            continue
        down_suffix, up_suffix = DIFFUSERS_SUFFIXES[part]
        for module, layer in layers.items():
            name = f"{part}.{written_path(part, module)}"
            tensors[name + down_suffix], tensors[name + up_suffix] = layer.down.contiguous(), layer.up.contiguous()
            if layer.magnitude is not None:
                tensors[name + DIFFUSERS_MAGNITUDE + ".weight"] = diffusers_magnitude(layer.magnitude, layer.down.ndim == 4).contiguous()
        rank, alpha = collections.Counter((l.rank, l.alpha) for l in layers.values()).most_common(1)[0][0]
        config.update({
            f"{part}.r": rank,
            f"{part}.lora_alpha": alpha,
            # Full module paths (CLIP's without `text_model.`: peft matches their end, so they name the
            # module in either transformers): exactly these get a LoRA, and patterns match one module each.
            f"{part}.target_modules": sorted(layers),
            f"{part}.rank_pattern": {m: l.rank for m, l in layers.items() if l.rank != rank},
            f"{part}.alpha_pattern": {m: l.alpha for m, l in layers.items() if l.alpha != alpha},
            f"{part}.use_dora": uses_dora(lora),
        })
    return tensors, {**_with_rank_alpha(lora), "lora_adapter_metadata": json.dumps(config, sort_keys=True)}


def _with_rank_alpha(lora: LoRA) -> dict[str, str]:
    rank, alpha = lora.common_rank_alpha()
    return {**lora.metadata, "finetune.rank": lora.metadata.get("finetune.rank", str(rank)),
            "finetune.alpha": lora.metadata.get("finetune.alpha", str(float(alpha)))}


def save_lora_file(lora: LoRA, path: Path, layout: str, precision: str | None = None) -> Path:
    """Write `lora` in `layout`; its weights in `precision` (fp16 halves the file, as most shared LoRAs
    are; the alphas stay fp32), or as they are (None)."""
    writers = {"kohya": to_kohya, "diffusers": to_diffusers}
    if layout not in writers:
        raise FinetuneError(f"unknown LoRA layout {layout!r}: choose kohya or diffusers")
    tensors, metadata = writers[layout](lora)
    metadata = shared_record(metadata)  # an older run's record named its base by its path on this machine
    if precision is not None:
        tensors = {key: value if key.endswith(".alpha") else value.to(PRECISIONS[precision]) for key, value in tensors.items()}
    atomic_save_safetensors(tensors, Path(path), {"format": "pt", **metadata})
    return Path(path)
