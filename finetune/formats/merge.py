"""`finetune merge`: fold a LoRA into the base weights, for tools and hosts that take one full model.

Each adapted weight becomes W + s * (alpha / rank) * up @ down (a DoRA's, rescaled by its magnitudes: finetune.formats.dora),
computed in fp32 from our neutral `LoRA` form, so a kohya file and one of ours merge identically and alpha != rank keeps its strength.
The result equals the LoRA applied at scale s (what `set_adapters(..., adapter_weights=[s])` does),
and is written as a complete diffusers pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.formats.dora import decomposed
from finetune.formats.kohya import LoRA, load_lora
from finetune.formats.lora_kinds import CLIP_ROOT
from finetune.formats.model_card import diffusers_loading_code
from finetune.models.loading import load_base_model, zero_terminal_snr_schedule
from finetune.outputs.atomic_files import atomic_write_text
from finetune.outputs.base_names import shared_base_name
from finetune.outputs.folders import check_merge_output, check_not_what_it_reads
from finetune.outputs.pipeline_io import save_pipeline
from finetune.sampling.placement import PRECISIONS


def check_lora_fits(models: dict[str, torch.nn.Module], lora: LoRA) -> dict[str, torch.Tensor]:
    """Every layer of the LoRA is a layer of the model with its shape, else one line naming the first that is not (the
    caller says which LoRA and which base: sample, merge and the demo each name them their own way); returns the
    model's weights the layers adapt, by layer key."""
    weights = {}
    for key, layer in lora.layers.items():
        part, path = key.split(".", 1)
        weights[key] = weight = getattr(find_module(models[part], path, part), "weight", None)
        if not isinstance(weight, torch.Tensor):  # a block of layers (a CrossAttnDownBlock2D): `.weight` was a traceback
            raise FinetuneError(f"LoRA layer {key} is not a layer with weights in the base model: the LoRA was trained on another architecture")
        if tuple(weight.shape) != layer.weight_shape:
            raise FinetuneError(f"LoRA layer {key} has shape {layer.weight_shape} but the base model's is {tuple(weight.shape)}: another base model?")
    return weights


def merge_into(models: dict[str, torch.nn.Module], lora: LoRA, strength: float) -> dict[str, torch.Tensor]:
    """Add every layer's update in place (a layer the model does not have is an error, not a skip, before any weight
    changes); returns the merged weights, by layer key."""
    weights = check_lora_fits(models, lora)
    for key, layer in lora.layers.items():
        weight, update = weights[key], layer.delta(strength)
        merged = weight.float() + update if layer.magnitude is None else decomposed(weight, update, layer.magnitude)  # a DoRA: finetune.formats.dora
        with torch.no_grad():
            weight.copy_(merged.to(weight.dtype))
    return weights


def check_within_precision(merged: dict[str, torch.Tensor], merging: str, precision: str) -> None:
    """A merged weight (`merge_into`'s, by layer key) beyond what `precision` holds would be saved as infinity: a pipeline
    that draws black or noise."""
    for key, weight in merged.items():
        if not torch.isfinite(weight.to(PRECISIONS[precision])).all():
            fix = "use a smaller --strength" + ("" if precision == "fp32" else ", or --precision fp32")
            raise FinetuneError(f"{merging} takes its layer {key} to {weight.abs().max().item():.3g}, beyond what {precision} holds: {fix}")


def find_module(model: torch.nn.Module, path: str, part: str) -> torch.nn.Module:
    # transformers 4 nests CLIP under `text_model`, transformers 5 does not.
    for candidate in (path, CLIP_ROOT + path) if part == "text_encoder" else (path,):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise FinetuneError(f"LoRA layer {part}.{path} is not in the base model: the LoRA was trained on another architecture")


def merge_lora(
    base: str, lora_path: str, strength: float, output_dir: Path, base_config: str | None = None, overwrite: bool = False,
    precision: str = "fp32",
) -> Path:
    """Load `base` (described by `base_config` when it is a single file), fold in the LoRA at `strength`,
    save a full pipeline in `precision` (fp16 halves it, as most shared checkpoints are) with a short model
    card. An existing folder is replaced only with `overwrite`."""
    from finetune.checkpoints.run_files import resolve_lora_file
    from finetune.sampling.inference import base_model_metadata

    lora_file = resolve_lora_file(lora_path)
    check_merge_output(Path(output_dir), lora_file, overwrite)
    check_not_what_it_reads(Path(output_dir), {"--base": base, "--base-config": base_config}, "merge output")
    lora = load_lora(lora_file)
    base_record = base_model_metadata(base)  # a merged or fine-tuned pipeline's, or export-checkpoint file's
    trained_as = how_trained(base, base_record, lora_file, lora)  # conflicting records stop here, before the model loads
    if note := merged_already_note(base_record, lora, f"merge --base {base}", strength):
        print(f"note: {note}")
    model = load_base_model(ModelConfig.from_option(base, base_config))
    try:
        merged = merge_into({"unet": model.unet, "text_encoder": model.text_encoder}, lora, strength)
    except FinetuneError as err:  # name the LoRA, as sample and eval do: the layer alone does not say which file
        raise FinetuneError(f"LoRA {lora_file} does not fit this base model: {err}") from None
    check_within_precision(merged, f"merging {lora_file} at --strength {strength:g}", precision)
    if trained_as["finetune.prediction_type"]:  # the merged UNet predicts what the LoRA (or the base's record) says
        model.noise_scheduler.register_to_config(prediction_type=trained_as["finetune.prediction_type"])
    if trained_as.get("finetune.zero_terminal_snr") and not model.noise_scheduler.config.get("rescale_betas_zero_snr"):
        model.noise_scheduler = zero_terminal_snr_schedule(model.noise_scheduler)  # and on the schedule it was trained on
    trained_as["finetune.prediction_type"] = model.noise_scheduler.config.prediction_type
    recorded = merged_record(base, base_record, lora_path, lora, strength, trained_as)
    output_dir = save_pipeline(model, Path(output_dir), dtype=PRECISIONS[precision], metadata=recorded)
    _write_card(output_dir, base, lora_file, lora, strength)
    return output_dir


def merged_record(base: str, base_record: dict[str, str], lora_path: str, lora: LoRA, strength: float, trained_as: dict[str, str]) -> dict[str, str]:
    """What the demo's adapter table shows for the merged pipeline, and the clip skip and schedule sample and the demo
    use with it (`trained_as`). The prediction type too, as training records it for its pipelines: export-checkpoint's
    file carries only this record of it, and loaded with the base's configs (--base-config) it would otherwise sample as
    the base's. And the LoRAs merged into it, so the same LoRA given again (sample --lora) is known; each named as it was
    given (export-checkpoint's file carries the record: no absolute paths of this machine unasked). The base by name, as
    shared files name it (finetune.outputs.base_names): without --base it is the path the LoRA's run recorded, never given."""
    merged = [*merged_loras(base_record), {"file": lora_path, "weights": weights_fingerprint(lora), "strength": strength}]
    return {"finetune.method": f"lora merged at {strength:g}", "finetune.base_model": shared_base_name(base), "finetune.steps": lora.metadata.get("finetune.steps", "?"),
            **trained_as, MERGED_LORAS: json.dumps(merged)}  # fmt: skip


def how_trained(base: str, base_record: dict[str, str], lora_file: Path, lora: LoRA) -> dict[str, str]:
    """The clip skip, prediction type, zero-terminal-SNR schedule and token length that the LoRA and the base's own record
    (a merged or fine-tuned pipeline's, or export-checkpoint's file header) agree on, as sample combines them: merging
    into an earlier merge keeps what the first LoRA needs (merging LoRAs one by one, a second LoRA that records no clip
    skip dropped the first one's 2), and records that disagree are refused, as sample refuses them together."""
    from finetune.sampling.adapters_as_trained import adapters_clip_skip, adapters_max_token_length, adapters_prediction_type, adapters_zero_terminal_snr

    adapters = {name: record for name, record in ((base, base_record), (str(lora_file), lora.metadata)) if record}
    trained_as = {"finetune.clip_skip": str(adapters_clip_skip(adapters)), "finetune.prediction_type": adapters_prediction_type(adapters)}
    if adapters_zero_terminal_snr(adapters):
        trained_as["finetune.zero_terminal_snr"] = "true"
    adapters_max_token_length(adapters)  # a length no training writes is refused, as sampling the merge would refuse it
    lengths = [record["finetune.max_token_length"] for record in adapters.values() if "finetune.max_token_length" in record]
    if lengths:  # the LoRA's own, else the first LoRA's
        trained_as["finetune.max_token_length"] = lengths[-1]
    return trained_as


# In a merged pipeline's record: the LoRAs merged into it, in order ({file, weights fingerprint, strength}, JSON).
MERGED_LORAS = "finetune.merged_loras"


def weights_fingerprint(lora: LoRA) -> str:
    """A short digest of the LoRA's weights, the same for its copies in either layout and in fp16 or fp32 (the export's
    choices), so a LoRA is known again whatever file it comes in."""
    digest = hashlib.sha256()
    for key in sorted(lora.layers):
        digest.update(key.encode())
        for field in dataclasses.fields(lora.layers[key]):  # down, up, alpha (other kinds of layer: their own tensors)
            value = getattr(lora.layers[key], field.name)
            if value is None:  # a plain LoRA's magnitude: its digest stays what it was before DoRA loaded
                continue
            digest.update(value.detach().to("cpu", torch.float16).numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    return digest.hexdigest()[:16]


def merged_loras(record: dict[str, str]) -> list[dict]:
    """The LoRAs a merged pipeline's record lists (MERGED_LORAS), in the order merged; [] where it lists none or is not JSON."""
    try:
        merged = json.loads(record.get(MERGED_LORAS, "[]"))
    except ValueError:
        return []
    return merged if isinstance(merged, list) else []


def merged_already_note(base_record: dict[str, str], lora: LoRA, applying: str, strength: float) -> str | None:
    """A note when the LoRA is already merged into the base (`applying`: how the user gave that base): applied again on
    top, it acts at the two strengths added, which sampling the merged pipeline with its own LoRA usually is not meant to."""
    merged = [entry for entry in merged_loras(base_record) if isinstance(entry, dict)]
    fingerprint = weights_fingerprint(lora) if merged else None  # digested only for a base that records merges
    earlier = [entry for entry in merged if entry.get("weights") == fingerprint]
    if not earlier:
        return None
    return (f"{applying}: this LoRA is already merged into that base (from {earlier[0].get('file')} at strength {earlier[0].get('strength')}); "
            f"it is added again on top at {strength:g}: leave --lora out to use the merged model as it is")


def _write_card(output_dir: Path, base: str, lora_file: Path, lora: LoRA, strength: float) -> None:
    rank, alpha = lora.common_rank_alpha()
    parts = " and ".join(sorted({key.split(".", 1)[0] for key in lora.layers}))
    facts = [f"rank {rank}, alpha {alpha:g}"]
    facts += [f"{label} {lora.metadata[key]}" for key, label in (("finetune.steps", "steps"), ("finetune.recipe_hash", "recipe hash"))
              if key in lora.metadata]
    atomic_write_text(  # whole or not there: the pipeline is in place by now, and a Ctrl-C here left half a card
        output_dir / "README.md",
        f"# {output_dir.name}\n\n"
        f"Stable Diffusion pipeline: `{shared_base_name(base)}` with the LoRA `{lora_file}` ({', '.join(facts)}) merged into its "
        f"{parts} at strength {strength:g}, written by `finetune merge`.\n\n"
        "```python\n" + "\n".join(diffusers_loading_code(str(output_dir))) + "\n```\n\n"
        f'Or sample with `finetune sample --base {output_dir} --prompt "..."`.\n'
    )
