"""LoRA on the UNet (Hu et al., 2021) through peft: low-rank updates to chosen layers, base frozen.

Optionally (`lora.train_text_encoder`, or DreamBooth's switch) also LoRA on the text encoder's attention
projections, or the layers `lora.text_encoder_target_modules` names (sd-scripts trains one by default, its MLP
too). The saved file is diffusers' `pytorch_lora_weights.safetensors` layout, so `StableDiffusionPipeline.load_lora_weights()` reads it with no missing or unexpected keys; the LoRA
config (rank, alpha, targets) travels in the file's metadata so the strength alpha/rank is preserved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.counts import counted
from finetune.errors import FinetuneError
from finetune.formats.dora import DIFFUSERS_MAGNITUDE
from finetune.formats.kohya import DIFFUSERS_SUFFIXES
from finetune.formats.lora_kinds import written_path
from finetune.methods import lora_init
from finetune.methods.base import UNetMethod
from finetune.models.init_from_record import text_encoder_switch
from finetune.models.loading import freeze
from finetune.models.lora_unit_scale import skip_unit_scales
from finetune.models.unet_layer_names import UNET_TARGETS_KEY, block_targets_line, matches, norm_targets_line, unmatched_targets_line, weightless_targets_line
from finetune.optim.max_norm import apply_max_norm, lora_layers
from finetune.outputs.atomic_files import atomic_save_safetensors


class LoRAMethod(UNetMethod):
    name = "lora"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.max_norm_layers: dict[str, torch.nn.Module] | None = None  # lora.max_norm's layers, found at the first step
        self.text_encoder_switch = text_encoder_switch(recipe)[1]  # the key lora.init_from's refusals name (DreamBooth has its own)
        # Read now, before any model loads: a missing or broken file is one line at once.
        self.initial_lora = lora_init.read_checked(recipe.lora, self.train_text_encoder, self.text_encoder_switch) if recipe.lora.init_from else None

    def configure_model(self) -> None:
        settings = self.recipe.lora
        if settings.conv_rank is not None:
            convs = conv_3x3_targets(self.base.unet, settings.target_modules)
            if not convs:
                raise FinetuneError("lora.conv_rank sets the rank of the 3x3 conv layers, and lora.target_modules adapts none: "
                                    "add conv1 and conv2 (the ResNet blocks' convolutions) to it, or remove conv_rank")  # fmt: skip
            conv_rank, conv_alpha = settings.conv_rank_alpha()
            self.start_lines.append(f"LoCon (lora.conv_rank): {len(convs)} 3x3 conv layers at rank {conv_rank}, alpha {conv_alpha:g}")
        adapted = [(self.base.unet, settings.target_modules)] + ([(self.base.text_encoder, settings.text_encoder_target_modules)] if self.train_text_encoder else [])
        # One lora.rank for both models: a rank the UNet's wider layers use is kept though the text encoder's are narrower.
        check_ranks_fit([(model, targets, conv_3x3_targets(model, targets) if settings.conv_rank is not None else []) for model, targets in adapted], settings)
        for (model, targets), key in zip(adapted, (UNET_TARGETS_KEY, "lora.text_encoder_target_modules")):
            add_lora(model, targets, self.weight_dtype, settings, key)
        if settings.use_dora:
            self.start_lines.append("DoRA (lora.use_dora): each adapted layer also learns a magnitude per output channel")
        if settings.max_norm is not None:
            self.start_lines.append(f"max-norm (lora.max_norm): each layer's update is kept within {settings.max_norm:g} after every step "
                                    "(TensorBoard: train/lora/layers_scaled, mean_norm, max_norm)")  # fmt: skip
        if settings.loraplus_lr_ratio is not None:
            self.start_lines.append(f"LoRA+ (lora.loraplus_lr_ratio): the up weights learn at {settings.loraplus_lr_ratio:g} x the learning rate")
        if self.train_text_encoder and settings.loraplus_text_encoder_lr_ratio is not None:
            self.start_lines.append(f"LoRA+ for the text encoder (lora.loraplus_text_encoder_lr_ratio): its up weights at {settings.loraplus_text_encoder_lr_ratio:g} x its rate")
        if self.initial_lora is not None:
            self._start_from_initial_lora()

    def _start_from_initial_lora(self) -> None:
        """lora.init_from: refuse a file trained otherwise, warn where it differs in what it assumed, and load its weights."""
        settings = self.recipe.lora
        lora_init.check_trained_alike(self.initial_lora, settings.init_from, self.recipe.model.clip_skip, self.base.noise_scheduler.config.prediction_type)
        self.start_lines += lora_init.trained_otherwise_warnings(self.initial_lora, settings.init_from, self.recipe.model)
        fresh = lora_init.start_from(self.trained_modules(), self.initial_lora, settings.init_from, self.text_encoder_switch,
                                     settings.text_encoder_target_modules)  # fmt: skip
        rank, alpha = self.initial_lora.common_rank_alpha()
        steps = self.initial_lora.metadata.get("finetune.steps")
        self.start_lines.append(
            f"starting from the LoRA {settings.init_from} (lora.init_from): {len(self.initial_lora.layers)} layers, "
            f"rank {rank}, alpha {alpha:g}" + (f", trained {counted(steps, 'step')}" if steps else "")
        )
        if fresh:  # a larger target list than the file's: said, where it went unseen before
            names = ", ".join(dict.fromkeys(lora_init.target_name(key) for key in fresh))
            self.start_lines.append(f"warning: lora.init_from {settings.init_from} has no weights for {len(fresh)} of this recipe's LoRA layers "
                                    f"({names}; e.g. {fresh[0]}): they start fresh, as in a new LoRA")  # fmt: skip
        self.note_starting_target(self.initial_lora.metadata, f"lora.init_from {settings.init_from}")

    def parameter_groups(self) -> list[dict]:
        groups, settings = super().parameter_groups(), self.recipe.lora
        ratios = {"unet": settings.loraplus_lr_ratio, "text_encoder": settings.loraplus_text_encoder_lr_ratio or settings.loraplus_lr_ratio}
        if not any(ratios.values()):
            return groups
        return loraplus_groups(groups, self.trained_modules(), self.recipe.optimizer.lr, ratios)

    def hold_weight_limits(self, modules) -> dict[str, torch.Tensor]:
        if not self.recipe.lora.max_norm:
            return {}
        if self.max_norm_layers is None:  # found once: walking every module each step would cost the hot path
            self.max_norm_layers = lora_layers(modules)
        return apply_max_norm(self.max_norm_layers, self.recipe.lora.max_norm)

    def save(self, output_dir: Path, modules, metadata: dict[str, str]) -> list[Path]:
        return [save_lora(modules, output_dir / LORA_WEIGHTS_NAME, metadata)]


def loraplus_groups(groups: list[dict], modules: dict[str, torch.nn.Module], default_lr: float, ratios: dict[str, float | None]) -> list[dict]:
    """LoRA+: each named parameter group with a ratio split in two, its down (A) weights at the group's
    learning rate and its up (B) weights (`<name>_up`) at ratio times it."""
    up = {id(p) for module in modules.values() for name, p in module.named_parameters() if ".lora_B." in name}
    split = []
    for group in groups:
        ratio, lr = ratios.get(group["name"]), group.get("lr", default_lr)
        if ratio is None:
            split.append(group)
            continue
        split.append({**group, "params": [p for p in group["params"] if id(p) not in up], "lr": lr})
        split.append({**group, "name": f"{group['name']}_up", "params": [p for p in group["params"] if id(p) in up], "lr": lr * ratio})
    return split


def check_targets(model: torch.nn.Module, target_modules: list[str], key: str = UNET_TARGETS_KEY) -> None:
    """Each name must match layers LoRA can adapt (peft matches a name or a dotted suffix of one, and
    skips a name that matches nothing as long as another name matches, but refuses one any of whose matches it cannot
    adapt). `finetune train` says the names matching no UNet layer, only layers without weights, norm layers or blocks,
    before its data check, from the weights' header (finetune.models.unet_layer_names), in the same lines. `key`: the
    recipe key the lines name (lora.text_encoder_target_modules for the text encoder's)."""
    adaptable = [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    if unmatched := [target for target in target_modules if not any(matches(name, target) for name, _ in model.named_modules())]:
        raise FinetuneError(unmatched_targets_line(unmatched, adaptable, type(model).__name__, key))
    matched = {target: [(name, module) for name, module in model.named_modules() if matches(name, target)] for target in target_modules}
    if weightless := {target: sorted({type(m).__name__ for _, m in found}) for target, found in matched.items()
                      if all(next(m.parameters(), None) is None for _, m in found)}:  # a Dropout, an activation; fmt: skip
        raise FinetuneError(weightless_targets_line(weightless, adaptable, type(model).__name__, key))  # as the header's check says it
    norms = {target: sorted({type(m).__name__ for _, m in found if _own_weight_dims(m) == 1}) for target, found in matched.items()}
    if norms := {target: kinds for target, kinds in norms.items() if kinds}:
        raise FinetuneError(norm_targets_line(norms, adaptable, type(model).__name__, key))
    blocks = {target: [name for name in adaptable if any(name.startswith(f"{block}.") for block, m in found
                                                         if next(m.parameters(recurse=False), None) is None)]
              for target, found in matched.items()}  # fmt: skip
    if blocks := {target: inside for target, inside in blocks.items() if inside}:
        raise FinetuneError(block_targets_line(blocks, type(model).__name__, key))
    for target, found in matched.items():
        kinds = {type(m).__name__ for _, m in found if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        if kinds:
            raise FinetuneError(f"{key}: '{target}' names {', '.join(sorted(kinds))} layers; LoRA adapts Linear and Conv2d layers")


def _own_weight_dims(module: torch.nn.Module) -> int | None:
    """The number of dimensions of the module's own weight (1: a norm's), or None without one."""
    weight = module._parameters.get("weight")
    return weight.dim() if weight is not None else None


def is_conv_3x3(module: torch.nn.Module) -> bool:
    """A convolution that is not pointwise (SD1.5's proj_in/proj_out are 1x1 Conv2d, adapted as linear layers)."""
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def conv_3x3_targets(model: torch.nn.Module, target_modules: list[str]) -> list[str]:
    """The full names of the 3x3 convolutions `target_modules` adapt: the layers lora.conv_rank sets."""
    return [name for name, module in model.named_modules()
            if is_conv_3x3(module) and any(name == target or name.endswith("." + target) for target in target_modules)]  # fmt: skip


def layer_width(module: torch.nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a layer as its LoRA sees them: peft's down (A) matrix of a convolution reads every
    input channel under the kernel (in x kh x kw), its up (B) matrix writes the output channels."""
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1], module.out_channels
    return module.in_features, module.out_features


def check_ranks_fit(adapted: list[tuple[torch.nn.Module, list[str], list[str]]], settings) -> None:
    """Refuse a rank above every adapted layer's min(in, out), before peft allocates anything: up @ down has at most
    that rank, so no layer can use the rest (lora.rank: 1000000 allocated a million-row matrix per layer once the
    model had loaded: 24 s on the tiny test model). A rank between the narrowest and the widest layers' is kept: the
    wider layers use it (SD1.5's attention is 320 to 1280 wide). `adapted`: each model lora.rank adapts, with its
    targets and its 3x3 convolutions at lora.conv_rank; one rank serves them all (the UNet, and with
    lora.train_text_encoder the narrower text encoder), so a layer of any of them may use it."""
    widest: dict[str, tuple[int, str, tuple[int, int]]] = {}  # per key: (most useful rank, layer, its width)
    for model, target_modules, convs in adapted:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in target_modules):
                key, width = "conv_rank" if name in convs else "rank", layer_width(module)
                if key not in widest or min(width) > widest[key][0]:  # the first of the widest, in the models' order
                    widest[key] = (min(width), name, width)
    models = " and ".join(dict.fromkeys(type(model).__name__ for model, _, _ in adapted))
    for key, (useful, name, (inputs, outputs)) in widest.items():
        rank = getattr(settings, key)
        if rank > useful:
            raise FinetuneError(f"lora.{key} ({rank}) is more than any adapted layer of the {models} can use (the widest, {name}: "
                                f"{inputs} in, {outputs} out, is updated fully by a LoRA of rank {useful}): lower lora.{key} to at most {useful}")  # fmt: skip


def add_lora(model: torch.nn.Module, target_modules: list[str], weight_dtype: torch.dtype, settings, key: str = UNET_TARGETS_KEY) -> None:
    """Freeze `model` in `weight_dtype` and attach a LoRA whose own weights stay fp32 (the 3x3
    convolutions at lora.conv_rank where it is set). The ranks are the caller's to check first (`check_ranks_fit`, over
    every model the run adapts: the UNet and the text encoder). `key`: the recipe key `target_modules` is given by."""
    check_targets(model, target_modules, key)
    convs = conv_3x3_targets(model, target_modules) if settings.conv_rank is not None else []
    conv_rank, conv_alpha = settings.conv_rank_alpha()
    freeze(model, weight_dtype)
    model.train()  # LoRA dropout is active while training
    model.add_adapter(
        LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            use_rslora=settings.use_rslora,
            use_dora=settings.use_dora,
            target_modules=list(target_modules),
            # Full names: peft matches a pattern against the end of each module's name.
            rank_pattern={name: conv_rank for name in convs},
            alpha_pattern={name: conv_alpha for name in convs},
            init_lora_weights="gaussian",  # A random, B zero: the adapter starts as a no-op
        )
    )
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    keep_input_dtype(model)
    skip_unit_scales(model)  # alpha = rank: no multiply by 1 per layer and pass


def keep_input_dtype(model: torch.nn.Module) -> None:
    """Stop peft casting each LoRA layer's input to its fp32 weights' dtype. With bf16/fp16 frozen weights
    the model runs under autocast, which casts that input back to half precision for the LoRA's matmul:
    two activation-sized copies per layer and pass (378 of 8018 operations in a forward and backward of
    the medium preset, SD1.5's block pattern) for the same numbers. Without mixed precision everything is
    fp32 and nothing is cast."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def save_lora(modules: dict[str, torch.nn.Module], path: Path, metadata: dict[str, str]) -> Path:
    """Write the LoRA weights of `unet` (and `text_encoder`) in diffusers' layout, configs in the metadata."""
    tensors, lora_config = {}, {}
    for prefix, model in modules.items():
        weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        # diffusers' converter renames attention layers only; left in peft's names (lora_A/lora_B), the
        # other layers (proj, ff, conv) make load_lora_weights skip the renamed ones: one naming for all.
        down, up = DIFFUSERS_SUFFIXES[prefix]
        weights = {key.replace(".lora_A.weight", down).replace(".lora_B.weight", up): value for key, value in weights.items()}
        # DoRA's magnitudes under the name diffusers loads for either part (transformers 5 takes CLIP's only with `.weight`).
        weights = {key + ".weight" if key.endswith(DIFFUSERS_MAGNITUDE) else key: value for key, value in weights.items()}
        # CLIP's under `text_model.`: ComfyUI reads only those names, and diffusers either (as transformers 4 names it).
        tensors.update({f"{prefix}.{written_path(prefix, key)}": value.detach().to("cpu", torch.float32).contiguous() for key, value in weights.items()})
        config = model.peft_config["default"].to_dict()
        lora_config.update({f"{prefix}.{key}": sorted(value) if isinstance(value, set) else value for key, value in config.items()})
    full_metadata = {
        "format": "pt",
        # diffusers reads this key back in load_lora_weights to restore alpha (and so the strength).
        "lora_adapter_metadata": json.dumps(lora_config, sort_keys=True, default=str),
        **metadata,
    }
    atomic_save_safetensors(tensors, path, full_metadata)
    return path
