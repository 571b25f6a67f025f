"""`finetune export-checkpoint`: a diffusers SD1.x pipeline as one .safetensors file in the original layout.

AUTOMATIC1111/Forge webui, ComfyUI and model sites load whole models as one file in the original
(CompVis/LDM) Stable Diffusion layout, as sd-scripts writes it: the UNet under `model.diffusion_model.`,
the VAE under `first_stage_model.`, the CLIP text encoder under `cond_stage_model.transformer.text_model.`.
Its names number SD1.x's blocks and layers, so only an SD1.x-shaped pipeline is written: anything else is
refused from its configs, before its weights are read. diffusers' `from_single_file` reads the file back
exactly (tests/test_single_file.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from finetune.counts import counted
from finetune.errors import FinetuneError
from finetune.formats.lora_kinds import CLIP_ROOT
from finetune.formats.original_layout import UNET_RESNET_NAMES, check_sd1_shape, pipeline_config, unet_prefixes
from finetune.models.model_source import resolve_pipeline_folder
from finetune.outputs.atomic_files import atomic_save_safetensors
from finetune.outputs.base_names import shared_record
from finetune.outputs.folders import check_export_checkpoint_output
from finetune.sampling.adapter_records import saved_model_metadata
from finetune.sampling.placement import PRECISIONS

UNET_ROOT, VAE_ROOT, TEXT_ENCODER_ROOT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}
# SD1.5's widths: the webui builds SD1.x from its v1-inference.yaml at these sizes, whatever the file holds.
SD15_WIDTHS = {"unet": [320, 640, 1280, 1280], "text_encoder": 768, "vae": [128, 256, 512, 512]}

# --- names ---------------------------------------------------------------------------------------


def vae_prefixes(layers: int = 2) -> dict[str, str]:
    """diffusers' module prefix -> the original's, for SD1.x's VAE: 4 blocks of `layers` layers (SD1.x's 2), one more in
    the decoder's. The original names each layer within its block (down.0.block.1), so diffusers' loader reads any count
    given the pipeline's configs: `finetune make-tiny-model --preset medium`'s VAE of 1 was refused."""
    names = {name: name for name in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.", "quant_conv.", "post_quant_conv.")}
    for coder in ("encoder", "decoder"):
        names.update({f"{coder}.conv_norm_out.": f"{coder}.norm_out.", f"{coder}.mid_block.attentions.0.": f"{coder}.mid.attn_1."})
        names.update({f"{coder}.mid_block.resnets.{j}.": f"{coder}.mid.block_{j + 1}." for j in range(2)})
    for i in range(4):
        names.update({f"encoder.down_blocks.{i}.resnets.{j}.": f"encoder.down.{i}.block.{j}." for j in range(layers)})
        # The original numbers the decoder's blocks from full resolution up, diffusers from the latent down.
        names.update({f"decoder.up_blocks.{i}.resnets.{j}.": f"decoder.up.{3 - i}.block.{j}." for j in range(layers + 1)})
        if i < 3:
            names[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            names[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{3 - i}.upsample."
    return names


VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state: dict[str, torch.Tensor], prefixes: dict[str, str], inner: dict[str, dict[str, str]], part: str, folder: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """{diffusers name: (original name, tensor)}: each module prefix replaced, and within the modules whose
    diffusers prefix contains a key of `inner` (resnets, attentions) the module name after it too."""
    out = {}
    for name, tensor in state.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            raise FinetuneError(f"{folder} cannot be exported as a webui checkpoint: its {part} weight {name} has no place in SD1.x's original layout")
        rest = name[len(prefix):]
        kind = next((kind for kind in inner if f".{kind}." in prefix), None)
        for old, new in inner.get(kind, {}).items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[name] = (prefixes[prefix] + rest, tensor)
    return out


def to_original_unet(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    return {UNET_ROOT + new: tensor for new, tensor in _rename(state, unet_prefixes(), {"resnets": UNET_RESNET_NAMES}, "UNet", folder).values()}


def to_original_vae(state: dict[str, torch.Tensor], folder: Path, layers: int = 2) -> dict[str, torch.Tensor]:
    renamed = _rename(state, vae_prefixes(layers), {"resnets": VAE_RESNET_NAMES, "attentions": VAE_ATTENTION_NAMES}, "VAE", folder)
    # The original's attention projects with 1x1 convolutions where diffusers uses linear layers.
    return {VAE_ROOT + new: tensor[:, :, None, None] if ".attentions." in name and tensor.ndim == 2 else tensor
            for name, (new, tensor) in renamed.items()}  # fmt: skip


def to_original_text_encoder(state: dict[str, torch.Tensor], positions: int) -> dict[str, torch.Tensor]:
    # transformers 5's CLIPTextModel has no `text_model` level (its files may come from either version).
    renamed = {TEXT_ENCODER_ROOT + name.removeprefix(CLIP_ROOT): tensor for name, tensor in state.items()}
    # The original files hold the position ids (int64, 1 x 77), which transformers no longer saves: tools
    # that tell a model's parts by their keys (the webui's model toolkit) look for them, loaders ignore them.
    renamed.setdefault(TEXT_ENCODER_ROOT + "embeddings.position_ids", torch.arange(positions, dtype=torch.int64)[None])
    return renamed


# --- the pipeline --------------------------------------------------------------------------------


def weights_file(folder: Path, part: str) -> Path:
    """The part's safetensors weights: the plain file, else its one variant (diffusion_pytorch_model.fp16.safetensors)."""
    path = folder / part / WEIGHTS[part]
    if path.is_file():
        return path
    stem = WEIGHTS[part].removesuffix(".safetensors")
    variants = sorted((folder / part).glob(f"{stem}.*.safetensors"))
    if len(variants) == 1:
        return variants[0]
    found = f"it has {', '.join(p.name for p in variants)}: keep one" if variants else "save_pretrained writes one; sharded or .bin weights are not read"
    raise FinetuneError(f"{folder / part} has no single {stem}[.<variant>].safetensors file ({found})")


def export_checkpoint(source: Path, output: Path, precision: str | None = None, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write the pipeline of `source` (a pipeline folder, or a full or DreamBooth-full run's folder) to the
    `output` .safetensors file in the original SD1.x layout, its weights in `precision` (None: as the
    pipeline holds each). Returns the file and notes on how to load it."""
    folder = resolve_pipeline_folder(Path(source))
    check_export_checkpoint_output(folder, output, overwrite)
    configs = check_sd1_shape(folder)
    schedule = pipeline_config(folder / "scheduler" / "scheduler_config.json")
    files = {part: weights_file(folder, part) for part in ("unet", "vae", "text_encoder")}
    tensors = {**to_original_unet(load_file(str(files["unet"])), folder), **to_original_vae(load_file(str(files["vae"])), folder, configs["vae"]["layers_per_block"]),
               **to_original_text_encoder(load_file(str(files["text_encoder"])), configs["text_encoder"].get("max_position_embeddings", 77))}  # fmt: skip
    if precision is not None:  # integer buffers (the position ids) stay as they are
        tensors = {key: value.to(PRECISIONS[precision]) if value.is_floating_point() else value for key, value in tensors.items()}
    recorded = saved_model_metadata(folder)  # what training or merge recorded of the pipeline
    resolution = recorded.get("finetune.resolution") or str(configs["unet"].get("sample_size", 64) * 8)
    metadata = {
        "format": "pt",
        # Stability AI's model spec, as sd-scripts writes it: model sites and managers read these.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": output.stem,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if schedule.get("prediction_type") == "v_prediction" else "epsilon",
        **shared_record(recorded),  # the base by name: an older run's record held its path on this machine
    }
    try:
        atomic_save_safetensors({key: value.contiguous() for key, value in tensors.items()}, output, metadata)
    except OSError as err:  # a full disk, a folder not writable
        raise FinetuneError(f"export-checkpoint could not write {output} ({err.__class__.__name__}: {err.strerror or err}): free space or pick another folder") from None
    return output, usage_notes(output, configs, schedule, recorded)


def usage_notes(output: Path, configs: dict[str, dict], schedule: dict, recorded: dict[str, str]) -> list[str]:
    """What a loader of the file must be told, which the layout cannot say."""
    notes = []
    if schedule.get("prediction_type") == "v_prediction":
        zero_snr = ", zsnr on (it was trained with zero terminal SNR)" if schedule.get("rescale_betas_zero_snr") else ""
        notes.append(f"it predicts v (v-prediction): the webui needs {output.with_suffix('.yaml').name} beside it, a copy of SD1.x's "
                     f'v1-inference.yaml with parameterization: "v" under model.params; ComfyUI a ModelSamplingDiscrete node set to v_prediction{zero_snr}')
    if recorded.get("finetune.clip_skip", "1") != "1":
        notes.append(f"it was trained with clip skip {recorded['finetune.clip_skip']}: set the same in the webui (Clip skip) or ComfyUI (CLIPSetLastLayer -{recorded['finetune.clip_skip']})")
    widths = {"unet": configs["unet"].get("block_out_channels"), "text_encoder": configs["text_encoder"].get("hidden_size"),
              "vae": configs["vae"].get("block_out_channels")}  # fmt: skip
    vae_layers = configs["vae"].get("layers_per_block", 2)
    if widths != SD15_WIDTHS or vae_layers != 2:
        sizes = f"widths are not SD1.5's ({widths})" if widths != SD15_WIDTHS else "sizes are not SD1.5's"
        sizes += f", and its VAE has {counted(vae_layers, 'layer')} per block (SD1.5's: 2)" if vae_layers != 2 else ""
        notes.append(f"its {sizes}: the webui builds SD1.x at SD1.5's and will not load it; "
                     "diffusers' from_single_file does, given this pipeline's configs (config=<the pipeline folder>)")  # fmt: skip
    return notes
