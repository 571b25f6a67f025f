"""LoRA files other tools write and read: the names ComfyUI and diffusers look for, and the names they use."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_kohya import Settings, UNET_TARGETS, assert_close, load_pipeline, outputs, randomise_lora

from finetune.kohya import load_lora, save_lora_file
from finetune.methods.lora import LORA_WEIGHTS_NAME, TEXT_ENCODER_TARGETS, add_lora, save_lora

CLIP_PROJECTIONS = [f"self_attn.{name}" for name in TEXT_ENCODER_TARGETS]


def trained_lora(tiny_model, folder):
    """A LoRA of the UNet and the text encoder saved as training saves it; and the outputs of the live model."""
    pipeline = load_pipeline(tiny_model)
    add_lora(pipeline.unet, UNET_TARGETS, torch.float32, Settings)
    add_lora(pipeline.text_encoder, TEXT_ENCODER_TARGETS, torch.float32, Settings)
    randomise_lora(pipeline.unet, 1), randomise_lora(pipeline.text_encoder, 2)
    pipeline.unet.eval(), pipeline.text_encoder.eval()
    path = save_lora({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}, folder / LORA_WEIGHTS_NAME, {})
    return path, outputs(pipeline)


def diffusers_outputs(tiny_model, path):
    pipeline = load_pipeline(tiny_model)
    pipeline.load_lora_weights(str(path.parent), weight_name=path.name)
    return outputs(pipeline)


def test_text_encoder_keys_are_named_under_text_model_as_comfyui_maps_them_and_load_in_diffusers_alike(tiny_model, tmp_path):
    """They were `text_encoder.encoder.layers...` (transformers 5's CLIPTextModel paths, as diffusers 0.42 itself
    writes them with it): ComfyUI maps only `text_encoder.text_model.encoder.layers.N.<proj>`, so it dropped the
    text encoder's LoRA ('lora key not loaded'), as diffusers with transformers 4 did."""
    (tmp_path / "run").mkdir()
    trained, expected = trained_lora(tiny_model, tmp_path / "run")
    exported = save_lora_file(load_lora(trained), tmp_path / "export" / LORA_WEIGHTS_NAME, "diffusers")
    comfyui_names = {f"text_encoder.text_model.encoder.layers.{n}.{projection}" for n in range(2) for projection in CLIP_PROJECTIONS}
    for path in (trained, exported):
        tensors = load_file(path)
        clip_modules = {key.split(".lora_linear_layer.")[0] for key in tensors if key.startswith("text_encoder.")}
        assert clip_modules == comfyui_names
        assert all(f"{module}.lora_linear_layer.{ab}.weight" in tensors for module in comfyui_names for ab in ("down", "up"))
        assert_close(diffusers_outputs(tiny_model, path), expected)


def test_a_file_written_before_without_text_model_still_loads_alike(tiny_model, tmp_path):
    (tmp_path / "run").mkdir()
    trained, expected = trained_lora(tiny_model, tmp_path / "run")
    with safe_open(str(trained), "pt") as f:
        metadata = f.metadata()
    older = {key.replace("text_encoder.text_model.", "text_encoder."): value for key, value in load_file(trained).items()}
    save_file(older, str(tmp_path / "older.safetensors"), metadata)
    assert load_lora(tmp_path / "older.safetensors").layers.keys() == load_lora(trained).layers.keys()
    exported = save_lora_file(load_lora(tmp_path / "older.safetensors"), tmp_path / "export" / LORA_WEIGHTS_NAME, "diffusers")
    assert load_file(exported).keys() == load_file(trained).keys()
    assert_close(diffusers_outputs(tiny_model, exported), expected)
